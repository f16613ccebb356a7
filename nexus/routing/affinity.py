"""Prefix-cache affinity: a conversation, or a long shared system prompt, goes back to the
backend that served it recently, so the prompt that backend has cached is reused.

Two keys per request: the conversation (its leading system messages and first user message) and,
when the leading system prompt is long, that prompt alone. The first key with a recent backend
wins. Pure: the clock is passed in; the table is bounded and entries expire. Keys are Python's
hash of the bytes (seeded per process, and fast), or with ``stable`` a digest (BLAKE2b, 8 bytes)
that is the same in every process, so that replicas can share the table.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

LONG_PROMPT_CHARS = 1000
MAX_ENTRIES = 10_000


def affinity_keys(model: str, messages: Sequence[Any], stable: bool = False) -> list[int]:
    leading: list[Any] = []
    system_chars = 0
    for message in messages:
        if not isinstance(message, Mapping):
            break
        leading.append(message)
        if message.get("role") in ("system", "developer"):
            system_chars += _text_chars(message.get("content"))
            continue
        break  # the first user (or other) message closes the conversation's identity
    if not leading:
        return []
    try:
        key = _digest if stable else hash
        named = model.encode() + b"\0"
        keys = [key(named + orjson.dumps(leading))]
        system = [m for m in leading if m.get("role") in ("system", "developer")]
        if system and system_chars >= LONG_PROMPT_CHARS and len(system) < len(leading):
            keys.append(key(named + orjson.dumps(system)))
    except orjson.JSONEncodeError:  # nested past what orjson writes: no affinity, not a crash
        return []
    return keys


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest())


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(p["text"])
            for p in content
            if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    return 0


class AffinityTable:
    def __init__(self, ttl_seconds: float) -> None:
        self.ttl = ttl_seconds
        self._entries: OrderedDict[int, tuple[str, float]] = OrderedDict()

    def lookup(self, keys: Sequence[int], now: float) -> str | None:
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            backend, seen = entry
            if now - seen <= self.ttl:
                return backend
            del self._entries[key]
        return None

    def remember(self, keys: Sequence[int], backend: str, now: float) -> None:
        for key in keys:
            self._entries[key] = (backend, now)
            self._entries.move_to_end(key)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
