"""An attacker's view of client keys (issue 12, points 1 and 5).

Secrets stay secret: with a created key and a config-declared key known to the test, traffic of
every kind (answers, streams, 401, 403, 429, upstream errors that echo what they were sent) is
driven, then every output Nexus has is searched for the secrets: the log (content logging on),
history, metrics, stats, backends, the key listing, ``/v1/usage``, the dashboard's pages and
WebSocket frames, every answer (status line, headers, body) and what each upstream received.

Hostile credentials are refused in bounds: a 100 KB header, NUL and non-ASCII bytes, two keys at
once, an empty or odd scheme; a clear 401 (or the HTTP layer's own 4xx), never a 5xx.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx2
import orjson
import pytest
from aiohttp import web
from websockets.sync.client import connect

from nexus.keys.tokens import hash_of
from tests.cloud_fakes import FakeClaude
from tests.fakes import FakeOpenAI, Recorded
from tests.fuzz.wire import Answer, WireClient
from tests.harness import NexusServer, settings_for, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
CONFIG_SECRET = "nx-config-declared-secret-for-the-grep-0123456789"
EXPIRED_SECRET = "nx-config-declared-expired-secret-9876543210abcd"
CLOUD_KEY = "sk-cloud-own-key-for-the-secrets-test"
CLAUDE_KEY = "sk-ant-own-key-for-the-secrets-test"
CLOUD_VAR, CLAUDE_VAR = "NEXUS_TEST_KS_CLOUD", "NEXUS_TEST_KS_CLAUDE"
ECHO = "echo-model"  # the local fake answers it with an error that echoes every header it got


class EchoingOpenAI(FakeOpenAI):
    """A local backend that, for ``ECHO``, answers an error quoting every header it was sent:
    had Nexus passed the client's key on, the client (and every log) would see it again."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == CHAT and request.method == "POST":
            raw = await request.read()
            if orjson.loads(raw).get("model") == ECHO:
                self.requests.append(Recorded("POST", CHAT, dict(request.headers), raw))
                message = f"refused; you sent {dict(request.headers)!r}"
                status = 400 if len(self.calls(CHAT)) % 2 else 500
                return web.json_response({"error": {"message": message}}, status=status)
        return await super()._handle(request)


class Traffic:
    """Everything a client was shown, in one place, to be searched."""

    def __init__(self, nexus: NexusServer, client: httpx2.Client) -> None:
        self.nexus, self.client = nexus, client
        self.shown: list[str] = []

    def keep(self, resp: httpx2.Response) -> httpx2.Response:
        self.shown.append(f"{resp.status_code} {resp.reason_phrase} {resp.headers.multi_items()}")
        self.shown.append(resp.text)
        return resp

    def post(self, path: str, body: dict[str, Any], key: str | None, via: str = "bearer",
             ) -> httpx2.Response:  # fmt: skip
        headers = {}
        if key is not None:
            headers = {"Authorization": f"Bearer {key}"} if via == "bearer" else {"x-api-key": key}
        return self.keep(self.client.post(self.nexus.url + path, json=body, headers=headers))

    def get(self, path: str, key: str | None = None) -> httpx2.Response:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return self.keep(self.client.get(self.nexus.url + path, headers=headers))


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI, **extra}


def test_no_client_key_appears_in_any_output(start_fake, start_nexus, client, monkeypatch, caplog):
    monkeypatch.setenv(CLOUD_VAR, CLOUD_KEY)
    monkeypatch.setenv(CLAUDE_VAR, CLAUDE_KEY)
    local = start_fake(EchoingOpenAI(["m", "big", ECHO]))
    cloud = start_fake(FakeOpenAI(["cloudm"]))
    claude = start_fake(FakeClaude(["claude-x"]))
    caplog.set_level(logging.DEBUG)
    settings = settings_for(
        backends=[
            {"name": "local", "url": local.url, "type": "vllm"},
            {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": CLOUD_VAR},
            {"name": "claude", "url": claude.url, "type": "anthropic", "api_key_env": CLAUDE_VAR},
        ],
        logging={"enable_content_logging": True, "level": "debug"},
        routing={"max_retries": 0},
        auth={
            "enabled": True,
            "keys": [
                {"name": "ops", "hash": hash_of(CONFIG_SECRET), "models": ["m", "cloudm"]},
                {"name": "old", "hash": hash_of(EXPIRED_SECRET),
                 "expires_at": "2020-01-01T00:00:00Z"},
            ],
        },
    )  # fmt: skip
    nexus = start_nexus(settings)
    registry = nexus.gateway.registry
    assert wait_for(lambda: all(b.healthy for b in registry)), [b.last_error for b in registry]
    t = Traffic(nexus, client)
    frames: list[str] = []
    with connect(nexus.url.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        alice_settings = {"name": "alice", "owner": "alice@lab",
                          "models": ["m", "cloudm", "claude-*", ECHO]}  # fmt: skip
        made = t.keep(client.post(nexus.url + "/admin/keys", json=alice_settings))
        assert made.status_code == 201
        alice = made.json()["key"]
        t.shown.remove(made.text)  # the one answer that shows the secret, once, by design
        tight_made = client.post(nexus.url + "/admin/keys", json={"name": "tight", "rpm": 1})
        tight = tight_made.json()["key"]
        revoked = client.post(nexus.url + "/admin/keys", json={"name": "gone"}).json()["key"]
        assert t.keep(client.delete(nexus.url + "/admin/keys/gone")).status_code == 200
        secrets = [alice, tight, revoked, CONFIG_SECRET, EXPIRED_SECRET]

        # Successes, both ways of sending a key, every inference route, streams too.
        for key in (alice, CONFIG_SECRET):
            for via in ("bearer", "x-api-key"):
                assert t.post(CHAT, chat("m"), key, via).status_code == 200
                assert t.post(CHAT, chat("cloudm"), key, via).status_code == 200
        assert t.post(CHAT, chat("m", stream=True), alice).status_code == 200
        assert t.post("/v1/embeddings", {"model": "m", "input": "x"}, alice).status_code == 200
        assert t.post("/v1/responses", {"model": "m", "input": "x"}, alice).status_code == 200
        messages = {"model": "claude-x", "max_tokens": 8, "messages": HI}
        for via in ("bearer", "x-api-key"):
            assert t.post("/v1/messages", messages, alice, via).status_code == 200
            assert (
                t.post("/v1/messages", {**messages, "stream": True}, alice, via).status_code == 200
            )
        assert t.post(CHAT, chat("claude-x"), alice).status_code == 200
        assert t.get("/v1/models", alice).status_code == 200
        assert t.get("/v1/usage", alice).status_code == 200
        assert t.get("/v1/usage", CONFIG_SECRET).status_code == 200
        # 401: wrong (a real key with a character added: echoing it would show the real one),
        # revoked, expired; in both APIs' envelopes.
        for wrong in (alice + "x", "x" + alice, CONFIG_SECRET[:-1], revoked, EXPIRED_SECRET):
            for via in ("bearer", "x-api-key"):
                assert t.post(CHAT, chat("m"), wrong, via).status_code == 401
                assert t.post("/v1/messages", messages, wrong, via).status_code == 401
        # 403: a model outside the key's globs (and the config key's).
        assert t.post(CHAT, chat("big"), alice).status_code == 403
        assert t.post(CHAT, chat("claude-x"), CONFIG_SECRET).status_code == 403
        assert t.post("/v1/messages", {**messages, "model": "big"}, alice).status_code == 403
        # 429: over the rpm.
        assert t.post(CHAT, chat("m"), tight).status_code == 200
        assert t.post(CHAT, chat("m"), tight).status_code == 429
        assert t.post("/v1/messages", {**messages, "model": "m"}, tight).status_code == 429
        # Upstream errors that echo every header they got (a 4xx passed on, a 5xx as a 502).
        for via in ("bearer", "x-api-key"):
            assert t.post(CHAT, chat(ECHO), alice, via).status_code >= 400
            assert t.post(CHAT, chat(ECHO, stream=True), alice, via).status_code >= 400
        assert len(local.calls(CHAT)) >= 4 and any("you sent" in s for s in t.shown)

        # Everything Nexus shows about itself.
        history = t.get("/v1/history?limit=1000")
        entries = history.json()["data"] if isinstance(history.json(), dict) else history.json()
        for path in ("/v1/stats", "/metrics", "/v1/backends", "/health", "/admin/keys",
                     "/admin/keys/alice", "/admin/keys/ops", "/admin/keys/gone", "/",
                     "/dashboard/app.js"):  # fmt: skip
            assert t.get(path).status_code == 200, path
        # The dashboard's frames: the snapshot and one per request that reached a handler.
        requests_seen = 0
        while requests_seen < len(entries):
            frame = str(ws.recv(timeout=15))
            frames.append(frame)
            requests_seen += orjson.loads(frame)["type"] == "request"
    assert any('"type":"snapshot"' in f for f in frames)

    # The outputs name the keys (so they are the right ones to search)...
    assert {e.get("key") for e in entries} >= {"alice", "ops", "tight"}
    listing = client.get(nexus.url + "/admin/keys").text
    assert "alice" in listing and alice[:8] in listing
    for path in ("/v1/stats", "/metrics"):
        assert "alice" in client.get(nexus.url + path).text, path
    # ...and no secret is in any of them. (The log is Nexus's and its server's, not the test
    # clients' own debug lines.)
    records = [r for r in caplog.records if r.name.split(".")[0] in ("nexus", "uvicorn")]
    assert any(r.name == "nexus.access" for r in records)
    outputs: dict[str, list[str]] = {
        "answers": t.shown,
        "dashboard frames": frames,
        "log": [f"{r.getMessage()} {vars(r)!r}" for r in records],
        "local upstream": [f"{r.headers!r} {r.raw!r}" for r in local.requests],
        "cloud upstream": [f"{r.headers!r} {r.raw!r}" for r in cloud.requests],
        "claude upstream": [f"{r.headers!r} {r.raw!r}" for r in claude.requests],
    }
    assert any("content" in vars(r) for r in records)  # content logging was on
    for where, texts in outputs.items():
        for secret in secrets:
            found = [text[:300] for text in texts if secret in text]
            assert not found, f"a client key in the {where}: {found}"
            # Not even its secret part (the prefix is shown by design: "nx-" and 5 more).
            assert all(secret[8:] not in text for text in texts), where
    # Each upstream got its own credential and nothing else: the keyless local one none.
    for recorded in local.requests:
        names = {name.lower() for name in recorded.headers}
        assert "authorization" not in names and "x-api-key" not in names, recorded.headers
    assert cloud.calls(CHAT)
    assert {r.headers.get("Authorization") for r in cloud.requests} == {f"Bearer {CLOUD_KEY}"}
    assert claude.calls("/v1/messages")
    assert {r.headers.get("x-api-key") for r in claude.requests} == {CLAUDE_KEY}
    assert all("Authorization" not in r.headers for r in claude.requests)


# --- hostile credentials -----------------------------------------------------------------------


@pytest.fixture
def keyed(start_fake, start_nexus, client) -> tuple[NexusServer, FakeOpenAI, str]:
    fake = start_fake(FakeOpenAI(["m"]))
    settings = settings_for(
        backends=[{"name": "local", "url": fake.url, "type": "vllm"}],
        auth={"enabled": True, "keys": [{"name": "ops", "hash": hash_of(CONFIG_SECRET)}]},
    )
    nexus = start_nexus(settings)
    resp = client.post(nexus.url + "/admin/keys", json={"name": "alice"})
    return nexus, fake, str(resp.json()["key"])


def wire(nexus: NexusServer, headers: list[tuple[bytes, bytes]], path: bytes = CHAT.encode(),
         ) -> Answer:  # fmt: skip
    """A chat request over a raw socket, with exactly these credential headers."""
    body = orjson.dumps(chat("m"))
    sent = [
        (b"Host", f"127.0.0.1:{nexus.port}".encode()),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
        *headers,
    ]
    connection = WireClient(nexus.port)
    try:
        return connection.request(b"POST", path, sent, body)
    finally:
        connection.close()


def refused_401(answer: Answer, says: str) -> None:
    assert answer.status == 401, (answer.status, answer.body[:300])
    error = orjson.loads(answer.body)["error"]
    assert error["code"] == "invalid_api_key", error
    assert says in error["message"], error


def test_hostile_credentials_get_bounded_clear_refusals(keyed):
    nexus, fake, alice = keyed
    a = alice.encode()
    # Too big for a key: past the 64 KiB head limit, the HTTP layer's 431 (in an envelope);
    # under it, a 401 (a key is at most 512 characters: refused before hashing).
    for name in (b"Authorization", b"x-api-key"):
        scheme = b"Bearer " if name == b"Authorization" else b""
        answer = wire(nexus, [(name, scheme + b"k" * 100_000)])
        assert answer.status == 431, (answer.status, answer.body[:300])
        assert orjson.loads(answer.body)["error"]["code"] == "header_too_large"
        refused_401(wire(nexus, [(name, scheme + b"k" * 60_000)]), "Invalid API key")
        # A real key padded past the length limit is not that key.
        refused_401(wire(nexus, [(name, scheme + a * 12)]), "Invalid API key")
    # Bytes no key has: control bytes are refused by the HTTP layer in an envelope (they never
    # reach Nexus's key check); obs-text and UTF-8 reach it and are simply wrong keys.
    for control in (b"\x00", b"\x7f", b"\x1b"):
        for name, value in ((b"Authorization", b"Bearer " + a[:10] + control + a[10:]),
                            (b"x-api-key", a + control)):  # fmt: skip
            answer = wire(nexus, [(name, value)])
            assert answer.status in (400, 401), (answer.status, answer.body[:300])
            assert orjson.loads(answer.body)["error"]["message"]
    for odd in (a + b"\xff", b"\xc3\xa9" + a, "nx-ключ".encode()):
        refused_401(wire(nexus, [(b"Authorization", b"Bearer " + odd)]), "Invalid API key")
        refused_401(wire(nexus, [(b"x-api-key", odd)]), "Invalid API key")
    # A scheme with no token, or no scheme, or another scheme: as if no key was sent.
    for value in (b"Bearer", b"Bearer ", b"Bearer    ", a, b"Basic " + a, b"Token " + a, b""):
        refused_401(wire(nexus, [(b"Authorization", value)]), "Missing API key")
    refused_401(wire(nexus, [(b"x-api-key", b"   ")]), "Missing API key")
    # The scheme is case-insensitive (RFC 9110): lowercase "bearer" is a bearer token.
    assert wire(nexus, [(b"Authorization", b"bearer " + a)]).status == 200
    assert wire(nexus, [(b"Authorization", b"BEARER " + a)]).status == 200
    # A key with more after it is not that key.
    refused_401(wire(nexus, [(b"Authorization", b"Bearer " + a + b" extra")]), "Invalid API key")
    # Nothing refused went upstream: the fake saw the two served requests only.
    assert len(fake.calls(CHAT)) == 2


def test_two_keys_in_one_request(keyed, client):
    """Documented behaviour: a request carrying both headers is served when either is a live
    key (the bearer token is tried first, so a live bearer key is the one charged); both wrong
    is a 401. Two Authorization headers: each is tried, the same rule."""
    nexus, fake, alice = keyed
    a, ops = alice.encode(), CONFIG_SECRET.encode()
    wrong = b"nx-wrong-key-0123456789"
    for headers in (
        [(b"Authorization", b"Bearer " + wrong), (b"x-api-key", a)],
        [(b"Authorization", b"Bearer " + a), (b"x-api-key", wrong)],
        [(b"Authorization", b"Bearer " + wrong), (b"Authorization", b"Bearer " + a)],
    ):
        assert wire(nexus, headers).status == 200, headers
    refused_401(wire(nexus, [(b"Authorization", b"Bearer " + wrong), (b"x-api-key", wrong)]),
                "Invalid API key")  # fmt: skip
    # Two live keys: the bearer one is charged, not both.
    before = client.get(nexus.url + "/admin/keys/ops").json()["usage"]["requests"]
    alice_before = client.get(nexus.url + "/admin/keys/alice").json()["usage"]["requests"]
    assert wire(nexus, [(b"Authorization", b"Bearer " + ops), (b"x-api-key", a)]).status == 200
    assert wait_for(
        lambda: client.get(nexus.url + "/admin/keys/ops").json()["usage"]["requests"] == before + 1
    )
    assert client.get(nexus.url + "/admin/keys/alice").json()["usage"]["requests"] == alice_before
    # A revoked bearer key beside a live x-api-key: served by the live one.
    assert client.delete(nexus.url + "/admin/keys/alice").status_code == 200
    assert wire(nexus, [(b"Authorization", b"Bearer " + a), (b"x-api-key", ops)]).status == 200
    refused_401(wire(nexus, [(b"Authorization", b"Bearer " + a), (b"x-api-key", wrong)]),
                "revoked")  # fmt: skip


@pytest.mark.parametrize("via", ["bearer", "x-api-key"])
def test_a_nexus_key_is_not_sent_upstream_with_auth_off(start_fake, start_nexus, client, via):
    """Keys can be made with [auth] off (to roll keys out before turning auth on). A client that
    already sends its Nexus key then must not have it passed to the backends: the client's own
    credential still reaches a keyless backend the user added (a vLLM with its own key), but a
    credential Nexus knows as one of its keys is not the backend's."""
    fake = start_fake(FakeOpenAI(["m"]))
    nexus = start_nexus(settings_for(backends=[{"name": "local", "url": fake.url,
                                                "type": "vllm"}]))  # fmt: skip
    made = client.post(nexus.url + "/admin/keys", json={"name": "early"})
    assert made.status_code == 201, made.text
    secret = made.json()["key"]
    headers = {"Authorization": f"Bearer {secret}"} if via == "bearer" else {"x-api-key": secret}
    for path, body in (
        (CHAT, chat("m")),
        ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": HI}),
    ):
        resp = client.post(nexus.url + path, json=body, headers=headers)
        assert resp.status_code == 200, resp.text
    # A credential that is not a Nexus key still passes to the user's keyless backend.
    own = client.post(
        nexus.url + CHAT, json=chat("m"), headers={"Authorization": "Bearer vllm-own"}
    )
    assert own.status_code == 200
    sent = [f"{r.headers!r}" for r in fake.calls(CHAT)]
    assert "Bearer vllm-own" in sent[-1]
    leaked = [s for s in sent if secret in s]
    assert not leaked, f"the Nexus key went upstream with [auth] off: {leaked}"
