"""The request queue: requests wait here only while every capable backend is at capacity.

Two FIFO lines, high before normal (``X-Nexus-Priority: high``), bounded by ``max_size``
together. A waiter is woken when a backend releases a slot, then plans again; nothing polls, so
an idle queue costs nothing. Unknown models and excluded backends never wait here.
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    pass


class RequestQueue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._lines: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),  # high
            deque(),  # normal
        )

    @property
    def depth(self) -> int:
        return len(self._lines[0]) + len(self._lines[1])

    async def wait(self, *, high: bool, limit: float, again: bool = False) -> bool:
        """Wait for a freed slot; False when ``limit`` seconds passed first. A request that already
        waited (``again``) goes back to the front of its line, not the end."""
        if not again and self.depth >= self.max_size:
            raise QueueFull
        line = self._lines[0 if high else 1]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if again:
            line.appendleft(waiter)
        else:
            line.append(waiter)
        try:
            await asyncio.wait_for(waiter, limit)
        except TimeoutError:
            return False
        finally:
            if waiter in line:
                line.remove(waiter)
        return True

    def notify(self) -> None:
        """A slot came free: wake the first waiter, high before normal."""
        for line in self._lines:
            while line:
                waiter = line.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
