"""The shared state's scripts and the request path's Redis client, against a real redis-server:
the minute's slots, refusals and retries, the budget's holdings, dead replicas, batches counted
once, and the client's pipelining, errors and reconnection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from nexus.state.redis_lua import ADMIT, KEY_USAGE, LEASE, SETTLE
from nexus.state.resp import ReplyError, RespClient, Script

from .servers import RedisServer

P = "t:"
MONTH = "2026-12"
NONE: dict[str, list[Any]] = {"reserved": [], "keyres": [], "conc": []}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def admit(
    client: RespClient,
    me: str,
    name: str,
    rpm: int = 0,
    tpm: int = 0,
    conc: int = 0,
    worst: int = 0,
    limit: int = -1,
    key_limit: int = -1,
) -> list[Any]:
    numbers = f"{rpm} {tpm} {conc} {worst} {limit} {key_limit}"
    got: bytes = await client.run(Script(ADMIT), P, me, MONTH, name, numbers)
    return [int(value) for value in got.split()]


async def lease(client: RespClient, me: str, held: dict[str, list[Any]] = NONE) -> list[Any]:
    got: list[Any] = await client.run(Script(LEASE), P, me, 10_000, orjson.dumps(held))
    return got


def test_a_minute_drops_its_old_slots_and_says_when_to_retry(redis_server):
    async def scenario() -> None:
        client = RespClient("127.0.0.1", redis_server.port)
        now = int(time.time())
        # 5 requests 70 s ago (gone), 3 requests 30 s ago (still in the minute)
        await client.call("HSET", P + "rpm:k", now - 70, 5, now - 30, 3, "t", 8, "o", now - 70)
        got = await admit(client, "a", "k", rpm=4)
        assert got[0] == 0 and got[2] == 0  # admitted: 3 + 1 of 4, none left
        assert 29_000 <= got[3] <= 32_000  # the oldest slot (30 s ago) leaves in about 31 s
        refused = await admit(client, "a", "k", rpm=4)
        assert refused[0] == 1 and 29_000 <= refused[7] <= 32_000  # retry when 1 has left
        fields = await client.call("HGETALL", P + "rpm:k")
        assert str(now - 70).encode() not in fields[::2]
        await client.aclose()

    run(scenario())


def test_the_budget_counts_what_live_replicas_hold_and_drops_the_dead(redis_server):
    async def scenario() -> None:
        client = RespClient("127.0.0.1", redis_server.port)
        await lease(client, "a")
        await lease(client, "b")
        assert (await admit(client, "a", "", worst=60, limit=100))[1] == 0
        assert (await admit(client, "b", "", worst=60, limit=100))[1] == 1  # 60 + 60 > 100
        # "a" dies: its lease runs out, and what it held no longer counts
        await client.call("ZADD", P + "replicas", 0, "a")
        got = await admit(client, "b", "", worst=60, limit=100)
        assert got[1] == 0 and int(got[9]) == 60 and got[10] == 1
        await client.aclose()

    run(scenario())


def test_a_settled_batch_frees_and_counts_once_however_often_it_is_sent(redis_server):
    async def scenario() -> None:
        client = RespClient("127.0.0.1", redis_server.port)
        await lease(client, "a")
        assert (await admit(client, "a", "", worst=50, limit=100))[1] == 0
        batch = orjson.dumps({"id": "b1", "me": "a", "spend": [[MONTH, "cloud", "m", 20, 1, 5, 2]],
                              "release": [[MONTH, 50]]})  # fmt: skip
        for _ in range(3):  # an answer lost twice: sent three times
            assert int(await client.run(Script(SETTLE), P, batch)) == 20
        assert await client.call("HGET", P + f"spend:{MONTH}", "total") == b"20"
        assert await client.call("HGETALL", P + f"reserved:{MONTH}") == []
        usage = orjson.dumps({"id": "u1", "me": "a", "month": MONTH,
                              "keys": [["k", 1, 5, 2, 20, MONTH, 0, 0, 7]]})  # fmt: skip
        for _ in range(2):
            await client.run(Script(KEY_USAGE), P, usage)
        assert await client.call("HGET", P + f"keyusage:{MONTH}", "r\tk") == b"1"
        assert await client.call("HGET", P + "tpm:k", "t") == b"7"
        await client.aclose()

    run(scenario())


def test_the_client_pipelines_reports_errors_and_reconnects(redis_server):
    async def scenario() -> None:
        client = RespClient("127.0.0.1", redis_server.port, timeout=2)
        answers = await asyncio.gather(*(client.call("ECHO", f"v{i}") for i in range(500)))
        assert answers == [f"v{i}".encode() for i in range(500)]  # in order, on one connection
        with pytest.raises(ReplyError, match="WRONGTYPE"):
            await client.call("SET", "s", "x")
            await client.call("HGET", "s", "f")
        assert await client.call("GET", "s") == b"x"  # an error reply does not break it
        redis_server.kill()
        with pytest.raises(ConnectionError):
            await client.call("PING")
        redis_server.start()
        assert await client.call("PING") == b"PONG"
        assert await client.run(Script("return 7")) == 7  # loaded again after the restart
        await client.aclose()

    run(scenario())


def test_the_client_gives_up_on_a_silent_server(tmp_path):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers

    async def scenario() -> None:
        client = RespClient("127.0.0.1", silent.getsockname()[1], timeout=0.3)
        with pytest.raises(ConnectionError, match="no answer"):
            await client.call("PING")
        await client.aclose()

    try:
        run(scenario())
    finally:
        silent.close()
