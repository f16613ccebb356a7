"""The request queue: requests wait here only while every backend that could serve them is busy.

One queue per model, each with two first-come-first-served lines, high before normal
(``X-Nexus-Priority: high``), all bounded together by ``max_size``. A waiter (a ``Ticket``) names
the backends it waits for: those its plan found able to serve it but busy. A slot freed on a
backend wakes, in each line, the first waiter that wants that backend, so a text request is not
stuck behind a vision request that a freed text backend cannot serve, and that wake-up is not
spent on it. A woken waiter plans again; if it finds nothing it keeps its place. A woken waiter
that leaves without using its wake-up (cancelled, timed out, failed) passes it on. Capacity in a
new form (a backend recovered, found or added, or listing new models) wakes every waiter: none of
them could have named it. Nothing polls, so an idle queue costs nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection

Line = deque["Ticket"]


class QueueFull(Exception):
    pass


class Ticket:
    """One request's place in its model's line."""

    __slots__ = ("key", "high", "wants", "future", "woken_for")

    def __init__(self, key: str, high: bool, wants: Collection[str]) -> None:
        self.key = key
        self.high = high
        self.wants = frozenset(wants)  # backend names
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # What the pending wake-up was for (None: any capacity); passed on if left unused.
        self.woken_for: Collection[str] | None = None

    @property
    def woken(self) -> bool:
        return self.future.done() and not self.future.cancelled()

    def wake(self, names: Collection[str] | None) -> bool:
        if self.future.done():
            return False
        self.woken_for = names
        self.future.set_result(None)
        return True


class RequestQueue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.depth = 0
        self._lines: dict[str, tuple[Line, Line]] = {}  # model -> (high, normal); only non-empty

    def waiting(self, key: str) -> int:
        lines = self._lines.get(key)
        return len(lines[0]) + len(lines[1]) if lines else 0

    def wanted(self, key: str, backends: Collection[str]) -> bool:
        """Does anyone in ``key``'s line wait for one of ``backends``? Then a newcomer that
        would take one of them must not overtake."""
        lines = self._lines.get(key)
        return lines is not None and any(
            not ticket.wants.isdisjoint(backends) for line in lines for ticket in line
        )

    def join(self, key: str, *, high: bool, wants: Collection[str]) -> Ticket:
        """A place at the end of the line; every ``join`` is paired with a ``leave``."""
        if self.depth >= self.max_size:
            raise QueueFull
        ticket = Ticket(key, high, wants)
        lines = self._lines.setdefault(key, (deque(), deque()))
        lines[0 if high else 1].append(ticket)
        self.depth += 1
        return ticket

    async def wait(self, ticket: Ticket, limit: float) -> bool:
        """Until the ticket is woken (True, perhaps at once) or ``limit`` seconds pass (False)."""
        if ticket.woken:  # woken already: those woken before it plan first, in line order
            await asyncio.sleep(0)
            return True
        # Not wait_for: on 3.11 it swallows a cancellation that comes after the wake-up.
        try:
            async with asyncio.timeout(limit):
                await ticket.future
        except TimeoutError:
            return False
        return True

    def again(self, ticket: Ticket, wants: Collection[str]) -> None:
        """Woken, the request planned and found nothing free: wait on, in the same place.
        Its wake-up was used (someone ahead took the slot), so nothing is passed on."""
        ticket.wants = frozenset(wants)
        ticket.woken_for = None
        ticket.future = asyncio.get_running_loop().create_future()

    def leave(self, ticket: Ticket, *, served: bool) -> None:
        """Out of the line. One that was woken and leaves without a slot (cancelled, timed out,
        failed) hands its wake-up to the next in its line who wants the same capacity."""
        lines = self._lines.get(ticket.key)
        if lines is None:
            return
        line = lines[0 if ticket.high else 1]
        if ticket not in line:
            return
        line.remove(ticket)
        self.depth -= 1
        if not lines[0] and not lines[1]:
            del self._lines[ticket.key]
        elif ticket.woken and not served:
            self._wake_in(lines, ticket.woken_for)
        if not ticket.future.done():
            ticket.future.cancel()

    def wake(self, backends: Collection[str] | None, key: str | None = None) -> None:
        """Capacity on ``backends``: in each line (or only ``key``'s), wake the first waiter
        that wants one of them. ``None`` means capacity anyone may use: wake every waiter."""
        if not self._lines:
            return
        if key is not None:
            lines = self._lines.get(key)
            if lines is not None:
                self._wake_in(lines, backends)
            return
        for lines in list(self._lines.values()):
            self._wake_in(lines, backends)

    @staticmethod
    def _wake_in(lines: tuple[Line, Line], backends: Collection[str] | None) -> None:
        for line in lines:
            for ticket in line:
                if backends is None:
                    ticket.wake(None)
                elif not ticket.wants.isdisjoint(backends) and ticket.wake(backends):
                    return
