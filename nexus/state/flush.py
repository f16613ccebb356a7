"""When a batch of writes goes to the store: one timer on the event loop, which a write wanted
sooner moves earlier and never later (the ledger and the key set each keep one)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FlushTimer:
    __slots__ = ("_callback", "_handle", "_due")

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._handle: asyncio.Handle | None = None  # (uvloop answers call_later(0) with a Handle)
        self._due = 0.0  # when it fires, in loop time

    @property
    def set(self) -> bool:
        return self._handle is not None

    def within(self, delay: float) -> None:
        """Fire within ``delay`` seconds: sooner if it is set to fire later, as set otherwise."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._handle is not None:
            if self._due <= due:
                return
            self._handle.cancel()
        self._handle, self._due = loop.call_later(delay, self._fire), due

    def after(self, delay: float) -> None:
        """Fire in ``delay`` seconds, whatever it was set to (a failed write waits that long)."""
        self.cancel()
        self.within(delay)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._callback()
