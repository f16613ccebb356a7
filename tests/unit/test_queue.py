"""RequestQueue: two FIFO lines (high before normal), bounded, woken one waiter at a time.
Each test runs its own event loop with asyncio.run; nothing waits on the wall clock except the
one test of a wait that runs out."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from nexus.queueing import QueueFull, RequestQueue

LONG = 60.0  # a limit no test reaches: waiters are woken or cancelled first


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


class Waiters:
    """Starts named waiters and records the order in which they are woken."""

    def __init__(self, queue: RequestQueue) -> None:
        self.queue = queue
        self.woken: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def add(self, name: str, *, high: bool = False, again: bool = False) -> None:
        async def wait() -> None:
            if await self.queue.wait("m", high=high, limit=LONG, again=again):
                self.woken.append(name)

        self.tasks.append(asyncio.create_task(wait()))
        await settle()

    async def wake(self, times: int = 1) -> list[str]:
        before = len(self.woken)
        for _ in range(times):
            self.queue.notify("m")
            await settle()
        return self.woken[before:]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def run(test: Coroutine[Any, Any, None]) -> None:
    asyncio.run(test)


def test_fifo_within_a_priority():
    async def main() -> None:
        waiters = Waiters(RequestQueue(max_size=10))
        for name in ("n1", "n2", "n3"):
            await waiters.add(name)
        assert await waiters.wake() == ["n1"]
        assert await waiters.wake() == ["n2"]
        assert await waiters.wake() == ["n3"]
        await waiters.close()

    run(main())


def test_high_priority_waiters_are_woken_before_normal_ones():
    async def main() -> None:
        waiters = Waiters(RequestQueue(max_size=10))
        await waiters.add("n1")
        await waiters.add("h1", high=True)
        await waiters.add("n2")
        await waiters.add("h2", high=True)
        assert await waiters.wake(4) == ["h1", "h2", "n1", "n2"]
        await waiters.close()

    run(main())


def test_notify_wakes_exactly_one_waiter():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        for name in ("a", "b", "c"):
            await waiters.add(name)
        assert queue.depth == 3
        assert await waiters.wake() == ["a"]
        assert queue.depth == 2
        assert sum(task.done() for task in waiters.tasks) == 1
        await waiters.close()

    run(main())


def test_notify_with_nobody_waiting_does_nothing():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        queue.notify("m")
        assert queue.depth == 0

    run(main())


def test_a_full_queue_raises_queue_full():
    async def main() -> None:
        queue = RequestQueue(max_size=2)
        waiters = Waiters(queue)
        await waiters.add("a")
        await waiters.add("b", high=True)  # the bound counts both lines together
        with pytest.raises(QueueFull):
            await queue.wait("m", high=False, limit=LONG)
        with pytest.raises(QueueFull):
            await queue.wait("m", high=True, limit=LONG)
        assert queue.depth == 2
        await waiters.close()

    run(main())


def test_a_queue_of_size_zero_takes_nobody():
    async def main() -> None:
        with pytest.raises(QueueFull):
            await RequestQueue(max_size=0).wait("m", high=False, limit=LONG)

    run(main())


def test_wait_returns_false_when_its_limit_passes_first():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        assert await queue.wait("m", high=False, limit=0.01) is False
        assert await queue.wait("m", high=True, limit=0) is False
        assert queue.depth == 0  # a waiter that gave up leaves the line

    run(main())


def test_again_puts_a_waiter_back_at_the_front_of_its_line():
    async def main() -> None:
        waiters = Waiters(RequestQueue(max_size=10))
        await waiters.add("n1")
        await waiters.add("n2")
        await waiters.add("back", again=True)
        await waiters.add("h1", high=True)
        assert await waiters.wake(4) == ["h1", "back", "n1", "n2"]
        await waiters.close()

    run(main())


def test_again_is_not_refused_by_a_full_queue():
    async def main() -> None:
        queue = RequestQueue(max_size=1)
        waiters = Waiters(queue)
        await waiters.add("first")
        await waiters.add("back", again=True)  # it already held a place
        assert queue.depth == 2
        assert await waiters.wake() == ["back"]
        await waiters.close()

    run(main())


def test_depth_counts_both_lines_and_drops_cancelled_waiters():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        await waiters.add("n1")
        await waiters.add("h1", high=True)
        await waiters.add("n2")
        assert queue.depth == 3
        waiters.tasks[0].cancel()
        await settle()
        assert queue.depth == 2
        assert await waiters.wake(2) == ["h1", "n2"]
        assert queue.depth == 0
        await waiters.close()

    run(main())


def test_each_model_has_its_own_line_and_wake_ups():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        a = asyncio.ensure_future(queue.wait("a", high=False, limit=LONG))
        b = asyncio.ensure_future(queue.wait("b", high=False, limit=LONG))
        await asyncio.sleep(0)  # let both join their lines
        assert (queue.waiting("a"), queue.waiting("b"), queue.depth) == (1, 1, 2)
        queue.notify_served_by(lambda model: model == "b")
        assert await b is True
        assert not a.done()
        queue.notify("a")
        assert await a is True
        assert queue.depth == 0 and queue.waiting("a") == 0

    asyncio.run(main())
