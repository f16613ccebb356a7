"""Pings on a quiet stream (``api/sse.with_pings``): sent while the stream is silent, never in
place of an event, and closing the pinged stream closes the stream inside."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from nexus.api.sse import with_pings

PING = b"event: ping\n\n"


def test_a_quiet_stream_is_pinged_and_every_event_still_comes() -> None:
    async def scenario() -> tuple[list[bytes], bool]:
        go_on = asyncio.Event()
        closed = False

        async def events() -> AsyncGenerator[bytes, None]:
            nonlocal closed
            try:
                yield b"first"
                await go_on.wait()  # silent until the reader has seen a ping
                yield b"second"
            finally:
                closed = True

        seen: list[bytes] = []
        async for item in with_pings(events(), PING, 0.001):
            seen.append(item)
            if item == PING:
                go_on.set()
        return seen, closed

    seen, closed = asyncio.run(scenario())
    assert seen[0] == b"first" and seen[-1] == b"second"
    assert PING in seen[1:-1] and set(seen[1:-1]) == {PING}
    assert closed


def test_closing_the_pinged_stream_closes_the_stream_inside() -> None:
    async def scenario() -> bool:
        closed = asyncio.Event()

        async def events() -> AsyncGenerator[bytes, None]:
            try:
                yield b"first"
                await asyncio.Event().wait()  # never ends by itself
                yield b"never"
            finally:
                closed.set()

        pinged = with_pings(events(), PING, 0.001)
        assert await anext(pinged) == b"first"
        assert await anext(pinged) == PING  # waiting inside, silent
        await pinged.aclose()  # the client left
        return closed.is_set()

    assert asyncio.run(scenario())
