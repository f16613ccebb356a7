"""Token counts as providers send them, read defensively: a count is a non-negative integer (or
a string of digits, as int64 fields travel in JSON); anything else counts as 0, never a crash."""

from __future__ import annotations


def count(value: object) -> int:
    if type(value) is int:
        return value if value > 0 else 0
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    return 0
