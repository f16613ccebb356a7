"""Every error Nexus answers with is an OpenAI envelope with the right status (issue 10, 11)."""

from __future__ import annotations

import contextlib
import re
import socket
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.fakes import FakeOpenAI
from tests.harness import settings_for

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def assert_envelope(resp: Any, status: int) -> dict[str, Any]:
    """The response is ``status`` with a JSON OpenAI error envelope; returns the parsed body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body, dict)
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    result: dict[str, Any] = body
    return result


def squat(port: int) -> socket.socket:
    """Hold ``port`` without listening, so connections to it are refused and nobody reuses it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with contextlib.suppress(OSError):  # taken meanwhile: not our fake, still dead for Nexus
        sock.bind(("127.0.0.1", port))
    return sock


@pytest.fixture
def fake(start_fake):
    return start_fake(FakeOpenAI(models=["mock-model", "other-model"]))


@pytest.fixture
def nexus(fake, start_nexus):
    return start_nexus(settings_for(("vllm-1", fake, "vllm")))


# --- request validation ---------------------------------------------------------------------


def test_malformed_json_is_400(nexus, fake, client):
    resp = client.post(
        nexus.url + CHAT, content=b'{"model": "mock-model", "messages": [', headers=_json()
    )
    body = assert_envelope(resp, 400)
    assert body["error"]["type"] == "invalid_request_error"
    assert fake.calls(CHAT) == []


def test_missing_model_is_400_naming_the_param(nexus, client):
    resp = client.post(nexus.url + CHAT, json={"messages": HELLO})
    body = assert_envelope(resp, 400)
    assert body["error"]["param"] == "model"
    assert body["error"]["type"] == "invalid_request_error"


def test_messages_not_a_list_is_400(nexus, client):
    resp = client.post(nexus.url + CHAT, json={"model": "mock-model", "messages": "hi"})
    body = assert_envelope(resp, 400)
    assert body["error"]["param"] == "messages"


def test_stream_not_a_boolean_is_400(nexus, fake, client):
    resp = client.post(
        nexus.url + CHAT, json={"model": "mock-model", "messages": HELLO, "stream": "yes"}
    )
    body = assert_envelope(resp, 400)
    assert body["error"]["param"] == "stream"
    assert fake.calls(CHAT) == []


ODD_BODIES = [
    b"",
    b"[]",
    b'[{"model": "mock-model"}]',
    b"42",
    b"null",
    b"true",
    b'"a string"',
    b"\xff\xfe\x00garbage",
    b'{"model": null, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": ["mock-model"], "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "mock-model"}',
    b'{"model": "mock-model", "messages": null}',
    b'{"model": "mock-model", "messages": []}',
    b'{"model": "mock-model", "messages": ["hi", 1]}',
    b'{"model": "mock-model", "messages": [null]}',
    b'{"model": "mock-model", "messages": {"role": "user", "content": "hi"}}',
    b'{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": 1}',
    b"[" * 5000 + b"]" * 5000,
    b'{"model": "mock-model", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "n": 1e999}',
    b'{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "n": NaN}',
]


@pytest.mark.parametrize("raw", ODD_BODIES, ids=[repr(b[:40]) for b in ODD_BODIES])
def test_odd_bodies_are_client_errors_not_500(nexus, fake, client, raw):
    resp = client.post(nexus.url + CHAT, content=raw, headers=_json())
    assert_envelope(resp, 400)
    assert fake.calls(CHAT) == []


def test_unknown_model_is_404_listing_available_models_without_contacting_a_backend(
    nexus, fake, client
):
    resp = client.post(nexus.url + CHAT, json={"model": "no-such-model", "messages": HELLO})
    body = assert_envelope(resp, 404)
    assert body["error"]["code"] == "model_not_found"
    message = body["error"]["message"]
    assert "no-such-model" in message
    assert "mock-model" in message and "other-model" in message
    assert fake.calls(CHAT) == []


def test_unknown_model_is_a_json_404_for_a_stream_request_too(nexus, fake, client):
    sent = {"model": "no-such-model", "messages": HELLO, "stream": True}
    resp = client.post(nexus.url + CHAT, json=sent)
    body = assert_envelope(resp, 404)
    assert body["error"]["code"] == "model_not_found"
    assert fake.calls(CHAT) == []


# --- method, path, size ---------------------------------------------------------------------


def test_wrong_method_is_405_with_allow_header(nexus, client):
    resp = client.get(nexus.url + CHAT)
    assert_envelope(resp, 405)
    assert "POST" in resp.headers["allow"]


def test_post_to_a_get_only_route_is_405(nexus, client):
    resp = client.post(nexus.url + "/v1/models", json={})
    assert_envelope(resp, 405)
    assert "GET" in resp.headers["allow"]


def test_unknown_path_is_404_envelope(nexus, client):
    resp = client.post(nexus.url + "/v1/no/such/endpoint", json={"model": "mock-model"})
    assert_envelope(resp, 404)
    resp = client.get(nexus.url + "/definitely-not-here")
    assert_envelope(resp, 404)


def _oversized_body() -> bytes:
    filler = "x" * (10 * 1024 * 1024)
    return orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": filler}]})


def test_body_over_10_mib_is_413_envelope(nexus, fake, client):
    resp = client.post(nexus.url + CHAT, content=_oversized_body(), headers=_json())
    body = assert_envelope(resp, 413)
    assert body["error"]["type"] == "invalid_request_error"
    assert fake.calls(CHAT) == []


def test_chunked_body_over_10_mib_is_413_envelope(nexus, fake, client):
    raw = _oversized_body()
    step = 256 * 1024

    def chunks():
        for start in range(0, len(raw), step):
            yield raw[start : start + step]

    resp = client.post(nexus.url + CHAT, content=chunks(), headers=_json())
    assert "content-length" not in resp.request.headers
    assert_envelope(resp, 413)
    assert fake.calls(CHAT) == []


class RoomyFake(FakeOpenAI):
    """aiohttp refuses bodies over 1 MiB by default; a real backend takes far more."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app


def test_body_just_under_10_mib_is_accepted(start_fake, start_nexus, client):
    fake = start_fake(RoomyFake())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    filler = "x" * (10 * 1024 * 1024 - 200)
    raw = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": filler}]})
    assert len(raw) <= 10 * 1024 * 1024
    resp = client.post(nexus.url + CHAT, content=raw, headers=_json())
    assert resp.status_code == 200, resp.text
    assert fake.calls(CHAT)[0].raw == raw


# --- nothing healthy ------------------------------------------------------------------------


def test_nothing_healthy_is_503_with_context_naming_each_backend(
    start_fake, start_nexus, client, loop_thread
):
    one = start_fake(FakeOpenAI())
    two = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", one, "vllm"), ("vllm-2", two, "generic")))
    held = []
    for fake in (one, two):  # both die after Nexus learnt their models
        loop_thread.run(fake.stop())
        held.append(squat(fake.port))
    try:
        first = client.post(nexus.url + CHAT, json={"model": "mock-model", "messages": HELLO})
        assert_envelope(first, 502)  # tried both, neither reachable
        resp = client.post(nexus.url + CHAT, json={"model": "mock-model", "messages": HELLO})
    finally:
        for sock in held:
            sock.close()
    body = assert_envelope(resp, 503)
    context = body["context"]
    excluded = {entry["backend"]: entry for entry in context["excluded"]}
    assert set(excluded) == {"vllm-1", "vllm-2"}
    for entry in excluded.values():
        assert "unhealthy" in entry["reason"]


# --- X-Request-Id -----------------------------------------------------------------------------


def test_client_request_id_is_echoed(nexus, client):
    ok = client.post(
        nexus.url + CHAT,
        json={"model": "mock-model", "messages": HELLO},
        headers={"X-Request-Id": "client-id-123"},
    )
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == "client-id-123"
    failed = client.post(
        nexus.url + CHAT,
        json={"model": "nope", "messages": HELLO},
        headers={"X-Request-Id": "client-id-456"},
    )
    assert_envelope(failed, 404)
    assert failed.headers["x-request-id"] == "client-id-456"


def test_request_id_is_generated_when_absent(nexus, client):
    ok = client.post(nexus.url + CHAT, json={"model": "mock-model", "messages": HELLO})
    assert ok.status_code == 200
    assert HEX32.match(ok.headers["x-request-id"])
    answers = [
        client.post(nexus.url + CHAT, content=b"{oops", headers=_json()),
        client.get(nexus.url + CHAT),
        client.get(nexus.url + "/nowhere"),
        client.post(nexus.url + CHAT, json={"model": "nope", "messages": HELLO}),
    ]
    ids = {ok.headers["x-request-id"]}
    for resp in answers:
        assert resp.status_code >= 400
        assert HEX32.match(resp.headers["x-request-id"]), resp.headers
        ids.add(resp.headers["x-request-id"])
    assert len(ids) == 1 + len(answers)  # a fresh id each time


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}
