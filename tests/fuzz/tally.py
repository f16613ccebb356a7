"""What the fuzz tier sent, by route and status; printed at the end of the run (conftest.py)."""

from __future__ import annotations

from collections import Counter

TALLY: Counter[str] = Counter()
SLOWEST: list[tuple[float, str]] = []  # (seconds, request), the few slowest, slowest first
KEEP = 5


def timed(seconds: float, what: str) -> None:
    if len(SLOWEST) < KEEP or seconds > SLOWEST[-1][0]:
        SLOWEST.append((seconds, what))
        SLOWEST.sort(reverse=True)
        del SLOWEST[KEEP:]
