"""Two Nexus replicas in one process sharing a real ``redis-server`` (``[state] backend =
"redis"``): limits, budgets and keys agree across them, and Redis trouble loses nothing.
The three-process deployment behind haproxy is ``test_deployment.py``."""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from nexus.config import ConfigError, settings_from_dict
from nexus.cost.ledger import month_of
from nexus.keys.tokens import hash_of, new_secret
from nexus.routing.affinity import affinity_keys
from nexus.state.redis_lua import ADMIT
from tests.fakes import FakeOpenAI
from tests.harness import LoopThread, NexusServer, settings_for, wait_for
from tests.integration.test_budget import PricedOpenAI

from .servers import RedisServer

CHAT = "/v1/chat/completions"
ADMIT_SHA = hashlib.sha1(ADMIT.encode()).hexdigest()  # the admission script, as MONITOR shows it
KEY_VAR = "NEXUS_TEST_REPLICA_CLOUD"
IN_USD, OUT_USD = 0.001, 0.002  # per token
PRICE = {"model_pattern": "*", "backend": "cloud", "input_per_mtok": IN_USD * 1e6,
         "output_per_mtok": OUT_USD * 1e6}  # fmt: skip


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def replicas(loop: LoopThread, count: int, redis: RedisServer, upstream: FakeOpenAI,
             **sections: Any) -> list[NexusServer]:  # fmt: skip
    state = {"backend": "redis", "redis_url": redis.url, "flush_interval_seconds": 0.05}
    servers = []
    for _ in range(count):
        settings = settings_for(("local", upstream, "generic"), state=state, **sections)
        servers.append(NexusServer(loop, settings).start())
    return servers


def chat(http: httpx2.Client, server: NexusServer, key: str | None = None,
         **fields: Any) -> httpx2.Response:  # fmt: skip
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return http.post(server.url + CHAT, content=orjson.dumps(body), headers=headers)


def test_a_keys_rpm_holds_across_replicas(loop, redis_server):
    upstream = FakeOpenAI(["m"])
    loop.run(upstream.start())
    secret = new_secret()
    auth = {"enabled": True, "keys": [{"name": "team", "hash": hash_of(secret), "rpm": 7}]}
    servers = replicas(loop, 2, redis_server, upstream, auth=auth)
    try:
        with httpx2.Client(timeout=10) as http:
            answers = [chat(http, servers[i % 2], secret) for i in range(16)]
        statuses = [a.status_code for a in answers]
        assert statuses.count(200) == 7, statuses
        assert statuses.count(429) == 9, statuses
        refused = next(a for a in answers if a.status_code == 429)
        assert float(refused.headers["retry-after"]) > 0
        assert refused.headers["x-ratelimit-limit-requests"] == "7"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert "requests per minute" in refused.json()["error"]["message"]
        served = [a for a in answers if a.status_code == 200]
        remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in served)
        assert remaining == list(range(7))  # one count, whichever replica served
        assert len(upstream.calls(CHAT)) == 7
        # a refused request is refused before anything is written upstream, and is no
        # request of the backend's (its admission is awaited just before the write)
        backends = [server.gateway.registry.get("local") for server in servers]
        assert sum(b.total_requests for b in backends if b is not None) == 7
        assert all(b is not None and b.in_flight == 0 for b in backends)
    finally:
        for server in servers:
            server.stop()
        loop.run(upstream.stop())


def test_a_budget_is_never_exceeded_across_replicas(loop, redis_server, monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-cloud")
    cloud = PricedOpenAI(["m"], usage={"prompt_tokens": 10, "completion_tokens": 100,
                                      "total_tokens": 110})  # fmt: skip
    cloud.delay = 0.05
    loop.run(cloud.start())
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 100})  # fmt: skip
    from nexus.routing.requirements import chat_requirements

    prompt = chat_requirements(orjson.loads(body), {}, len(body)).prompt_bound
    worst = prompt * IN_USD + 100 * OUT_USD
    limit = round(worst * 20 + worst / 2, 6)  # room for 20 worst cases, not 21
    state = {"backend": "redis", "redis_url": redis_server.url, "flush_interval_seconds": 0.05}
    servers = []
    for _ in range(2):
        settings = settings_from_dict({
            "discovery": {"enabled": False, "interfaces": ["127.0.0.1"]},
            "health_check": {"interval_seconds": 3600},
            "embedded": {"enabled": False},
            "state": state,
            "pricing": [PRICE],
            "routing": {"budget": {"monthly_limit_usd": limit, "hard_limit_action": "block_all"}},
            "backends": [{"name": "cloud", "url": cloud.url, "type": "openai",
                          "api_key_env": KEY_VAR}],
        })  # fmt: skip
        servers.append(NexusServer(loop, settings).start())
    try:

        def post(i: int) -> int:
            with httpx2.Client(timeout=30) as http:
                return http.post(
                    servers[i % 2].url + CHAT,
                    content=body,
                    headers={"content-type": "application/json"},
                ).status_code

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(post, range(80)))
        served = statuses.count(200)
        assert served >= 20, statuses
        cost = 10 * IN_USD + 100 * OUT_USD  # what each answer really cost
        client = redis_server.client()
        month = month_of(__import__("time").time())

        def settled() -> float:
            total = client.hget(f"nexus:spend:{month}", "total")
            return int(total or 0) / 1e9

        assert wait_for(lambda: abs(settled() - served * cost) < 1e-6, timeout=10), settled()
        assert settled() <= limit
        assert cloud.answered == served
        reserved = client.hgetall(f"nexus:reserved:{month}")
        assert wait_for(lambda: not client.hgetall(f"nexus:reserved:{month}"), 5), reserved
    finally:
        for server in servers:
            server.stop()
        loop.run(cloud.stop())


def test_a_key_revoked_on_one_replica_is_refused_by_the_other(loop, redis_server):
    upstream = FakeOpenAI(["m"])
    loop.run(upstream.start())
    servers = replicas(loop, 2, redis_server, upstream, auth={"enabled": True})
    try:
        with httpx2.Client(timeout=10) as http:
            made = http.post(servers[0].url + "/admin/keys", json={"name": "ci", "rpm": 100})
            assert made.status_code in (200, 201), made.text
            secret = made.json()["key"]
            assert wait_for(lambda: chat(http, servers[1], secret).status_code == 200, 2)
            gone = http.delete(servers[0].url + "/admin/keys/ci")
            assert gone.status_code in (200, 204), gone.text
            assert wait_for(lambda: chat(http, servers[1], secret).status_code == 401, 1.0)
            assert "revoked" in chat(http, servers[1], secret).json()["error"]["message"]
    finally:
        for server in servers:
            server.stop()
        loop.run(upstream.stop())


def test_a_malformed_redis_url_refuses_to_start():
    for url, says in (("http://127.0.0.1:6379", "redis://"), ("redis://:pw@127.0.0.1", "password"),
                      ("redis://127.0.0.1:99999", "port"), ("redis:///0", "host")):  # fmt: skip
        with pytest.raises((ConfigError, ValueError)) as caught:
            settings_from_dict({"state": {"backend": "redis", "redis_url": url}})
        assert says in str(caught.value).lower(), (url, str(caught.value))
    with pytest.raises((ConfigError, ValueError)) as caught:
        settings_from_dict({"state": {"backend": "redis"}})
    assert "redis_url" in str(caught.value)


def priced_settings(cloud: FakeOpenAI, redis: RedisServer, **budget: Any) -> Any:
    return settings_from_dict({
        "discovery": {"enabled": False, "interfaces": ["127.0.0.1"]},
        "health_check": {"interval_seconds": 3600},
        "embedded": {"enabled": False},
        "state": {"backend": "redis", "redis_url": redis.url, "flush_interval_seconds": 0.05},
        "pricing": [PRICE],
        "routing": {"budget": budget},
        "backends": [{"name": "cloud", "url": cloud.url, "type": "openai",
                      "api_key_env": KEY_VAR}],
    })  # fmt: skip


def test_redis_down_serves_degraded_and_loses_no_spend(loop, redis_server, monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-cloud")
    usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    cloud = PricedOpenAI(["m"], usage=usage)
    loop.run(cloud.start())
    cost = 10 * IN_USD + 20 * OUT_USD
    server = NexusServer(loop, priced_settings(cloud, redis_server, monthly_limit_usd=1000.0,
                                               hard_limit_action="block_all")).start()  # fmt: skip
    client = redis_server.client()
    month = month_of(__import__("time").time())

    def settled() -> float:
        try:
            return int(client.hget(f"nexus:spend:{month}", "total") or 0) / 1e9
        except Exception:
            return -1.0

    try:
        with httpx2.Client(timeout=30) as http:
            assert chat(http, server).status_code == 200
            assert wait_for(lambda: abs(settled() - cost) < 1e-9, 5), settled()
            health = http.get(server.url + "/health").json()
            assert health["state"]["status"] == "ok" and health["status"] == "healthy"
            redis_server.kill()
            down = [chat(http, server).status_code for _ in range(10)]
            assert down == [200] * 10  # served, each replica on its share of the budget
            assert wait_for(lambda: http.get(server.url + "/health").json()["state"]["status"]
                            == "degraded", 5)  # fmt: skip
            health = http.get(server.url + "/health").json()
            assert health["status"] == "degraded"
            assert "out of reach" in health["state"]["reason"]
            metrics = http.get(server.url + "/metrics").text
            assert "nexus_state_degraded 1.0" in metrics
            redis_server.start()  # the same port, its append-only file
            assert wait_for(lambda: http.get(server.url + "/health").json()["state"]["status"]
                            == "ok", 10)  # fmt: skip
            # what was spent while Redis was away is written now: 11 answers, each counted once
            assert wait_for(lambda: abs(settled() - 11 * cost) < 1e-9, 10), settled()
            metrics = http.get(server.url + "/metrics").text
            assert "nexus_state_degraded 0.0" in metrics
            seconds = [line for line in metrics.splitlines()
                       if line.startswith("nexus_state_degraded_seconds_total ")]  # fmt: skip
            assert seconds and float(seconds[0].split()[1]) > 0
    finally:
        server.stop()
        loop.run(cloud.stop())


def socket_to(port: int) -> Any:
    import socket

    return socket.create_connection(("127.0.0.1", port))


class Monitor:
    """Redis's MONITOR on a raw socket: every command the server runs, one line each."""

    def __init__(self, redis: RedisServer) -> None:
        import socket
        import threading

        self.lines: list[str] = []
        self.port = redis.port
        self.sock = socket.create_connection(("127.0.0.1", redis.port))
        self.sock.sendall(b"MONITOR\r\n")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\r\n")
            self.lines.extend(line.decode(errors="replace") for line in lines)

    def calls_of(self, sha: str) -> int:
        """Calls of the script ``sha`` that the server ran so far (every command run before
        this call is seen first: MONITOR's lines come in order, and a marker closes them)."""
        import uuid

        marker = uuid.uuid4().hex
        with socket_to(self.port) as sock:
            sock.sendall(f"ECHO {marker}\r\n".encode())
            sock.recv(256)
        assert wait_for(lambda: any(marker in line for line in self.lines), 5)
        return sum(1 for line in self.lines if f'"EVALSHA" "{sha}"' in line)

    def close(self) -> None:
        self.sock.close()


def test_one_round_trip_for_a_limited_priced_request_and_none_for_the_rest(
    loop, redis_server, monkeypatch
):
    monkeypatch.setenv(KEY_VAR, "sk-cloud")
    cloud = PricedOpenAI(["paid"])
    local = FakeOpenAI(["free"])
    loop.run(cloud.start())
    loop.run(local.start())
    limited, plain = new_secret(), new_secret()
    settings = settings_from_dict({
        "discovery": {"enabled": False, "interfaces": ["127.0.0.1"]},
        "health_check": {"interval_seconds": 3600},
        "embedded": {"enabled": False},
        "state": {"backend": "redis", "redis_url": redis_server.url},
        "pricing": [PRICE],
        "routing": {"budget": {"monthly_limit_usd": 1000.0, "hard_limit_action": "block_all"}},
        "auth": {"enabled": True, "keys": [
            {"name": "limited", "hash": hash_of(limited), "rpm": 1000, "monthly_budget_usd": 50},
            {"name": "plain", "hash": hash_of(plain)},
        ]},
        "backends": [
            {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": KEY_VAR},
            {"name": "local", "url": local.url, "type": "generic"},
        ],
    })  # fmt: skip
    server = NexusServer(loop, settings).start()
    admit = ADMIT_SHA
    monitor = Monitor(redis_server)
    try:
        with httpx2.Client(timeout=10) as http:
            assert chat(http, server, plain, model="free").status_code == 200  # warm
            wait_for(lambda: len(monitor.lines) > 0, 2)
            before = monitor.calls_of(admit)
            for _ in range(10):  # limited and priced: the rate and the budget in one script
                answer = chat(http, server, limited, model="paid", max_tokens=10)
                assert answer.status_code == 200, answer.text
                assert "x-ratelimit-remaining-requests" in answer.headers
            assert monitor.calls_of(admit) - before == 10
            for _ in range(10):  # neither limited nor priced: Redis is not asked
                assert chat(http, server, plain, model="free").status_code == 200
            assert monitor.calls_of(admit) - before == 10
            # worst cases of $32.8 (no max_tokens) against a key budget of $50: one at a time
            # fits, and each is freed in Redis as soon as it ends (not in the next batch): a
            # request sent the instant the last one was answered may find it still held
            for _ in range(5):
                assert wait_for(
                    lambda: chat(http, server, limited, model="paid").status_code == 200, 2
                )
    finally:
        monitor.close()
        server.stop()
        loop.run(cloud.stop())
        loop.run(local.stop())


def test_shared_affinity_sends_a_conversation_back_whichever_replica_gets_it(loop, redis_server):
    first, second = FakeOpenAI(["m"]), FakeOpenAI(["m"])
    loop.run(first.start())
    loop.run(second.start())
    state = {"backend": "redis", "redis_url": redis_server.url}
    servers = [
        NexusServer(loop, settings_for(("a", first, "generic"), ("b", second, "generic"),
                                       state=state, routing={"shared_affinity": True,
                                                             "strategy": "round_robin"})).start()
        for _ in range(2)
    ]  # fmt: skip
    try:
        with httpx2.Client(timeout=10) as http:
            messages = [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "conversation 42"}]  # fmt: skip
            assert chat(http, servers[0], messages=messages).status_code == 200
            served_by = "a" if first.calls(CHAT) else "b"
            fake = first if served_by == "a" else second
            router = servers[1].gateway.dispatcher.router
            keys = tuple(affinity_keys("m", messages, stable=True))
            assert wait_for(lambda: router.affinity.lookup(keys, router.clock()) == served_by, 2)
            for _ in range(4):  # round robin would alternate; affinity holds the backend
                answer = chat(http, servers[1], messages=messages)
                assert answer.status_code == 200
                assert answer.headers["x-nexus-backend"] == served_by
            assert len(fake.calls(CHAT)) == 5
    finally:
        for server in servers:
            server.stop()
        loop.run(first.stop())
        loop.run(second.stop())


def test_nexus_starts_degraded_when_redis_is_down_and_recovers(loop, tmp_path):
    upstream = FakeOpenAI(["m"])
    loop.run(upstream.start())
    redis = RedisServer(tmp_path / "later")  # not started: its port is closed
    server = NexusServer(loop, settings_for(("local", upstream, "generic"),
                                            state={"backend": "redis",
                                                   "redis_url": redis.url})).start()  # fmt: skip
    try:
        with httpx2.Client(timeout=10) as http:
            health = http.get(server.url + "/health").json()
            assert health["status"] == "degraded" and health["state"]["status"] == "degraded"
            assert (
                str(redis.port) in health["state"]["reason"]
                or "out of reach" in (health["state"]["reason"])
            )
            assert chat(http, server).status_code == 200  # serves all the same
            redis.start()
            assert wait_for(lambda: http.get(server.url + "/health").json()["state"]["status"]
                            == "ok", 10)  # fmt: skip
    finally:
        server.stop()
        redis.kill()
        loop.run(upstream.stop())


def test_max_concurrent_holds_across_replicas_and_slots_come_back(loop, redis_server):
    from tests.fakes import Reply, completion

    upstream = FakeOpenAI(["m"])
    loop.run(upstream.start())
    upstream.push(CHAT, *[Reply(json=completion("m"), delay=0.5) for _ in range(2)])
    secret = new_secret()
    auth = {"enabled": True,
            "keys": [{"name": "pair", "hash": hash_of(secret), "max_concurrent": 2}]}  # fmt: skip
    servers = replicas(loop, 2, redis_server, upstream, auth=auth)
    try:

        def post(i: int) -> int:
            with httpx2.Client(timeout=10) as http:
                return chat(http, servers[i % 2], secret).status_code

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            slow = [pool.submit(post, i) for i in range(2)]
            assert wait_for(lambda: len(upstream.calls(CHAT)) == 2, 5)  # both are in flight
            quick = list(pool.map(post, range(4)))
            assert quick == [429] * 4, quick  # the two slots are taken, on either replica
            assert [f.result(timeout=10) for f in slow] == [200, 200]
        with httpx2.Client(timeout=10) as http:  # each slot is given back when its call ends
            assert [chat(http, servers[i % 2], secret).status_code for i in range(6)] == [200] * 6
    finally:
        for server in servers:
            server.stop()
        loop.run(upstream.stop())


def _spend_and_held(client: Any, month: str, name: str = "") -> tuple[int, dict[bytes, bytes]]:
    """The month's settled spend in Redis (nanodollars) and what replicas hold reserved there
    (the key's calls in flight with ``name``)."""
    total = int(client.hget(f"nexus:spend:{month}", "total") or 0)
    held = client.hgetall(f"nexus:conc:{name}" if name else f"nexus:reserved:{month}")
    return total, held


def test_a_guess_that_missed_gives_its_reservation_back_to_the_nanodollar(loop, redis_server):
    import time

    a, b = PricedOpenAI(["paid"]), PricedOpenAI(["paid"])  # usage: 5 prompt, 2 completion
    loop.run(a.start())
    loop.run(b.start())
    prices = [{"model_pattern": "paid", "backend": "a", "input_per_mtok": 1000,
               "output_per_mtok": 2000},
              {"model_pattern": "paid", "backend": "b", "input_per_mtok": 3000,
               "output_per_mtok": 6000}]  # fmt: skip
    spec_a = {"name": "a", "url": a.url, "type": "generic", "priority": 1}
    state = {"backend": "redis", "redis_url": redis_server.url, "flush_interval_seconds": 0.05}
    settings = settings_for(
        state=state, pricing=prices,
        routing={"strategy": "priority_only", "affinity": False,
                 "budget": {"monthly_limit_usd": 1000.0, "hard_limit_action": "block_all"}},
        backends=[spec_a, {"name": "b", "url": b.url, "type": "generic", "priority": 90}],
    )  # fmt: skip
    server = NexusServer(loop, settings).start()
    client, month = redis_server.client(), month_of(time.time())
    admit = ADMIT_SHA
    monitor = Monitor(redis_server)
    try:
        with httpx2.Client(timeout=10) as http:
            assert chat(http, server, model="paid", max_tokens=10).status_code == 200  # warm
            assert wait_for(lambda: monitor.calls_of(admit) == 1, 5)
            served: list[str] = ["a"]
            # a, then b while a is gone (a guess of a: missed), a again (a guess of b: missed)
            for phase, change in enumerate(("", "remove", "add", "remove", "add")):
                if change == "remove":
                    assert http.delete(server.url + "/admin/backends/a").status_code == 200
                elif change == "add":
                    assert http.post(server.url + "/admin/backends", json=spec_a).status_code == 201
                for _ in range(3):
                    answer = chat(http, server, model="paid", max_tokens=10)
                    assert answer.status_code == 200, (phase, answer.text)
                    served.append(answer.headers["x-nexus-backend"])
            assert served == ["a"] * 4 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3, served
            # one script per request, and one more for each of the 4 guesses that missed
            assert wait_for(lambda: monitor.calls_of(admit) == 16 + 4, 5), monitor.calls_of(admit)
            # a route that changes at every request is not guessed: one script each, but for
            # the first change (a guess of the steady route before it, missed)
            for change in ("remove", "add", "remove", "add"):
                if change == "remove":
                    assert http.delete(server.url + "/admin/backends/a").status_code == 200
                else:
                    assert http.post(server.url + "/admin/backends", json=spec_a).status_code == 201
                answer = chat(http, server, model="paid", max_tokens=10)
                assert answer.status_code == 200, answer.text
                served.append(answer.headers["x-nexus-backend"])
            assert served[-4:] == ["b", "a", "b", "a"], served
            assert monitor.calls_of(admit) == 20 + 4 + 1
            cost = {"a": 9_000_000, "b": 27_000_000}  # nanodollars: 5 and 2 tokens at their prices
            spent = sum(cost[name] for name in served)
            assert wait_for(lambda: _spend_and_held(client, month) == (spent, {}), 5), (
                _spend_and_held(client, month), spent)  # fmt: skip
            budget = http.get(server.url + "/v1/stats").json()["budget"]
            assert budget["reserved_usd"] == 0, budget
            meter = server.gateway.dispatcher.meter
            assert meter is not None and meter.ledger.open_reservations == 0
    finally:
        monitor.close()
        server.stop()
        loop.run(a.stop())
        loop.run(b.stop())


@pytest.mark.parametrize(
    ("queue", "leaves"),
    [
        ({"enabled": False}, False),
        ({"max_wait_seconds": 1}, False),
        ({"max_wait_seconds": 30}, True),
    ],
    ids=["queue-off", "queue-waited-out", "client-left-the-queue"],
)
def test_an_admission_asked_for_a_request_never_dispatched_gives_its_slot_back(
    loop, redis_server, queue, leaves
):
    import time

    from tests.fakes import Reply, completion

    cloud = PricedOpenAI(["paid"])
    loop.run(cloud.start())
    one, other = new_secret(), new_secret()
    state = {"backend": "redis", "redis_url": redis_server.url, "flush_interval_seconds": 0.05}
    settings = settings_for(
        state=state, pricing=[PRICE], queue=queue,
        routing={"budget": {"monthly_limit_usd": 1000.0, "hard_limit_action": "block_all"}},
        auth={"enabled": True, "keys": [
            {"name": "one", "hash": hash_of(one), "max_concurrent": 1},
            {"name": "other", "hash": hash_of(other)},
        ]},
        backends=[{"name": "cloud", "url": cloud.url, "type": "generic", "max_concurrent": 1}],
    )  # fmt: skip
    server = NexusServer(loop, settings).start()
    client, month = redis_server.client(), month_of(time.time())
    admit = ADMIT_SHA
    monitor = Monitor(redis_server)
    try:
        with (
            httpx2.Client(timeout=30) as http,
            httpx2.Client(timeout=30) as side,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            for _ in range(2):  # the same first step twice: the next is asked before its plan
                assert chat(http, server, one, model="paid", max_tokens=10).status_code == 200
            cloud.push(CHAT, Reply(json=completion("paid"), delay=4))  # holds the one slot
            slow = pool.submit(chat, side, server, other, model="paid")
            assert wait_for(lambda: len(cloud.calls(CHAT)) == 3, 5)
            assert wait_for(lambda: monitor.calls_of(admit) == 3, 5)
            if leaves:  # it waits in the queue, and its client goes away
                with httpx2.Client(timeout=1) as brief, pytest.raises(httpx2.TimeoutException):
                    chat(brief, server, one, model="paid", max_tokens=10)
            else:
                busy = chat(http, server, one, model="paid", max_tokens=10)
                assert busy.status_code == 503, busy.text  # planned out: the backend is busy
            assert wait_for(lambda: monitor.calls_of(admit) == 4, 5)  # asked before the plan
            # what the early admission took (the key's one slot, a reservation) comes back
            assert wait_for(lambda: not _spend_and_held(client, month, "one")[1], 5), (
                _spend_and_held(client, month, "one"))  # fmt: skip
            assert slow.result(timeout=30).status_code == 200
            backend = server.gateway.registry.get("cloud")
            assert backend is not None and wait_for(lambda: backend.in_flight == 0, 5)
            again = chat(http, server, one, model="paid", max_tokens=10)
            assert again.status_code == 200, again.text  # not 429: its max_concurrent is free
            assert wait_for(lambda: not _spend_and_held(client, month)[1], 5), (
                _spend_and_held(client, month))  # fmt: skip
            stats = http.get(server.url + "/v1/stats").json()
            assert stats["budget"]["reserved_usd"] == 0, stats["budget"]
            assert [k["in_flight"] for k in stats["keys"] if k["name"] == "one"] == [0], stats
            assert len(cloud.calls(CHAT)) == 4  # the request that was not served reached none
    finally:
        monitor.close()
        server.stop()
        loop.run(cloud.stop())


def test_a_step_the_shared_budget_refuses_sends_nothing_and_the_next_one_serves(
    loop, redis_server, monkeypatch
):
    monkeypatch.setenv(KEY_VAR, "sk-cloud")
    cloud, local = PricedOpenAI(["m"]), FakeOpenAI(["m"])
    loop.run(cloud.start())
    loop.run(local.start())
    # the cloud's worst case (16 output tokens at $0.002) does not fit in $0.01
    budget = {"monthly_limit_usd": 0.01, "hard_limit_action": "block_cloud"}
    settings = settings_for(
        state={"backend": "redis", "redis_url": redis_server.url}, pricing=[PRICE],
        routing={"strategy": "priority_only", "affinity": False, "budget": budget},
        backends=[{"name": "cloud", "url": cloud.url, "type": "openai", "priority": 1,
                   "api_key_env": KEY_VAR},
                  {"name": "local", "url": local.url, "type": "generic", "priority": 50}],
    )  # fmt: skip
    server = NexusServer(loop, settings).start()
    try:
        with httpx2.Client(timeout=10) as http:
            # the first asks at its first step; the next ones before their plan, for the cloud
            for _ in range(3):
                answer = chat(http, server, max_tokens=16)
                assert answer.status_code == 200, answer.text
                assert answer.headers["x-nexus-backend"] == "local"
                assert answer.headers["x-nexus-route-reason"] == "budget-limit"
        assert cloud.calls(CHAT) == [] and len(local.calls(CHAT)) == 3
        backend = server.gateway.registry.get("cloud")
        assert backend is not None and backend.total_requests == 0 and backend.in_flight == 0
        client = redis_server.client()
        month = month_of(__import__("time").time())
        assert not client.hgetall(f"nexus:reserved:{month}")  # nothing held for a refusal
    finally:
        server.stop()
        loop.run(cloud.stop())
        loop.run(local.stop())
