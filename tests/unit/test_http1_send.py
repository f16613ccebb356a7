"""The upstream client's send path: a connection lost before the request went out fails at once,
and a request that met a dead pooled connection is sent once more, on a fresh one (issue 8).

Real loopback servers (``asyncio.start_server``), on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from nexus.backends.http1 import HTTP1Client

T = TypeVar("T")
TEST_TIMEOUT = 10.0  # a bound on each test, not a timing assertion
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    factory = None if request.param == "asyncio" else uvloop.new_event_loop

    def run(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(TEST_TIMEOUT):
                return await coro

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())

    return run


def test_a_request_on_a_connection_lost_before_it_was_sent_fails_at_once(run):
    async def scenario() -> None:
        async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = HTTP1Client()
        try:
            # Connected, then the peer's close is seen before anything is written: the write
            # would go nowhere, so no answer could ever come.
            conn, _ = await client._acquire(client.target(f"http://127.0.0.1:{port}/"))
            with pytest.raises(ConnectionError):
                await conn.headers_done  # fails as the loss is seen, before any request
            assert conn.closed
            conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(conn.headers_done, TEST_TIMEOUT / 2)
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    run(scenario())


def test_a_dead_pooled_connection_is_retried_once_on_a_fresh_one(run):
    seen: list[int] = []  # one entry per request the server read: its connection's number
    accepted = itertools.count(1)

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers a connection's first request; closes it, unanswered, at its second."""
        number = next(accepted)
        try:
            for turn in range(2):
                await reader.readuntil(b"\r\n\r\n")
                seen.append(number)
                if turn == 1:
                    break
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(first_only, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        client = HTTP1Client()
        try:
            # Three connections at once, each answered once, all pooled afterwards.
            responses = await asyncio.gather(*(client.request("GET", url, {}) for _ in range(3)))
            assert [await resp.read() for resp in responses] == [b"ok"] * 3
            assert len(seen) == 3

            resp = await client.request("GET", url, {})

            assert (resp.status, await resp.read()) == (200, b"ok")
            # Sent on one pooled connection (which the server dropped), then on a fresh one:
            # not again on each of the other pooled ones.
            assert len(seen) == 5
            assert seen[-1] not in seen[:3]
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    run(scenario())
