"""RequestQueue: two FIFO lines per model (high before normal), bounded; a freed backend wakes the
first waiter that wants it; unused wake-ups are passed on. Each test runs its own event loop with
asyncio.run; nothing waits on the wall clock except the one test of a wait that runs out."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Coroutine
from typing import Any

import pytest

from nexus.queueing import QueueFull, RequestQueue, Ticket

LONG = 60.0  # a limit no test reaches: waiters are woken or cancelled first


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


class Waiters:
    """Named waiters that behave like the dispatcher: join, wait, take the slot (or, ``declines``
    times, find it gone and wait on), leave. Records the order in which they were served."""

    def __init__(self, queue: RequestQueue) -> None:
        self.queue = queue
        self.served: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.tickets: dict[str, Ticket] = {}

    async def add(
        self,
        name: str,
        *,
        high: bool = False,
        wants: Collection[str] = ("b",),
        key: str = "m",
        declines: int = 0,
    ) -> None:
        ticket = self.queue.join(key, high=high, wants=wants)
        self.tickets[name] = ticket

        async def run() -> None:
            served = False
            left = declines
            try:
                while await self.queue.wait(ticket, LONG):
                    if left:
                        left -= 1
                        self.queue.again(ticket, wants)
                        continue
                    served = True
                    self.served.append(name)
                    return
            finally:
                self.queue.leave(ticket, served=served)

        self.tasks[name] = asyncio.create_task(run())
        await settle()

    async def free(self, backend: str = "b", times: int = 1) -> list[str]:
        """A slot came free on ``backend``, ``times`` times; who was served."""
        before = len(self.served)
        for _ in range(times):
            self.queue.wake((backend,))
            await settle()
        return self.served[before:]

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def run(test: Coroutine[Any, Any, None]) -> None:
    asyncio.run(test)


def test_fifo_within_a_priority():
    async def main() -> None:
        waiters = Waiters(RequestQueue(max_size=10))
        for name in ("n1", "n2", "n3"):
            await waiters.add(name)
        assert await waiters.free() == ["n1"]
        assert await waiters.free() == ["n2"]
        assert await waiters.free() == ["n3"]
        await waiters.close()

    run(main())


def test_high_priority_waiters_are_woken_before_normal_ones():
    async def main() -> None:
        waiters = Waiters(RequestQueue(max_size=10))
        await waiters.add("n1")
        await waiters.add("h1", high=True)
        await waiters.add("n2")
        await waiters.add("h2", high=True)
        assert await waiters.free(times=4) == ["h1", "h2", "n1", "n2"]
        await waiters.close()

    run(main())


def test_a_freed_slot_wakes_exactly_one_waiter():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        for name in ("a", "b", "c"):
            await waiters.add(name)
        assert queue.depth == 3
        assert await waiters.free() == ["a"]
        assert queue.depth == 2
        assert sum(task.done() for task in waiters.tasks.values()) == 1
        await waiters.close()

    run(main())


def test_wake_with_nobody_waiting_does_nothing():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        queue.wake(("b",))
        queue.wake(None)
        assert queue.depth == 0

    run(main())


def test_a_full_queue_raises_queue_full():
    async def main() -> None:
        queue = RequestQueue(max_size=2)
        waiters = Waiters(queue)
        await waiters.add("a")
        await waiters.add("b", high=True)  # the bound counts both lines together
        with pytest.raises(QueueFull):
            queue.join("m", high=False, wants=("b",))
        with pytest.raises(QueueFull):
            queue.join("other", high=True, wants=("b",))
        assert queue.depth == 2
        await waiters.close()

    run(main())


def test_a_queue_of_size_zero_takes_nobody():
    async def main() -> None:
        with pytest.raises(QueueFull):
            RequestQueue(max_size=0).join("m", high=False, wants=("b",))

    run(main())


def test_wait_returns_false_when_its_limit_passes_first():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        for high, limit in ((False, 0.01), (True, 0)):
            ticket = queue.join("m", high=high, wants=("b",))
            assert await queue.wait(ticket, limit) is False
            queue.leave(ticket, served=False)
        assert queue.depth == 0  # a waiter that gave up leaves the line

    run(main())


def test_a_waiter_that_finds_the_slot_gone_keeps_its_place():
    async def main() -> None:
        waiters = Waiters(RequestQueue(max_size=10))
        await waiters.add("first", declines=1)  # woken once, someone else took the slot
        await waiters.add("second")
        assert await waiters.free() == []
        assert await waiters.free() == ["first"]
        assert await waiters.free() == ["second"]
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
        waiters.tasks["n1"].cancel()
        await settle()
        assert queue.depth == 2
        assert waiters.served == []  # a cancelled waiter that was not woken wakes nobody
        assert await waiters.free(times=2) == ["h1", "n2"]
        assert queue.depth == 0
        await waiters.close()

    run(main())


def test_a_woken_waiter_that_is_cancelled_passes_its_wake_up_on():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        await waiters.add("leaves")
        await waiters.add("next")
        queue.wake(("b",))  # meant for "leaves", which is cancelled before it runs
        waiters.tasks["leaves"].cancel()
        await settle()
        assert waiters.served == ["next"]
        assert queue.depth == 0
        await waiters.close()

    run(main())


def test_a_woken_waiter_passes_its_wake_up_only_to_one_that_wants_the_same_backend():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        await waiters.add("leaves", wants=("b", "v"))
        await waiters.add("vision", wants=("v",))
        await waiters.add("text", wants=("b",))
        queue.wake(("b",))
        waiters.tasks["leaves"].cancel()
        await settle()
        assert waiters.served == ["text"]
        await waiters.close()

    run(main())


def test_a_served_waiter_passes_nothing_on():
    async def main() -> None:
        waiters = Waiters(RequestQueue(max_size=10))
        await waiters.add("a")
        await waiters.add("b")
        assert await waiters.free() == ["a"]
        await settle()
        assert waiters.served == ["a"]
        await waiters.close()

    run(main())


def test_a_freed_backend_wakes_the_first_waiter_that_wants_it_not_the_first_in_line():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        await waiters.add("vision", wants=("vision-box",))
        await waiters.add("text", wants=("text-box", "vision-box"))
        assert await waiters.free("text-box") == ["text"]
        assert await waiters.free("text-box") == []  # the vision request is not woken for it
        assert await waiters.free("vision-box") == ["vision"]
        await waiters.close()

    run(main())


def test_wake_none_wakes_every_waiter_in_line_order():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        await waiters.add("n1")
        await waiters.add("h1", high=True, key="other", wants=("x",))
        await waiters.add("n2", declines=1)
        queue.wake(None)  # a backend came back: nobody could have named it
        await settle()
        assert waiters.served == ["n1", "h1"]
        assert queue.depth == 1  # n2 found nothing and waits on
        assert await waiters.free() == ["n2"]
        await waiters.close()

    run(main())


def test_wanted_tells_whether_a_newcomer_would_overtake():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        await waiters.add("vision", wants=("vision-box",))
        assert queue.wanted("m", ["vision-box", "text-box"])
        assert not queue.wanted("m", ["text-box"])
        assert not queue.wanted("other", ["vision-box"])
        await waiters.close()

    run(main())


def test_each_model_has_its_own_line_and_wake_ups():
    async def main() -> None:
        queue = RequestQueue(max_size=10)
        waiters = Waiters(queue)
        await waiters.add("a", key="a")
        await waiters.add("b", key="b")
        assert (queue.waiting("a"), queue.waiting("b"), queue.depth) == (1, 1, 2)
        queue.wake(("b",), key="b")
        await settle()
        assert waiters.served == ["b"]
        queue.wake(("b",), key="a")
        await settle()
        assert waiters.served == ["b", "a"]
        assert queue.depth == 0 and queue.waiting("a") == 0
        await waiters.close()

    run(main())
