"""The last N requests (streaming ones included), newest last; never message content."""

from __future__ import annotations

from collections import deque
from typing import Any

from .outcomes import Outcome


class History:
    def __init__(self, size: int) -> None:
        self._entries: deque[Outcome] = deque(maxlen=size)

    def __call__(self, batch: list[Outcome]) -> None:
        self._entries.extend(batch)

    def last(self, limit: int | None = None) -> list[dict[str, Any]]:
        entries = list(self._entries)
        if limit is not None:
            entries = entries[-limit:] if limit > 0 else []
        return [entry.public() for entry in entries]
