"""The fuzz tier: thousands of generated hostile requests over every route (issue 8, point 11).

One real Nexus on a real port, in front of fake upstreams that answer normally (an OpenAI-style
one and an Ollama one, both accepting bodies up to the 10 MiB Nexus forwards). Every request goes
over a raw socket (``wire.py``), so Host, Origin and any other header can be anything.

Per request: it is answered; never with a 5xx (healthy upstreams leave no excuse); every error
(>= 400) is an OpenAI envelope; a foreign Host is refused; a state-changing admin request from a
foreign Origin, with a type a page can send without a preflight, or carrying forwarding headers
(not loopback then) changes nothing. Per test, afterwards: the configured backends are healthy,
nothing is in flight, and a plain request is served. Examples are derandomized, so CI sees the
same requests every run; the counts add up to more than 5,000 and are printed at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nexus.keys.tokens import hash_of
from nexus.registry import Status
from tests.fakes import FakeOllama, FakeOpenAI
from tests.harness import LoopThread, NexusServer, data_events, settings_for, wait_for

from . import requests as r
from .tally import TALLY, timed
from .wire import Answer, WireClient

UPSTREAM_BODY_LIMIT = 16 * 1024 * 1024  # above Nexus's 10 MiB, so a fake never refuses a body
ENVELOPE_KEYS = {"message", "type", "param", "code"}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


class RoomyOpenAI(FakeOpenAI):
    def app(self) -> web.Application:
        app = web.Application(client_max_size=UPSTREAM_BODY_LIMIT)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app


class RoomyOllama(FakeOllama):
    def app(self) -> web.Application:
        app = web.Application(client_max_size=UPSTREAM_BODY_LIMIT)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app


@dataclass
class Target:
    nexus: NexusServer
    fakes: list[FakeOpenAI | FakeOllama]
    client: WireClient
    credentials: list[tuple[bytes, bytes]] = field(default_factory=list)  # for the after-check

    def send(self, req: r.Req) -> Answer:
        port = str(self.nexus.port).encode()
        fake = self.fakes[0].url.encode()

        def fill(value: str, encoding: str = "latin-1") -> bytes:
            return value.encode(encoding).replace(b"{PORT}", port).replace(b"{FAKE}", fake)

        headers = [(fill(name), fill(value)) for name, value in req.headers]
        body = req.body.replace(b"{FAKE}", fake)
        if req.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
            half = len(body) // 2
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p)
            body += b"0\r\n\r\n"
        elif body or req.method in ("POST", "PUT", "PATCH"):
            headers.append((b"Content-Length", str(len(body)).encode()))
        target = fill(req.target, "utf-8")
        started = time.perf_counter()
        try:
            answer = self.client.request(req.method.encode(), target, headers, body)
        finally:
            timed(time.perf_counter() - started, repr(req)[:300])
            for upstream in self.fakes:  # the fakes record every request: keep memory flat
                upstream.requests.clear()
        if (req.header("connection") or "").lower() == "close":
            self.client.close()
        TALLY[f"{req.route} {answer.status}"] += 1
        return answer


@pytest.fixture(scope="module")
def target(loop_thread: LoopThread) -> Iterator[Target]:
    openai = RoomyOpenAI(models=["mock-model", "nomic-embed-text"])
    ollama = RoomyOllama(models=["llama3.2:latest"])
    for fake in (openai, ollama):
        loop_thread.run(fake.start())
    settings = settings_for(
        ("fuzz-openai", openai, "vllm"),
        ("fuzz-ollama", ollama, "ollama"),
        routing={"aliases": r.ALIASES, "fallbacks": {"alias-model": ["llama3.2:latest"]}},
        server={"request_timeout_seconds": 10},
        health_check={"timeout_seconds": 2},
    )
    nexus = NexusServer(loop_thread, settings).start()
    target = Target(nexus, [openai, ollama], WireClient(nexus.port))
    try:
        yield target
    finally:
        target.client.close()
        nexus.stop()
        for fake in (openai, ollama):
            loop_thread.run(fake.stop())


@pytest.fixture(scope="module")
def keyed_target(loop_thread: LoopThread) -> Iterator[Target]:
    """The same gateway with ``[auth]`` on and one config-declared key (``r.FUZZ_KEY``)."""
    openai = RoomyOpenAI(models=["mock-model", "nomic-embed-text"])
    ollama = RoomyOllama(models=["llama3.2:latest"])
    for fake in (openai, ollama):
        loop_thread.run(fake.start())
    settings = settings_for(
        ("fuzz-openai", openai, "vllm"),
        ("fuzz-ollama", ollama, "ollama"),
        routing={"aliases": r.ALIASES},
        server={"request_timeout_seconds": 10},
        health_check={"timeout_seconds": 2},
        auth={"enabled": True, "keys": [{"name": "fuzz-keyed", "hash": hash_of(r.FUZZ_KEY)}]},
    )
    nexus = NexusServer(loop_thread, settings).start()
    bearer = [(b"Authorization", b"Bearer " + r.FUZZ_KEY.encode())]
    target = Target(nexus, [openai, ollama], WireClient(nexus.port), bearer)
    try:
        yield target
    finally:
        target.client.close()
        nexus.stop()
        for fake in (openai, ollama):
            loop_thread.run(fake.stop())


# --- the properties -------------------------------------------------------------------------------
def check(target: Target, req: r.Req) -> Answer:
    answer = target.send(req)
    context = f"{req.method} {req.target[:200]} -> {answer.status} {answer.body[:300]!r}"
    assert answer.status < 500, context  # with healthy upstreams: none, ever
    if answer.status >= 400:
        assert_envelope(req, answer, context)
    elif answer.status < 300:
        assert_sound(req, answer, context)
    if req.foreign_host:
        assert answer.status >= 400, f"a foreign Host was served: {context}"
    if req.route.startswith("/admin/") and req.method in STATE_CHANGING:
        changed = 200 <= answer.status < 300
        if req.foreign_origin or (req.body and req.simple_type):
            assert not changed, f"a page's request changed state: {context}"
        if any(req.has(name) for name in r.FORWARDING):
            assert not changed, f"a forwarded request counted as loopback: {context}"
    if req.route == "/v1/history" and req.method == "GET" and answer.status < 300:
        assert answer.status == 200, context
    return answer


KEYED_PATHS = {"/v1/chat/completions", "/v1/embeddings", "/v1/messages",
               "/v1/messages/count_tokens", "/v1/responses", "/v1/models", "/v1/usage"}  # fmt: skip


def check_keyed(target: Target, req: r.Req) -> Answer:
    """With [auth] on: a keyed route answers 2xx only to the key, and the key is never shown."""
    answer = check(target, req)
    context = f"{req.method} {req.target[:200]} -> {answer.status} {answer.body[:300]!r}"
    if 200 <= answer.status < 300 and req.target.partition("?")[0] in KEYED_PATHS:
        assert r.carries_the_key(req), f"served without the key: {context} {req.headers!r}"
    secret = r.FUZZ_KEY.encode()
    assert secret not in answer.body and secret not in answer.raw_head, context
    return answer


def assert_envelope(req: r.Req, answer: Answer, context: str) -> None:
    kind = answer.headers.get("content-type", "")
    assert kind.startswith("application/json"), f"error without a JSON body: {context}"
    if req.method == "HEAD":
        return  # no body to look at
    body = orjson.loads(answer.body)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), context
    error = body["error"]
    exact = req.target.partition("?")[0] == req.route  # a variant path is not the route
    # Anthropic's envelope on its API, once the request reached the app (its answers carry a
    # request id; what breaks the HTTP layer's own rules is answered before any route is known).
    reached = "x-request-id" in answer.headers
    if exact and reached and req.route.startswith("/v1/messages"):
        assert body.get("type") == "error", context
    elif body.get("type") != "error":
        assert set(error) >= ENVELOPE_KEYS, context
    assert isinstance(error["message"], str) and error["message"], context
    assert isinstance(error["type"], str) and error["type"], context


def assert_sound(req: r.Req, answer: Answer, context: str) -> None:
    """A success is whole: JSON parses, a stream ends as its API ends one ([DONE] for chat)."""
    kind = answer.headers.get("content-type", "")
    if kind.startswith("application/json") and answer.body:
        orjson.loads(answer.body)
    elif kind.startswith("text/event-stream") and req.route.startswith("/v1/messages"):
        last = answer.body.rstrip().rsplit(b"\n\n", 1)[-1]
        assert b"event: message_stop" in last or b"event: error" in last, context
    elif kind.startswith("text/event-stream") and req.route == "/v1/responses":
        last = answer.body.rstrip().rsplit(b"\n\n", 1)[-1]
        ends = (b"response.completed", b"response.incomplete", b"response.failed", b"error")
        assert any(b"event: " + end in last for end in ends), context
    elif kind.startswith("text/event-stream"):
        events = data_events(answer.body.decode())
        assert events and events[-1] == "[DONE]", context
        for event in events[:-1]:
            assert isinstance(orjson.loads(event), dict), context


def assert_healthy_after(target: Target) -> None:
    """The fuzzing left the gateway as it found it: healthy, nothing in flight, serving."""
    registry = target.nexus.gateway.registry
    in_flight = lambda: {b.name: b.in_flight for b in registry if b.in_flight}  # noqa: E731
    assert wait_for(lambda: not in_flight(), timeout=10), in_flight()
    for name in r.CONFIGURED_BACKENDS:
        backend = registry.get(name)
        assert backend is not None and backend.status is Status.HEALTHY, name
    client = WireClient(target.nexus.port)
    try:
        host = [(b"Host", f"127.0.0.1:{target.nexus.port}".encode())]
        health = client.request(b"GET", b"/health", host, b"")
        assert health.status == 200 and orjson.loads(health.body)["status"] in (
            "healthy",
            "degraded",  # backends added through the admin API may point at closed ports
        )
        body = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'
        json_headers = [*host, *target.credentials, (b"Content-Type", b"application/json")]
        chat = client.request(
            b"POST",
            b"/v1/chat/completions",
            [*json_headers, (b"Content-Length", str(len(body)).encode())],
            body,
        )
        assert chat.status == 200, chat.body[:300]
    finally:
        client.close()


def fuzz(
    target: Target,
    strategy: st.SearchStrategy[r.Req],
    examples: int,
    checker: Callable[[Target, r.Req], Answer] = check,
) -> None:
    """Send ``examples`` generated requests (derandomized), then check the gateway's health."""
    sent: list[int] = []

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(strategy)
    def one(req: r.Req) -> None:
        sent.append(1)
        checker(target, req)

    one()
    assert len(sent) >= examples, f"only {len(sent)} of {examples} requests were generated"
    TALLY["requests"] += len(sent)
    assert_healthy_after(target)


# --- the routes -----------------------------------------------------------------------------------
def variants(path: str) -> st.SearchStrategy[str]:
    """``path`` mostly as it is; sometimes with a slash added, its case changed or encoded."""
    odd = [path + "/", "/" + path, path.upper(), path.replace("/", "//"), path + "%00"]
    if len(path) > 2:
        odd.append(path[:2] + "%" + format(ord(path[2]), "02x") + path[3:])
    return st.sampled_from([path] * 20 + odd)


CHAT = r.requests(
    "/v1/chat/completions",
    variants("/v1/chat/completions"),
    "POST",
    r.json_bodies(r.chat_objects()),
)
EMBEDDINGS = r.requests(
    "/v1/embeddings", variants("/v1/embeddings"), "POST", r.json_bodies(r.embedding_objects())
)
MESSAGES = r.requests(
    "/v1/messages", variants("/v1/messages"), "POST", r.json_bodies(r.messages_objects())
) | r.requests(
    "/v1/messages/count_tokens",
    variants("/v1/messages/count_tokens"),
    "POST",
    r.json_bodies(r.messages_objects()),
)
RESPONSES = r.requests(
    "/v1/responses", variants("/v1/responses"), "POST", r.json_bodies(r.responses_objects())
)
ADMIN_ADD = r.requests(
    "/admin/backends", variants("/admin/backends"), "POST", r.json_bodies(r.admin_objects())
)
ADMIN_REMOVE = r.requests(
    "/admin/backends/{name}",
    st.builds(
        "/admin/backends/{}".format,
        r.backend_names.map(lambda name: name.encode("utf-8").hex()[:40])
        | st.sampled_from(["", "x", "%2e%2e", "a/b", "fuzz%20added", "%ff"]),
    ),
    "DELETE",
    r.json_bodies(r.json_values),
)
READ_ROUTES = (
    "/v1/models",
    "/health",
    "/livez",
    "/readyz",
    "/metrics",
    "/v1/stats",
    "/v1/backends",
)


def retarget(req: r.Req, target: str, route: str | None = None) -> r.Req:
    req.target = target
    req.route = route or req.route
    return req


KEY_PATHS = st.builds(
    "/admin/keys/{}".format,
    r.key_names.map(lambda name: quote(name, safe=""))
    | st.sampled_from(["", "x", "%2e%2e", "a/b", "%ff", "fuzz-keyed", "nope"]),
)
ADMIN_KEYS = (
    r.requests("/admin/keys", variants("/admin/keys"), "POST", r.json_bodies(r.key_objects()))
    | r.requests("/admin/keys", variants("/admin/keys"), "GET")
    | r.requests("/admin/keys/{name}", KEY_PATHS, "PATCH", r.json_bodies(r.key_objects()))
    | r.requests("/admin/keys/{name}", KEY_PATHS, "GET")
    | r.requests("/admin/keys/{name}", KEY_PATHS, "DELETE")
)
USAGE = r.requests("/v1/usage", variants("/v1/usage"), "GET")
READS = st.one_of(*(r.requests(path, variants(path), "GET") for path in READ_ROUTES))
limits = (
    st.integers(-(10**6), 10**7).map(str)
    | st.sampled_from(["", "0", "1", "1000", "1001", "-1", "+5", " 5", "%35", "1e3", "0x10", "½"])
    | st.just("9" * 5000)
    | r.text.map(lambda value: quote(value, safe=""))
    | r.text  # raw, not even percent-encoded
)
HISTORY = st.builds(
    lambda req, limit, extra: retarget(req, f"/v1/history?limit={limit}{extra}"),
    r.requests("/v1/history", st.just("/v1/history"), "GET"),
    limits,
    st.sampled_from(["", "&limit=2", "&x=1", "&limit="]),
) | r.requests("/v1/history", variants("/v1/history"), "GET")
DASHBOARD_FILES = ("app.js", "style.css", "index.html", "", "..%2f..%2fetc%2fpasswd", "x" * 300)
DASHBOARD = (
    r.requests("/", st.sampled_from(["/", "//", "/index.html", "/?v=1"]), "GET")
    | r.requests(
        "/dashboard/{name}",
        st.sampled_from([f"/dashboard/{name}" for name in DASHBOARD_FILES])
        | r.token.map("/dashboard/{}".format),
        "GET",
    )
    | r.requests("/ws", st.just("/ws"), "GET")
)
UNKNOWN = r.requests(
    "*",
    st.sampled_from(
        ["*", "/v2/chat", "/admin", "/v1", "/%", "/%zz", "http://evil.example/v1/models"]
    )
    | r.token.map("/{}".format)
    | st.just("/" + "a" * 8000),
    "GET",
    r.json_bodies(r.json_values),
)

# Route templates each test covers; test_every_route_is_fuzzed keeps this in step with the app.
COVERED = {
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/admin/backends",
    "/admin/backends/{name}",
    "/admin/keys",
    "/admin/keys/{name}",
    "/v1/usage",
    *READ_ROUTES,
    "/v1/history",
    "/",
    "/dashboard/{name}",
    "/ws",
}
EXAMPLES = {
    "chat": 1500,
    "embeddings": 700,
    "messages": 800,
    "responses": 600,
    "admin": 500,
    "reads": 900,
    "history": 500,
    "dashboard": 400,
    "unknown": 500,
    "huge": 30,
    "admin_keys": 500,
    "keyed": 1200,
}
assert sum(EXAMPLES.values()) >= 5000


def test_every_route_is_fuzzed(target: Target) -> None:
    paths = {getattr(route, "path", None) for route in target.nexus.app.routes}
    assert paths - COVERED == set(), "a route the fuzz tier does not cover"


def test_chat_completions(target: Target) -> None:
    fuzz(target, CHAT, EXAMPLES["chat"])


def test_embeddings(target: Target) -> None:
    fuzz(target, EMBEDDINGS, EXAMPLES["embeddings"])


def test_messages(target: Target) -> None:
    fuzz(target, MESSAGES, EXAMPLES["messages"])


def test_responses(target: Target) -> None:
    fuzz(target, RESPONSES, EXAMPLES["responses"])


def test_admin_backends(target: Target) -> None:
    fuzz(target, ADMIN_ADD | ADMIN_REMOVE, EXAMPLES["admin"])


def test_admin_keys_and_usage(target: Target) -> None:
    fuzz(target, ADMIN_KEYS | USAGE, EXAMPLES["admin_keys"])


def with_credentials(req: r.Req, credentials: list[tuple[str, str]]) -> r.Req:
    req.headers.extend(credentials)
    return req


KEYED = st.builds(
    with_credentials,
    CHAT | EMBEDDINGS | MESSAGES | RESPONSES | USAGE
    | r.requests("/v1/models", variants("/v1/models"), "GET") | ADMIN_KEYS,
    r.credentials,
)  # fmt: skip


def test_keyed_routes(keyed_target: Target) -> None:
    """[auth] on: every route with hostile credentials (the key, near misses, odd schemes, huge
    values); only the key is served on a keyed route, and no answer shows it."""
    fuzz(keyed_target, KEYED, EXAMPLES["keyed"], check_keyed)


def test_read_routes(target: Target) -> None:
    fuzz(target, READS, EXAMPLES["reads"])


def test_history_query(target: Target) -> None:
    fuzz(target, HISTORY, EXAMPLES["history"])


def test_dashboard_and_ws_as_http(target: Target) -> None:
    fuzz(target, DASHBOARD, EXAMPLES["dashboard"])


def test_unknown_paths_and_methods(target: Target) -> None:
    fuzz(target, UNKNOWN, EXAMPLES["unknown"])


# --- big bodies, within the 10 MiB limit ----------------------------------------------------------
def padded(place: str, size: int, char: str) -> bytes:
    """A body of about ``size`` bytes, most of them in one string at ``place``."""
    pad = char * (size // (len(orjson.dumps(char)) - 2))
    hello = [{"role": "user", "content": "hi"}]
    body: dict[str, Any]
    if place == "model":
        body = {"model": pad, "messages": hello}
    elif place == "content":
        body = {"model": "mock-model", "messages": [{"role": "user", "content": pad}]}
    elif place == "unknown":
        body = {"model": "alias-model", "messages": hello, "unknown": pad}
    else:
        body = {"model": "mock-model", "input": [pad]}
    return orjson.dumps(body)


def huge(place: str, size: int, char: str, req: r.Req) -> r.Req:
    path = "/v1/embeddings" if place == "input" else "/v1/chat/completions"
    req.body = padded(place, size, char)
    return retarget(req, path, path)


HUGE = st.builds(
    huge,
    st.sampled_from(["model", "content", "unknown", "input"]),
    st.sampled_from([65_536, 1_000_000, 5_000_000, 10 * 1024 * 1024 - 200]),
    st.sampled_from(["x", "\u00e9", "\x01", "\U0001f600"]),
    r.requests("/v1/chat/completions", st.just("/v1/chat/completions"), "POST", st.just(b"")),
)


def test_huge_bodies(target: Target) -> None:
    fuzz(target, HUGE.filter(lambda req: len(req.body) <= 10 * 1024 * 1024), EXAMPLES["huge"])
