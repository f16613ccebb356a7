"""A client key's limits hold from outside (issue 12, points 2 and 7): rpm under 200 concurrent
requests, a monthly budget under concurrency (the cloud refused, a free local backend serving
the rest), tpm counted from real usage, max_concurrent with calls held in flight, and the
admin API's rules on ``/admin/keys``.

The fakes hold their answers until the test lets them go: every request is then truly in flight
at once, so a limit that is checked but counted too late would let more through, and the count
the upstream received is exact.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import orjson
import pytest
from aiohttp import web

from nexus.registry import Status
from nexus.routing.requirements import chat_requirements
from tests.fakes import FakeOpenAI, Reply
from tests.harness import NexusServer, data_events, settings_for, wait_for
from tests.integration.test_budget import PRICE, SHARED, PricedOpenAI, body_of, worst_case

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
CLOUD_KEY_VAR = "NEXUS_TEST_KEY_LIMITS_CLOUD"
DEADLINE = 30.0


class HeldOpenAI(PricedOpenAI):
    """Bills ``usage`` on every chat answer, like the budget tests' fake, and holds every chat
    answer until ``release`` (it records the call as it arrives, before holding it)."""

    def __init__(self, models: list[str], usage: dict[str, Any] | None = None) -> None:
        super().__init__(models, usage)
        self.gate = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await super().start()

    def hold(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.gate.clear)

    def release(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.gate.set)

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if request.path == CHAT:
            await self.gate.wait()
        return await super()._answer(request, reply)


def headers_for(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "content-type": "application/json"}


def create(client: httpx2.Client, nexus: NexusServer, **settings: Any) -> str:
    resp = client.post(nexus.url + "/admin/keys", json=settings)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])


async def until(condition: Callable[[], bool], within: float = DEADLINE) -> bool:
    """Check ``condition`` until it holds or ``within`` seconds pass (inside a client loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            return condition()
        await asyncio.sleep(0.01)
    return True


async def burst(
    url: str,
    raw: bytes,
    headers: dict[str, str],
    count: int,
    settled: Callable[[list[httpx2.Response]], bool],
    release: Callable[[], None],
) -> tuple[bool, list[httpx2.Response]]:
    """``count`` requests at once; once ``settled`` holds for the answers back so far (the
    refusals, while the admitted ones are held upstream), ``release`` the fake. Answers whether
    that state was reached, and every answer."""
    limits = httpx2.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as http:
        back: list[httpx2.Response] = []

        async def one() -> httpx2.Response:
            resp = await http.post(url + CHAT, content=raw, headers=headers)
            back.append(resp)
            return resp

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        reached = await until(lambda: settled(back))
        release()
        answers: list[httpx2.Response] = await asyncio.gather(*tasks)
        return reached, answers


def scripted(fake: FakeOpenAI, reply: Reply, send: Callable[[], object]) -> Callable[[], object]:
    """An ending: the fake answers the next call with ``reply``; then ``send`` makes that call."""

    def end() -> object:
        fake.push(CHAT, reply)
        return send()

    return end


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- rpm under concurrency (issue point 7) ------------------------------------------------------

RPM = 50
CONCURRENT = 200


def test_200_concurrent_requests_on_a_50_rpm_key_pass_exactly_50(start_fake, start_nexus, client):
    fake = start_fake(HeldOpenAI(["m"]))
    fake.release()
    backend = {"name": "local", "url": fake.url, "type": "vllm", "max_concurrent": 1000}
    nexus = start_nexus(settings_for(backends=[backend], auth={"enabled": True}))
    secret = create(client, nexus, name="ci", rpm=RPM)
    fake.hold()
    raw = orjson.dumps({"model": "m", "messages": HI})

    def settled(back: list[httpx2.Response]) -> bool:
        # 150 refusals are back while the 50 admitted calls are all held at the fake.
        return len(back) >= CONCURRENT - RPM and len(fake.calls(CHAT)) >= RPM

    reached, answers = run(burst(nexus.url, raw, headers_for(secret), CONCURRENT, settled,
                                 fake.release))  # fmt: skip
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) == RPM, statuses
    assert statuses.count(429) == CONCURRENT - RPM, statuses
    assert reached  # the refusals came while every admitted call was in flight upstream
    assert len(fake.calls(CHAT)) == RPM
    for resp in answers:
        if resp.status_code == 429:
            assert int(resp.headers["retry-after"]) >= 1
            assert resp.headers["x-ratelimit-remaining-requests"] == "0"
            assert resp.headers["x-ratelimit-limit-requests"] == str(RPM)
            assert resp.json()["error"]["code"] == "rate_limit_exceeded"
            assert "requests per minute" in resp.json()["error"]["message"]
        else:
            assert resp.headers["x-ratelimit-limit-requests"] == str(RPM)
    # The window is full: the next request is refused as well, and nothing more goes upstream.
    late = client.post(nexus.url + CHAT, content=raw, headers=headers_for(secret))
    assert late.status_code == 429
    assert len(fake.calls(CHAT)) == RPM


# --- a budget key under concurrency (issue point 7) ---------------------------------------------

ROOM = 8  # worst-case requests the key's budget has room for
BUDGET_CONCURRENT = 120


def priced_nexus(
    start_fake: Any,
    start_nexus: Any,
    monkeypatch: Any,
    local: bool,
    usage: dict[str, Any],
    **sections: Any,
) -> tuple[NexusServer, HeldOpenAI, FakeOpenAI | None]:
    monkeypatch.setenv(CLOUD_KEY_VAR, "sk-key-limits-cloud")
    cloud = start_fake(HeldOpenAI([SHARED], usage))
    cloud.release()
    backends: list[dict[str, Any]] = [
        {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": CLOUD_KEY_VAR,
         "priority": 1, "max_concurrent": 1000},
    ]  # fmt: skip
    local_fake = None
    if local:
        local_fake = start_fake(FakeOpenAI([SHARED]))
        backends.append({"name": "local", "url": local_fake.url, "type": "vllm",
                         "priority": 90, "max_concurrent": 1000})  # fmt: skip
    settings = settings_for(
        backends=backends,
        pricing=[PRICE],
        routing={"strategy": "priority_only"},
        auth={"enabled": True},
        **sections,
    )
    nexus = start_nexus(settings)
    registry = nexus.gateway.registry
    assert wait_for(lambda: all(b.status is Status.HEALTHY for b in registry)), [
        b.last_error for b in registry
    ]
    return nexus, cloud, local_fake


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("local", [False, True], ids=["cloud-only", "local-too"])
def test_a_budget_key_under_concurrency_never_spends_past_its_budget(
    start_fake, start_nexus, client, monkeypatch, local, stream
):
    """Room for ROOM worst cases, BUDGET_CONCURRENT requests at once, the cloud's answers held:
    the cloud gets exactly ROOM calls; the others are refused 429 insufficient_quota (or, with
    a free local backend beside it, served there); the key's cost never passes its budget."""
    max_tokens = 8
    raw = body_of(SHARED, max_tokens=max_tokens, stream=stream)
    worst = worst_case(raw, max_tokens)
    prompt_tokens = chat_requirements(orjson.loads(raw), {}, len(raw)).prompt_bound
    # The fake bills the worst case: a settled call frees no room for another.
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
             "total_tokens": prompt_tokens + max_tokens}  # fmt: skip
    nexus, cloud, local_fake = priced_nexus(start_fake, start_nexus, monkeypatch, local, usage)
    budget = worst * (ROOM + 0.5)
    secret = create(client, nexus, name="team", monthly_budget_usd=budget)
    cloud.hold()

    def settled(back: list[httpx2.Response]) -> bool:
        return len(back) >= BUDGET_CONCURRENT - ROOM and len(cloud.calls(CHAT)) >= ROOM

    reached, answers = run(burst(nexus.url, raw, headers_for(secret), BUDGET_CONCURRENT,
                                 settled, cloud.release))  # fmt: skip
    assert len(cloud.calls(CHAT)) == ROOM
    assert reached
    ok = [a for a in answers if a.status_code == 200]
    for resp in ok:
        assert not stream or data_events(resp.text)[-1] == "[DONE]"
    on_cloud = [a for a in ok if a.headers["x-nexus-backend"] == "cloud"]
    assert len(on_cloud) == ROOM
    if local:
        assert local_fake is not None
        assert len(ok) == BUDGET_CONCURRENT, sorted({a.status_code for a in answers})
        assert len(local_fake.calls(CHAT)) == BUDGET_CONCURRENT - ROOM
        assert {a.headers["x-nexus-backend"] for a in ok if a not in on_cloud} == {"local"}
    else:
        refused = [a for a in answers if a.status_code != 200]
        assert len(refused) == BUDGET_CONCURRENT - ROOM
        for resp in refused:
            assert resp.status_code == 429, resp.text
            assert resp.json()["error"]["code"] == "insufficient_quota"
            assert "monthly_budget_usd" in resp.json()["error"]["message"]
            assert int(resp.headers["retry-after"]) >= 1

    # Settled: the key's cost is its ROOM calls' (each billed its worst case), never past it.
    def view() -> dict[str, Any]:
        shown: dict[str, Any] = client.get(nexus.url + "/admin/keys/team").json()
        return shown

    assert wait_for(lambda: view()["usage"]["cost_usd"] == pytest.approx(ROOM * worst))
    assert view()["usage"]["cost_usd"] <= budget
    own = client.get(nexus.url + "/v1/usage", headers=headers_for(secret))
    assert own.status_code == 200, own.text
    assert own.json()["usage"]["cost_usd"] == pytest.approx(ROOM * worst)
    assert own.json()["remaining"]["monthly_budget_usd"] == pytest.approx(budget - ROOM * worst)
    # Half a worst case left: the next request does not reach the cloud either.
    after = client.post(nexus.url + CHAT, content=raw, headers=headers_for(secret))
    assert after.status_code == (200 if local else 429), after.text
    assert len(cloud.calls(CHAT)) == ROOM


# --- tpm from real usage, and max_concurrent ---------------------------------------------------


def test_tpm_counts_real_usage_and_refuses_once_reached(start_fake, start_nexus, client):
    usage = {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40}
    fake = start_fake(HeldOpenAI(["m"], usage))
    fake.release()
    backend = {"name": "local", "url": fake.url, "type": "vllm"}
    nexus = start_nexus(settings_for(backends=[backend], auth={"enabled": True}))
    secret = create(client, nexus, name="tokens", tpm=100)
    raw = orjson.dumps({"model": "m", "messages": HI})

    def remaining() -> int:
        resp = client.get(nexus.url + "/v1/usage", headers=headers_for(secret))
        return int(resp.json()["remaining"]["tokens_this_minute"])

    seen = []
    for expected_after in (60, 20, 0):  # 40 real tokens each: 100, 60, 20 left before each
        resp = client.post(nexus.url + CHAT, content=raw, headers=headers_for(secret))
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-ratelimit-limit-tokens"] == "100"
        seen.append(int(resp.headers["x-ratelimit-remaining-tokens"]))
        assert wait_for(lambda e=expected_after: remaining() == e), remaining()  # type: ignore[misc]
    # What an answer shows was counted before its own usage was known: 100, then 60, then 20.
    assert seen == [100, 60, 20]
    refused = client.post(nexus.url + CHAT, content=raw, headers=headers_for(secret))
    assert refused.status_code == 429, refused.text
    message = refused.json()["error"]["message"]
    assert "tokens per minute" in message and "120 used" in message
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(refused.headers["retry-after"]) >= 1
    assert len(fake.calls(CHAT)) == 3
    usage_view = client.get(nexus.url + "/admin/keys/tokens").json()["usage"]
    assert usage_view["total_tokens"] == 120 and usage_view["requests"] == 3


def test_max_concurrent_refuses_a_third_call_while_two_are_in_flight(
    start_fake, start_nexus, client
):
    fake = start_fake(HeldOpenAI(["m"]))
    fake.release()
    backend = {"name": "local", "url": fake.url, "type": "vllm"}
    nexus = start_nexus(settings_for(backends=[backend], auth={"enabled": True}))
    secret = create(client, nexus, name="pair", max_concurrent=2)
    raw = orjson.dumps({"model": "m", "messages": HI})
    fake.hold()
    held: list[httpx2.Response] = []

    def send() -> None:
        with httpx2.Client(timeout=30) as own:
            held.append(own.post(nexus.url + CHAT, content=raw, headers=headers_for(secret)))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: len(fake.calls(CHAT)) == 2)
        third = client.post(nexus.url + CHAT, content=raw, headers=headers_for(secret))
        assert third.status_code == 429, third.text
        assert "max_concurrent" in third.json()["error"]["message"]
        assert int(third.headers["retry-after"]) >= 1
        assert held == []  # the two were still in flight when the third was refused
        assert len(fake.calls(CHAT)) == 2
        in_flight = client.get(nexus.url + "/admin/keys/pair").json()["in_flight"]
        assert in_flight == 2
    finally:
        fake.release()
        for thread in threads:
            thread.join(timeout=DEADLINE)
    assert [r.status_code for r in held] == [200, 200]
    assert wait_for(lambda: client.get(nexus.url + "/admin/keys/pair").json()["in_flight"] == 0)
    after = client.post(nexus.url + CHAT, content=raw, headers=headers_for(secret))
    assert after.status_code == 200, after.text


# --- the admin API's rules on /admin/keys (issue point 3) ---------------------------------------

ADMIN_VAR = "NEXUS_TEST_KEYS_ADMIN"
ADMIN_KEY = "admin-secret-for-key-tests-0123"
CONFIG_SECRET = "nx-config-declared-for-admin-rules-0123456789abc"


@pytest.fixture
def admin_nexus(start_fake, start_nexus, monkeypatch) -> NexusServer:
    from nexus.keys.tokens import hash_of

    monkeypatch.setenv(ADMIN_VAR, ADMIN_KEY)
    fake = start_fake(FakeOpenAI(["m"]))
    settings = settings_for(
        backends=[{"name": "local", "url": fake.url, "type": "vllm"}],
        server={"admin_key_env": ADMIN_VAR},
        auth={"enabled": True, "keys": [{"name": "gitops", "hash": hash_of(CONFIG_SECRET)}]},
    )
    server: NexusServer = start_nexus(settings)
    return server


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_admin_keys_needs_the_admin_key_when_one_is_set(admin_nexus, client):
    url = admin_nexus.url + "/admin/keys"
    wrong_ones: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"x-api-key": ADMIN_KEY},
        {"Authorization": ADMIN_KEY},
        {"Authorization": f"Bearer {CONFIG_SECRET}"},
    ]
    for headers in wrong_ones:
        for method, path, body in (
            ("GET", "", None),
            ("POST", "", {"name": "sneaky"}),
            ("GET", "/gitops", None),
            ("PATCH", "/gitops", {"rpm": 1}),
            ("DELETE", "/gitops", None),
        ):
            resp = client.request(method, url + path, json=body, headers=headers)
            assert resp.status_code == 401, (headers, method, path, resp.text)
            assert resp.json()["error"]["type"] == "authentication_error"
    assert all(k.name != "sneaky" for k in admin_nexus.gateway.keys or [])
    listing = client.get(url, headers=ADMIN)
    assert listing.status_code == 200
    assert [k["name"] for k in listing.json()["data"]] == ["gitops"]
    made = client.post(url, json={"name": "made"}, headers=ADMIN)
    assert made.status_code == 201, made.text
    secret = made.json()["key"]
    # The admin key is not a client key; a created key is not an admin key.
    chat = {"model": "m", "messages": HI}
    as_client = client.post(admin_nexus.url + CHAT, json=chat, headers=ADMIN)
    assert as_client.status_code == 401, as_client.text
    assert (
        client.post(admin_nexus.url + CHAT, json=chat, headers=headers_for(secret)).status_code
        == 200
    )
    assert client.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_admin_keys_validation_and_conflicts(admin_nexus, client):
    url = admin_nexus.url + "/admin/keys"

    def call(method: str, path: str = "", body: Any = None) -> httpx2.Response:
        resp: httpx2.Response = client.request(method, url + path, json=body, headers=ADMIN)
        return resp

    def refused(resp: httpx2.Response, status: int, param: str | None) -> str:
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        if param is not None:
            assert error["param"] == param, error
            assert param in error["message"], error
        return str(error["message"])

    assert call("POST", body={"name": "alpha", "rpm": 5}).status_code == 201
    # POST: a taken name (live, or a config key's), a bad name, a bad expiry, a negative limit.
    refused(call("POST", body={"name": "alpha"}), 409, "name")
    refused(call("POST", body={"name": "gitops"}), 409, "name")
    refused(call("POST", body={"name": "bad name!"}), 400, "name")
    refused(call("POST", body={"name": "x" * 65}), 400, "name")
    refused(call("POST", body={}), 400, "name")
    refused(call("POST", body={"name": "t", "expires_at": "2030-01-01T00:00:00"}), 400,
            "expires_at")  # fmt: skip
    refused(call("POST", body={"name": "t", "rpm": -1}), 400, "rpm")
    refused(call("POST", body={"name": "t", "monthly_budget_usd": -5}), 400, "monthly_budget_usd")
    refused(call("POST", body={"name": "t", "max_zone": "everywhere"}), 400, "max_zone")
    refused(call("POST", body={"name": "t", "colour": "red"}), 400, "colour")
    refused(call("POST", body=["not", "an", "object"]), 400, None)
    big = orjson.dumps({"name": "big", "owner": "o" * (65 * 1024)})
    resp = client.post(url, content=big, headers={**ADMIN, "content-type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert call("GET", "/big").status_code == 404
    # PATCH: an unknown field, a new name, a config key, a revoked key, a bad value.
    refused(call("PATCH", "/alpha", {"colour": "red"}), 400, "colour")
    refused(call("PATCH", "/alpha", {"name": "beta"}), 400, "name")
    refused(call("PATCH", "/alpha", {"rpm": 0}), 400, "rpm")
    assert "gitops" in refused(call("PATCH", "/gitops", {"rpm": 1}), 409, None)
    assert call("GET", "/alpha").json()["rpm"] == 5  # the refused changes changed nothing
    assert call("PATCH", "/alpha", {"rpm": 7}).json()["rpm"] == 7
    assert call("DELETE", "/alpha").status_code == 200
    assert "revoked" in refused(call("PATCH", "/alpha", {"rpm": 9}), 409, None)
    refused(call("DELETE", "/gitops"), 409, None)
    # Unknown names.
    for method in ("GET", "PATCH", "DELETE"):
        resp = call(method, "/nope", {"rpm": 1} if method == "PATCH" else None)
        assert resp.status_code == 404, (method, resp.text)
        assert "nope" in resp.json()["error"]["message"]
    # A revoked name may be taken again by a new key (the old secret stays refused).
    assert call("POST", body={"name": "alpha"}).status_code == 201


@pytest.mark.parametrize("taken_before", [False, True], ids=["new-name", "revoked-name"])
def test_concurrent_creates_of_one_name_make_one_key(
    admin_nexus, client, monkeypatch, taken_before
):
    """Twenty POSTs of one name at once (a new name, or one whose key was revoked): one key is
    made (201), the rest are 409. Were two made, all but the last would stay valid by their hash
    but be listed, shown and revoked nowhere: keys no one could revoke."""
    url = admin_nexus.url + "/admin/keys"
    if taken_before:
        assert client.post(url, json={"name": "race"}, headers=ADMIN).status_code == 201
        assert client.delete(url + "/race", headers=ADMIN).status_code == 200

    # A slow disk: the first key written is held there until the other POSTs are answered (or
    # a few seconds pass), so every POST is in the handler while a create is under way.
    ring = admin_nexus.gateway.keys
    assert ring is not None and ring.store is not None
    store, put_key, disk = ring.store, ring.store.put_key, threading.Event()

    def slow_put_key(key: Any) -> None:
        disk.wait(DEADLINE)
        put_key(key)

    monkeypatch.setattr(store, "put_key", slow_put_key)

    async def race() -> list[httpx2.Response]:
        limits = httpx2.Limits(max_connections=20, max_keepalive_connections=20)
        async with httpx2.AsyncClient(timeout=60, limits=limits) as http:
            back: list[httpx2.Response] = []

            async def post() -> httpx2.Response:
                back.append(await http.post(url, json={"name": "race"}, headers=ADMIN))
                return back[-1]

            tasks = [asyncio.ensure_future(post()) for _ in range(20)]
            await until(lambda: len(back) >= 19, within=5)
            disk.set()
            return list(await asyncio.gather(*tasks))

    answers = run(race())
    made = [a.json()["key"] for a in answers if a.status_code == 201]
    assert client.delete(url + "/race", headers=ADMIN).status_code == 200
    chat = {"model": "m", "messages": HI}
    served = [
        secret
        for secret in made
        if client.post(admin_nexus.url + CHAT, json=chat, headers=headers_for(secret)).status_code
        == 200
    ]
    assert len(made) == 1, f"{len(made)} keys made for one name; {len(served)} serve after DELETE"
    assert sorted(a.status_code for a in answers) == [201] + [409] * 19
    assert served == []


# --- models and max_zone hold on every inference route ------------------------------------------

ROUTES = {
    "chat": (CHAT, {"model": "{model}", "messages": HI}),
    "embeddings": ("/v1/embeddings", {"model": "{model}", "input": "x"}),
    "responses": ("/v1/responses", {"model": "{model}", "input": "x"}),
    "messages": ("/v1/messages", {"model": "{model}", "max_tokens": 8, "messages": HI}),
    "count_tokens": ("/v1/messages/count_tokens", {"model": "{model}", "messages": HI}),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_keys_reach_holds_on_every_inference_route(
    start_fake, start_nexus, client, monkeypatch, route
):
    """A restricted key's prompt never reaches an open-zone backend, and a model outside a key's
    globs is a 403, on every route that takes a prompt: count_tokens sends the prompt to
    Anthropic to be counted, so it is a route like the others."""
    from tests.cloud_fakes import FakeClaude

    monkeypatch.setenv(CLOUD_KEY_VAR, "sk-key-limits-cloud")
    claude = start_fake(FakeClaude(["claude-x"]))
    cloud = start_fake(FakeOpenAI(["cloud-m"]))
    nexus = start_nexus(
        settings_for(
            backends=[
                {
                    "name": "claude",
                    "url": claude.url,
                    "type": "anthropic",
                    "api_key_env": CLOUD_KEY_VAR,
                },
                {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": CLOUD_KEY_VAR},
            ],  # fmt: skip
            auth={"enabled": True},
        )
    )
    registry = nexus.gateway.registry
    assert wait_for(lambda: all(b.healthy for b in registry)), [b.last_error for b in registry]
    private = create(client, nexus, name="private", max_zone="restricted")
    narrow = create(client, nexus, name="narrow", models=["local-*"])
    path, template = ROUTES[route]
    model = "claude-x" if route in ("messages", "count_tokens") else "cloud-m"
    body = orjson.loads(orjson.dumps(template).replace(b"{model}", model.encode()))

    def generations() -> int:
        probes = ("/v1/models", "/v1/models?limit=1000")
        return sum(1 for f in (claude, cloud) for r in f.requests if r.path not in probes)

    resp = client.post(nexus.url + path, json=body, headers=headers_for(private))
    assert generations() == 0, [(r.path, r.raw[:100]) for f in (claude, cloud) for r in f.requests]
    if route != "count_tokens":  # Anthropic's envelope says 529 where OpenAI's says 503
        assert resp.status_code in (503, 529), resp.text
        assert "max_zone 'restricted'" in resp.text, resp.text
    resp = client.post(nexus.url + path, json=body, headers=headers_for(narrow))
    assert resp.status_code == 403, resp.text
    assert "local-*" in resp.text
    assert generations() == 0


# --- tpm counts every kind of answer -------------------------------------------------------------

USAGE_40 = {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40}
COUNTED = {  # route, body, tokens the fake reports for it
    "chat": (CHAT, {"model": "m", "messages": HI}, 40),
    "chat-stream": (CHAT, {"model": "m", "messages": HI, "stream": True}, 40),
    "responses": ("/v1/responses", {"model": "m", "input": "hi"}, 40),
    "responses-stream": ("/v1/responses", {"model": "m", "input": "hi", "stream": True}, 40),
    "embeddings": ("/v1/embeddings", {"model": "m", "input": ["a", "b"]}, 6),
    "messages": ("/v1/messages", {"model": "claude-x", "max_tokens": 8, "messages": HI}, 5),
    "messages-stream": (
        "/v1/messages",
        {"model": "claude-x", "max_tokens": 8, "messages": HI, "stream": True},
        None,  # whatever the stream's events report, counted once
    ),
}


@pytest.mark.parametrize("kind", sorted(COUNTED))
def test_tpm_counts_the_real_usage_of_every_kind_of_answer(
    start_fake, start_nexus, client, monkeypatch, kind
):
    """A streaming client, or one on another API, must not pass the tpm uncounted: the tokens
    each answer used (as its backend reported them) are what the key's minute counts."""
    from tests.cloud_fakes import FakeClaude

    monkeypatch.setenv(CLOUD_KEY_VAR, "sk-key-limits-cloud")
    local = start_fake(HeldOpenAI(["m"], USAGE_40))
    local.release()
    claude = start_fake(FakeClaude(["claude-x"]))
    backends = [
        {"name": "local", "url": local.url, "type": "vllm"},
        {"name": "claude", "url": claude.url, "type": "anthropic", "api_key_env": CLOUD_KEY_VAR},
    ]
    nexus = start_nexus(settings_for(backends=backends, auth={"enabled": True}))
    registry = nexus.gateway.registry
    assert wait_for(lambda: all(b.healthy for b in registry)), [b.last_error for b in registry]
    secret = create(client, nexus, name="meter", tpm=1_000_000)
    path, body, tokens = COUNTED[kind]
    resp = client.post(nexus.url + path, json=body, headers=headers_for(secret))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ratelimit-remaining-tokens"] == "1000000"  # counted after the answer

    def used() -> int:
        shown = client.get(nexus.url + "/v1/usage", headers=headers_for(secret)).json()
        return 1_000_000 - int(shown["remaining"]["tokens_this_minute"])

    def total() -> int:
        view = client.get(nexus.url + "/admin/keys/meter").json()
        return int(view["usage"]["total_tokens"])

    assert wait_for(lambda: total() > 0), f"{kind}: no tokens counted"
    if tokens is not None:
        assert total() == tokens, kind
    assert used() == total()  # the minute's count and the month's agree


# --- a call's slot comes back however it ends -----------------------------------------------------


def test_max_concurrent_slot_comes_back_however_a_call_ends(start_fake, start_nexus, client):
    """With max_concurrent = 1, every way a call can end (a bad body, a forbidden or unknown
    model, an upstream error, a stream the upstream drops, a client that leaves mid-stream)
    gives its slot back: a leak would lock the key out for good."""
    from tests.fakes import DONE, chunk, sse

    fake = start_fake(FakeOpenAI(["m", "other"]))
    backend = {"name": "local", "url": fake.url, "type": "vllm", "max_concurrent": 100}
    nexus = start_nexus(
        settings_for(backends=[backend], routing={"max_retries": 0}, auth={"enabled": True})
    )
    secret = create(client, nexus, name="one", max_concurrent=1, models=["m"])
    auth = headers_for(secret)
    url = nexus.url + CHAT
    ok = orjson.dumps({"model": "m", "messages": HI})
    streamed = orjson.dumps({"model": "m", "messages": HI, "stream": True})

    def in_flight() -> int:
        return int(client.get(nexus.url + "/admin/keys/one").json()["in_flight"])

    def leave_mid_stream() -> None:
        events = [sse(chunk("m", content=f"w{i} ")) for i in range(500)]
        fake.push(CHAT, Reply(events=[*events, DONE], event_delay=0.01))
        with client.stream("POST", url, content=streamed, headers=auth) as resp:
            assert resp.status_code == 200
            assert next(line for line in resp.iter_lines() if line.startswith("data:"))
        assert fake.wait_disconnect(10)

    endings: dict[str, Callable[[], object]] = {
        "bad json": lambda: client.post(url, content=b"{", headers=auth),
        "forbidden model": lambda: client.post(
            url, content=orjson.dumps({"model": "other", "messages": HI}), headers=auth
        ),
        "unknown model": lambda: client.post(
            url, content=orjson.dumps({"model": "m-none", "messages": HI}), headers=auth
        ),
        "upstream 500": scripted(
            fake,
            Reply(status=500, json={"error": {"message": "boom"}}),
            lambda: client.post(url, content=ok, headers=auth),
        ),
        "upstream drops the stream": scripted(
            fake,
            Reply(events=[sse(chunk("m", content="a"))] * 3, drop_after=2),
            lambda: client.post(url, content=streamed, headers=auth),
        ),
        "client leaves mid-stream": leave_mid_stream,
        "wrong method": lambda: client.get(url, headers=auth),
    }
    for name, end in endings.items():
        end()
        assert wait_for(lambda: in_flight() == 0), f"{name}: the slot was not given back"
        after = client.post(url, content=ok, headers=auth)
        assert after.status_code == 200, f"after {name}: {after.text}"


def test_a_patch_takes_effect_from_the_next_request(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI(["m", "other"]))
    backend = {"name": "local", "url": fake.url, "type": "vllm"}
    nexus = start_nexus(settings_for(backends=[backend], auth={"enabled": True}))
    secret = create(client, nexus, name="moving")
    url = nexus.url + CHAT

    def ask(model: str = "m") -> httpx2.Response:
        body = orjson.dumps({"model": model, "messages": HI})
        resp: httpx2.Response = client.post(url, content=body, headers=headers_for(secret))
        return resp

    def patch(**settings: Any) -> None:
        resp = client.patch(nexus.url + "/admin/keys/moving", json=settings)
        assert resp.status_code == 200, resp.text

    assert ask("other").status_code == 200 and ask().status_code == 200
    patch(models=["m"])
    assert ask("other").status_code == 403
    patch(rpm=3)
    first = ask()
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "3"
    patch(models=None, rpm=None)
    assert ask("other").status_code == 200
    assert "x-ratelimit-limit-requests" not in ask().headers
    patch(expires_at="2020-01-01T00:00:00Z")
    gone = ask()
    assert gone.status_code == 401 and "expired" in gone.json()["error"]["message"]
    patch(expires_at=None)
    assert ask().status_code == 200


def test_a_budget_keys_reservations_come_back_however_a_call_ends(
    start_fake, start_nexus, client, monkeypatch
):
    """A priced call holds its worst case against the key's budget until it settles: every way
    it can end (an upstream error, a dropped stream, a client that leaves) gives the hold back,
    or the key would be locked out of its own budget."""
    from tests.fakes import DONE, chunk, sse

    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    # Failures on purpose: the quality stage must not take the cloud out for them.
    quality = {"min_requests": 1000}
    nexus, cloud, _ = priced_nexus(
        start_fake, start_nexus, monkeypatch, False, usage, quality=quality
    )
    raw = body_of(SHARED, max_tokens=8)
    streamed = body_of(SHARED, max_tokens=8, stream=True)
    worst = worst_case(raw, 8)
    budget = worst * 1.5 + 10 * worst  # one call in flight at a time; room for what is spent
    secret = create(client, nexus, name="held", monthly_budget_usd=budget)
    auth = headers_for(secret)
    url = nexus.url + CHAT
    ring = nexus.gateway.keys
    assert ring is not None
    key = ring.get("held")
    assert key is not None

    def leave(body: bytes, events: bool) -> None:
        if events:
            parts = [sse(chunk(SHARED, content=f"w{i} ")) for i in range(500)]
            cloud.push(CHAT, Reply(events=[*parts, DONE], event_delay=0.01))
            with client.stream("POST", url, content=body, headers=auth) as resp:
                assert resp.status_code == 200
                assert next(line for line in resp.iter_lines() if line.startswith("data:"))
        else:
            cloud.push(CHAT, Reply(json={"choices": []}, delay=30))
            leaving = httpx2.Client(timeout=httpx2.Timeout(30, read=0.5))
            with leaving, pytest.raises(httpx2.ReadTimeout):
                leaving.post(url, content=body, headers=auth)
        assert cloud.wait_disconnect(10)

    endings: dict[str, Callable[[], object]] = {
        "upstream 500": scripted(
            cloud,
            Reply(status=500, json={"error": {"message": "boom"}}),
            lambda: client.post(url, content=raw, headers=auth),
        ),
        "upstream 429": scripted(
            cloud,
            Reply(status=429, json={"error": {"message": "slow"}}),
            lambda: client.post(url, content=raw, headers=auth),
        ),
        "upstream drops the stream": scripted(
            cloud,
            Reply(events=[sse(chunk(SHARED, content="a"))] * 3, drop_after=2),
            lambda: client.post(url, content=streamed, headers=auth),
        ),
        "client leaves a stream": lambda: leave(streamed, True),
        "client leaves before the answer": lambda: leave(raw, False),
    }
    for name, end in endings.items():
        end()
        assert wait_for(lambda: key.reserved_usd == 0.0), f"{name}: {key.reserved_usd} held"
        after = client.post(url, content=raw, headers=auth)
        assert after.status_code == 200, f"after {name}: {after.text}"
        assert after.headers["x-nexus-backend"] == "cloud"
    assert key.usage.cost_usd <= budget
