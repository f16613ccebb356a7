"""The cloud keys (``api_key_env`` of an ``anthropic`` and a ``google`` backend) never leave
Nexus except in the provider's own header: not in logs, ``/v1/backends``, history, stats,
metrics, the dashboard's snapshot, nor any error a client sees, even when the provider echoes
the key back in its error messages (answers, streams, stream starts and health probes)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from websockets.sync.client import connect

from tests.cloud_fakes import FakeClaude, FakeGoogle, claude_stream
from tests.fakes import Reply, sse
from tests.harness import data_events, settings_for, wait_for

CHAT = "/v1/chat/completions"
CLAUDE_KEY = "sk-ant-secret-0123456789"
GEMINI_KEY = "AIza-secret-9876543210"
KEYS = (CLAUDE_KEY, GEMINI_KEY)
CLAUDE, GEMINI = "claude-x", "gemini-x"
MESSAGES = "/v1/messages"
GENERATE = f"/v1beta/models/{GEMINI}:generateContent"
STREAM = f"/v1beta/models/{GEMINI}:streamGenerateContent"


def claude_error(status: int, kind: str) -> Reply:
    error = {"type": kind, "message": f"invalid x-api-key {CLAUDE_KEY}"}
    return Reply(status=status, json={"type": "error", "error": error})


def claude_error_event() -> bytes:
    error = {"type": "overloaded_error", "message": f"overloaded for {CLAUDE_KEY}"}
    return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": error}) + b"\n\n"


def gemini_error(code: int, status: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": f"API key {GEMINI_KEY} not valid", "status": status}}


def test_cloud_keys_are_never_shown(start_fake, start_nexus, client, monkeypatch, caplog):
    monkeypatch.setenv("NEXUS_TEST_SECRET_ANTHROPIC", CLAUDE_KEY)
    monkeypatch.setenv("NEXUS_TEST_SECRET_GEMINI", GEMINI_KEY)
    claude = start_fake(FakeClaude([CLAUDE]))
    gemini = start_fake(FakeGoogle([GEMINI]))
    caplog.set_level(logging.DEBUG)
    nexus = start_nexus(
        settings_for(
            backends=[
                {
                    "name": "claude",
                    "url": claude.url,
                    "type": "anthropic",
                    "api_key_env": "NEXUS_TEST_SECRET_ANTHROPIC",
                },
                {
                    "name": "gemini",
                    "url": gemini.url,
                    "type": "google",
                    "api_key_env": "NEXUS_TEST_SECRET_GEMINI",
                },
            ],
            health_check={"failure_threshold": 1},
        )
    )
    registry = nexus.gateway.registry
    assert wait_for(lambda: all(b.healthy for b in registry))
    shown: list[str] = []

    def post(model: str, stream: bool = False) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        resp = client.post(nexus.url + CHAT, json={**body, "stream": stream})
        text = f"{resp.status_code} {dict(resp.headers)} {resp.text}"
        shown.append(text)
        return text

    # Errors answered with a status: 401/403/400 pass on as envelopes, 5xx as Nexus's 502.
    claude.push(MESSAGES, claude_error(401, "authentication_error"))
    claude.push(MESSAGES, claude_error(403, "permission_error"))
    claude.push(MESSAGES, claude_error(529, "overloaded_error"))
    gemini.push(GENERATE, Reply(status=400, json=gemini_error(400, "INVALID_ARGUMENT")))
    gemini.push(GENERATE, Reply(status=503, json=gemini_error(503, "UNAVAILABLE")))
    for model, statuses in ((CLAUDE, ("401", "403", "502")), (GEMINI, ("400", "502"))):
        for status in statuses:
            assert post(model).startswith(status), shown[-1]
            assert "***" in shown[-1]

    # Errors inside streams: as the first event (the stream fails before it starts)...
    claude.push(MESSAGES, Reply(events=[claude_error_event()]))
    gemini.push(STREAM, Reply(events=[sse(gemini_error(500, "INTERNAL"))]))
    # ...and after some text (an error event ends the stream).
    claude.push(MESSAGES, Reply(events=[*claude_stream("Hel")[:3], claude_error_event()]))
    text = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}]}
    gemini.push(STREAM, Reply(events=[sse(text), sse(gemini_error(500, "INTERNAL"))]))
    for model in (CLAUDE, GEMINI, CLAUDE, GEMINI):
        answer = post(model, stream=True)
        assert "***" in answer, answer
    assert data_events(shown[-1])[-1] == "[DONE]"

    # Health probes whose answer echoes the key: the backend's last_error.
    claude.push("/v1/models", claude_error(401, "authentication_error"))
    gemini.push("/v1beta/models", Reply(status=400, json=gemini_error(400, "INVALID_ARGUMENT")))
    for backend in registry:
        nexus.loop.run(nexus.gateway.health.check(backend))
    assert all(not b.healthy and "***" in str(b.last_error) for b in registry)

    # Everything Nexus shows about itself.
    for path in ("/v1/backends", "/v1/history", "/v1/stats", "/metrics", "/health", "/v1/models"):
        shown.append(client.get(nexus.url + path).text)
    assert "***" in shown[-6]  # the backends' last errors, masked
    with connect(nexus.url.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        snapshot = str(ws.recv(timeout=15))
    assert '"type":"snapshot"' in snapshot and "claude" in snapshot
    shown.append(snapshot)
    shown.append(caplog.text)
    shown.extend(repr(record.__dict__) for record in caplog.records)

    for key in KEYS:
        assert all(key not in text for text in shown), key
    # The keys were really used, each only in its provider's own header.
    assert {r.headers.get("x-api-key") for r in claude.requests} == {CLAUDE_KEY}
    assert {r.headers.get("x-goog-api-key") for r in gemini.requests} == {GEMINI_KEY}
