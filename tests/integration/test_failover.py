"""Failover, fallback chains, aliases and candidate order (issue 9, 5, 10, 11)."""

from __future__ import annotations

from typing import Any

import pytest

from nexus.config import ConfigError
from nexus.registry import Status
from tests.fakes import FakeOpenAI, Reply, text_stream
from tests.harness import settings_for

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]
FAST_TIMEOUT = {"request_timeout_seconds": 0.5}
SLOW = 5.0  # an upstream delay far beyond FAST_TIMEOUT


def backend(name: str, fake: FakeOpenAI, priority: int = 50) -> dict[str, Any]:
    return {"name": name, "url": fake.url, "type": "vllm", "priority": priority}


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def chat(client, nexus, model: str = "mock-model", *, stream: bool = False, **extra: Any) -> Any:
    body = {"model": model, "messages": HELLO, **extra}
    if stream:
        body["stream"] = True
    return client.post(nexus.url + CHAT, json=body)


def assert_served(resp: Any, name: str, reason: str, *, stream: bool = False) -> None:
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-nexus-backend"] == name
    assert resp.headers["x-nexus-backend-type"] == "local"
    assert resp.headers["x-nexus-route-reason"] == reason
    if stream:
        assert resp.content.endswith(b"data: [DONE]\n\n")
    else:
        assert resp.json()["choices"][0]["message"]["content"] == "Hello!"


def status_of(nexus, name: str) -> Status:
    status: Status = nexus.gateway.registry.get(name).status
    return status


@pytest.fixture
def pair(start_fake):
    """Two fakes serving the same model; ``first`` is tried first (lower priority number)."""
    return start_fake(FakeOpenAI()), start_fake(FakeOpenAI())


def start_pair(start_nexus, pair, **sections: Any):
    """``first`` is tried first: by priority alone, so a slow probe on a busy box (smart scoring
    counts probe latency) cannot reorder the pair."""
    first, second = pair
    sections["routing"] = {"strategy": "priority_only", **sections.get("routing", {})}
    return start_nexus(
        settings_for(
            backends=[backend("first", first, 1), backend("second", second, 2)], **sections
        )
    )


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])


# --- retryable failures move on -------------------------------------------------------------


@STREAM
def test_connection_refused_fails_over_and_marks_the_backend_down(
    start_nexus, pair, kill, client, stream
):
    nexus = start_pair(start_nexus, pair)
    first, second = pair
    assert status_of(nexus, "first") is Status.HEALTHY
    kill(first)

    resp = chat(client, nexus, stream=stream)

    assert_served(resp, "second", "failover", stream=stream)
    assert status_of(nexus, "first") is Status.UNHEALTHY  # at once, not after probes
    # The next request does not try the dead backend at all: it is no longer a candidate.
    again = chat(client, nexus, stream=stream)
    assert again.status_code == 200
    assert again.headers["x-nexus-backend"] == "second"
    assert again.headers["x-nexus-route-reason"] != "failover"
    assert len(second.calls(CHAT)) == 2


@STREAM
@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_5xx_and_429_fail_over_to_the_next_backend(start_nexus, pair, client, status, stream):
    first, second = pair
    first.push(CHAT, Reply(status=status, json=envelope("busy", "server_error", "overloaded")))
    nexus = start_pair(start_nexus, pair)

    resp = chat(client, nexus, stream=stream)

    assert_served(resp, "second", "failover", stream=stream)
    assert len(first.calls(CHAT)) == 1
    assert len(second.calls(CHAT)) == 1


@STREAM
def test_timeout_before_first_byte_fails_over_but_leaves_the_backend_up(
    start_nexus, pair, client, stream
):
    first, second = pair
    reply = Reply(delay=SLOW, events=text_stream(["late"])) if stream else Reply(delay=SLOW)
    first.push(CHAT, reply)
    in_order = {"strategy": "priority_only", "affinity": False}
    nexus = start_pair(start_nexus, pair, server=FAST_TIMEOUT, routing=in_order)

    resp = chat(client, nexus, stream=stream)

    assert_served(resp, "second", "failover", stream=stream)
    # A slow generation is not an outage: the backend stays up and is tried again.
    assert status_of(nexus, "first") is Status.HEALTHY
    again = chat(client, nexus, stream=stream)
    assert again.status_code == 200
    assert again.headers["x-nexus-backend"] == "first"
    assert len(first.calls(CHAT)) == 2


# --- other 4xx go back as they came ---------------------------------------------------------


@STREAM
@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_are_returned_unchanged_and_not_retried(
    start_nexus, pair, client, status, stream
):
    first, second = pair
    error = envelope(
        f"upstream says {status}", "invalid_request_error", f"code_{status}", "messages"
    )
    first.push(CHAT, Reply(status=status, json=error))
    nexus = start_pair(start_nexus, pair)

    resp = chat(client, nexus, stream=stream)

    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == error
    assert len(first.calls(CHAT)) == 1
    assert second.calls(CHAT) == []
    assert status_of(nexus, "first") is Status.HEALTHY


# --- bounds and exhaustion ------------------------------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 1])
def test_max_retries_bounds_the_attempts(start_fake, start_nexus, client, max_retries):
    fakes = [start_fake(FakeOpenAI()) for _ in range(3)]
    for fake in fakes:
        fake.push(CHAT, Reply(status=500, json=envelope("boom", "server_error", None)))
    nexus = start_nexus(
        settings_for(
            backends=[backend(f"b{i}", fake, i) for i, fake in enumerate(fakes)],
            routing={"max_retries": max_retries},
        )
    )

    resp = chat(client, nexus)

    assert resp.status_code == 502
    assert "error" in resp.json()
    attempts = [len(fake.calls(CHAT)) for fake in fakes]
    assert attempts == [1] * (max_retries + 1) + [0] * (2 - max_retries)


@STREAM
def test_all_unreachable_is_502(start_nexus, pair, kill, client, stream):
    nexus = start_pair(start_nexus, pair)
    for fake in pair:
        kill(fake)

    resp = chat(client, nexus, stream=stream)

    assert resp.status_code == 502
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["type"] == "server_error"
    assert status_of(nexus, "first") is Status.UNHEALTHY
    assert status_of(nexus, "second") is Status.UNHEALTHY


@STREAM
def test_all_timing_out_is_504(start_nexus, pair, client, stream):
    for fake in pair:
        fake.push(CHAT, Reply(delay=SLOW, events=text_stream(["late"]) if stream else None))
    nexus = start_pair(start_nexus, pair, server=FAST_TIMEOUT)

    resp = chat(client, nexus, stream=stream)

    assert resp.status_code == 504
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["message"]
    assert [len(fake.calls(CHAT)) for fake in pair] == [1, 1]


# --- fallback chains ------------------------------------------------------------------------


def test_fallback_model_serves_when_the_model_has_no_usable_backend(
    start_fake, start_nexus, kill, client
):
    a = start_fake(FakeOpenAI(models=["model-a"]))
    c = start_fake(FakeOpenAI(models=["model-c"]))
    b = start_fake(FakeOpenAI(models=["model-b"]))
    nexus = start_nexus(
        settings_for(
            backends=[backend("a-box", a), backend("c-box", c), backend("b-box", b)],
            routing={"fallbacks": {"model-a": ["model-c", "model-b"]}},
        )
    )
    kill(a)
    kill(c)
    sent = {"model": "model-a", "messages": HELLO, "seed": 7, "x_extra": [1, {"k": None}]}

    for _ in range(2):  # first while a-box still looks healthy, then once it is marked down
        resp = client.post(nexus.url + CHAT, json=sent)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-nexus-backend"] == "b-box"
        assert resp.headers["x-nexus-fallback-model"] == "model-b"
        assert resp.headers["x-nexus-route-reason"] == "fallback"

    for call in b.calls(CHAT):
        assert call.json == {**sent, "model": "model-b"}  # only the model changed
    assert status_of(nexus, "a-box") is Status.UNHEALTHY


def test_fallback_not_used_while_the_model_is_served(start_fake, start_nexus, client):
    a = start_fake(FakeOpenAI(models=["model-a"]))
    b = start_fake(FakeOpenAI(models=["model-b"]))
    nexus = start_nexus(
        settings_for(
            backends=[backend("a-box", a), backend("b-box", b)],
            routing={"fallbacks": {"model-a": ["model-b"]}},
        )
    )

    resp = chat(client, nexus, "model-a")

    assert resp.status_code == 200
    assert resp.headers["x-nexus-backend"] == "a-box"
    assert "x-nexus-fallback-model" not in resp.headers
    assert resp.headers["x-nexus-route-reason"] != "fallback"
    assert b.calls(CHAT) == []


@STREAM
def test_fallback_after_the_model_backend_answers_503(start_fake, start_nexus, client, stream):
    a = start_fake(FakeOpenAI(models=["model-a"]))
    b = start_fake(FakeOpenAI(models=["model-b"]))
    a.push(CHAT, Reply(status=503, json=envelope("overloaded", "server_error", None)))
    nexus = start_nexus(
        settings_for(
            backends=[backend("a-box", a), backend("b-box", b)],
            routing={"fallbacks": {"model-a": ["model-b"]}},
        )
    )

    resp = chat(client, nexus, "model-a", stream=stream)

    assert resp.status_code == 200, resp.text
    assert resp.headers["x-nexus-backend"] == "b-box"
    assert resp.headers["x-nexus-fallback-model"] == "model-b"
    assert resp.headers["x-nexus-route-reason"] == "fallback"
    assert b.calls(CHAT)[0].json["model"] == "model-b"


# --- aliases ----------------------------------------------------------------------------------


@STREAM
def test_alias_chain_of_three_hops_reaches_the_backend_resolved(
    start_fake, start_nexus, client, stream
):
    fake = start_fake(FakeOpenAI())
    aliases = {"hop-1": "hop-2", "hop-2": "hop-3", "hop-3": "mock-model"}
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm"), routing={"aliases": aliases}))

    for name in ["hop-1", "hop-2", "hop-3"]:
        resp = chat(client, nexus, name, stream=stream)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-nexus-backend"] == "vllm-1"

    assert [call.json["model"] for call in fake.calls(CHAT)] == ["mock-model"] * 3


def test_alias_chain_of_four_hops_is_refused_at_load(start_fake):
    fake = start_fake(FakeOpenAI())
    aliases = {"h1": "h2", "h2": "h3", "h3": "h4", "h4": "mock-model"}
    with pytest.raises(ConfigError, match="h1"):
        settings_for(("vllm-1", fake, "vllm"), routing={"aliases": aliases})


def test_alias_fails_over_with_the_resolved_name(start_nexus, pair, client):
    first, second = pair
    first.push(CHAT, Reply(status=500, json=envelope("boom", "server_error", None)))
    nexus = start_pair(start_nexus, pair, routing={"aliases": {"house": "mock-model"}})

    resp = chat(client, nexus, "house")

    assert_served(resp, "second", "failover")
    assert first.calls(CHAT)[0].json["model"] == "mock-model"
    assert second.calls(CHAT)[0].json["model"] == "mock-model"


# --- order: priority, then fewest in flight ---------------------------------------------------


class HangingStreams(FakeOpenAI):
    """Streams send one event and then nothing, so they stay in flight until the client leaves."""

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        reply = super().default(method, path, raw)
        if reply is not None and reply.events is not None and path == CHAT:
            reply.hang_after = 1
        return reply


def test_priority_decides_the_order_not_the_name(start_fake, start_nexus, client):
    fakes = {name: start_fake(FakeOpenAI()) for name in ("a", "b", "c")}
    fakes["b"].push(CHAT, Reply(status=500, json=envelope("boom", "server_error", None)))
    nexus = start_nexus(
        settings_for(
            backends=[backend("a", fakes["a"], 3), backend("b", fakes["b"], 1)]
            + [backend("c", fakes["c"], 2)],
            routing={"max_retries": 1},
        )
    )

    resp = chat(client, nexus)

    assert_served(resp, "c", "failover")  # b (priority 1) failed, c (priority 2) served
    assert [len(fakes[n].calls(CHAT)) for n in ("a", "b", "c")] == [0, 1, 1]


def test_equal_priority_prefers_the_backend_with_fewer_in_flight(start_fake, start_nexus, client):
    one, two = start_fake(HangingStreams()), start_fake(HangingStreams())
    nexus = start_nexus(settings_for(backends=[backend("one", one, 5), backend("two", two, 5)]))
    body = {"model": "mock-model", "messages": HELLO, "stream": True}

    with client.stream("POST", nexus.url + CHAT, json=body) as held:
        busy = held.headers["x-nexus-backend"]
        idle = "two" if busy == "one" else "one"
        assert nexus.gateway.registry.get(busy).in_flight == 1

        for _ in range(3):
            resp = chat(client, nexus)
            assert resp.status_code == 200
            assert resp.headers["x-nexus-backend"] == idle


def test_priority_wins_over_fewer_in_flight(start_fake, start_nexus, client):
    preferred, spare = start_fake(HangingStreams()), start_fake(HangingStreams())
    nexus = start_nexus(
        settings_for(backends=[backend("preferred", preferred, 1), backend("spare", spare, 9)])
    )
    body = {"model": "mock-model", "messages": HELLO, "stream": True}

    with client.stream("POST", nexus.url + CHAT, json=body) as held:
        assert held.headers["x-nexus-backend"] == "preferred"
        assert nexus.gateway.registry.get("preferred").in_flight == 1
        resp = chat(client, nexus)
        assert resp.headers["x-nexus-backend"] == "preferred"
    assert spare.calls(CHAT) == []
