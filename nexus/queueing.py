"""The request queue: requests wait here only while every capable backend is at capacity.

One queue per model, each with two first-come-first-served lines, high before normal
(``X-Nexus-Priority: high``), all bounded together by ``max_size``. While anyone waits for a model,
new requests for it wait behind them instead of overtaking. A waiter is woken when a backend that
serves its model releases a slot, and then plans again; nothing polls, so an idle queue costs
nothing. Unknown models and excluded backends never wait here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

Line = deque[asyncio.Future[None]]


class QueueFull(Exception):
    pass


class RequestQueue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.depth = 0
        self._lines: dict[str, tuple[Line, Line]] = {}  # model -> (high, normal); only non-empty

    def waiting(self, model: str) -> int:
        lines = self._lines.get(model)
        return len(lines[0]) + len(lines[1]) if lines else 0

    async def wait(self, model: str, *, high: bool, limit: float, again: bool = False) -> bool:
        """Wait for a freed slot; False when ``limit`` seconds passed first. A request that already
        waited (``again``) goes back to the front of its line, not the end."""
        if not again and self.depth >= self.max_size:
            raise QueueFull
        lines = self._lines.setdefault(model, (deque(), deque()))
        line = lines[0 if high else 1]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if again:
            line.appendleft(waiter)
        else:
            line.append(waiter)
        self.depth += 1
        try:
            await asyncio.wait_for(waiter, limit)
        except TimeoutError:
            return False
        finally:
            if waiter in line:
                line.remove(waiter)
            self.depth -= 1
            if not lines[0] and not lines[1] and self._lines.get(model) is lines:
                del self._lines[model]
        return True

    def notify(self, model: str) -> None:
        """A slot for ``model`` came free: wake its first waiter, high before normal."""
        lines = self._lines.get(model)
        if lines is None:
            return
        for line in lines:
            for waiter in line:
                if not waiter.done():
                    waiter.set_result(None)
                    return

    def notify_served_by(self, serves: Callable[[str], bool]) -> None:
        """A backend released a slot: wake the first waiter of each model it serves."""
        if not self._lines:
            return
        for model in list(self._lines):
            if serves(model):
                self.notify(model)
