"""Failover keeps its promise (issue 8, point 6): a stream commits to a backend at its first
event, not its headers; a timeout is not an outage (only a connection that cannot be made marks a
backend down); a connection lost before the request is sent fails over at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import orjson
import pytest

from nexus.registry import Backend, Status
from tests.fakes import FakeOllama, FakeOpenAI, FakeUpstream, Reply, text_stream
from tests.harness import LoopThread, NexusServer, data_events, settings_for, wait_for

MODEL = "mock-model"
HELLO = [{"role": "user", "content": "hi"}]
GUARD = httpx2.Timeout(20.0)  # a hang fails the test instead of blocking it
# The first event must come within the request timeout; the idle timeout, far longer here, only
# counts once a stream has started.
SHORT = {"request_timeout_seconds": 1.0, "stream_idle_timeout_seconds": 60}
SLOW = 10.0  # an upstream delay far beyond the request timeout
IN_ORDER = {"strategy": "priority_only", "affinity": False}  # the plan follows priorities alone

DIALECTS = {
    "vllm": (FakeOpenAI, "/v1/chat/completions", "Hello there!"),
    "ollama": (FakeOllama, "/api/chat", "Hello"),
}
# Ways to fail after a 200 and before the first event: silence, a drop, an empty body.
BEFORE_FIRST_EVENT: dict[str, dict[str, Any]] = {
    "headers-then-hang": {"hang_after": 0},
    "headers-then-close": {"drop_after": 0},
    "headers-then-empty-body": {"events": []},
}


def backend(name: str, fake: FakeUpstream, kind: str, priority: int) -> dict[str, Any]:
    return {"name": name, "url": fake.url, "type": kind, "priority": priority}


def post(client: httpx2.Client, nexus: NexusServer, *, stream: bool) -> httpx2.Response:
    body: dict[str, Any] = {"model": MODEL, "messages": HELLO}
    if stream:
        body["stream"] = True
    return client.post(nexus.url + "/v1/chat/completions", json=body, timeout=GUARD)


def streamed_text(resp: httpx2.Response) -> str:
    """The content of an OpenAI chunk stream, checked to end in ``[DONE]`` without an error."""
    events = data_events(resp.text)
    assert events[-1] == "[DONE]", events
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks), chunks
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def assert_served_by(resp: httpx2.Response, name: str) -> None:
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-nexus-backend"] == name
    assert resp.headers["x-nexus-route-reason"] == "failover"


def assert_idle(nexus: NexusServer, *names: str) -> None:
    backends = [backend_of(nexus, name) for name in names]
    assert wait_for(lambda: all(b.in_flight == 0 for b in backends)), backends


def backend_of(nexus: NexusServer, name: str) -> Backend:
    backend = nexus.gateway.registry.get(name)
    assert backend is not None
    return backend


def status_of(nexus: NexusServer, name: str) -> Status:
    return backend_of(nexus, name).status


def failures_of(nexus: NexusServer, name: str) -> int:
    """How many of ``name``'s recorded outcomes were failures (the quality window)."""
    router = nexus.gateway.dispatcher.router
    verdict = router.quality.verdict(name, MODEL, nexus.gateway.dispatcher.clock())
    return round(verdict.error_rate * verdict.requests)


# --- the commit point is the first event --------------------------------------------------------


@pytest.mark.parametrize("fault", list(BEFORE_FIRST_EVENT))
@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_a_stream_that_fails_before_its_first_event_goes_to_the_next_backend(
    start_fake, start_nexus, client, dialect, fault
):
    kind, path, text = DIALECTS[dialect]
    flaky, good = start_fake(kind(models=[MODEL])), start_fake(kind(models=[MODEL]))
    reply = flaky.default("POST", path, orjson.dumps({"model": MODEL, "stream": True}))
    assert reply is not None and reply.events
    for key, value in BEFORE_FIRST_EVENT[fault].items():
        setattr(reply, key, value)
    flaky.push(path, reply)
    nexus = start_nexus(
        settings_for(
            backends=[backend("flaky", flaky, dialect, 1), backend("good", good, dialect, 2)],
            server=SHORT,
            routing=IN_ORDER,
        )
    )

    resp = post(client, nexus, stream=True)

    assert_served_by(resp, "good")  # the headers name the backend that sent the events
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert streamed_text(resp) == text
    assert (len(flaky.calls(path)), len(good.calls(path))) == (1, 1)
    assert_idle(nexus, "flaky", "good")
    assert failures_of(nexus, "flaky") == 1  # recorded against the backend that failed
    assert status_of(nexus, "flaky") is Status.HEALTHY  # a failed answer is not an outage
    if fault == "headers-then-hang":
        assert flaky.wait_disconnect(timeout=5.0), "the silent upstream was left open"


def test_after_the_first_event_the_stream_is_committed(start_fake, start_nexus, client):
    first, second = start_fake(FakeOpenAI()), start_fake(FakeOpenAI())
    events = text_stream(["one", "two", "three"])
    first.push("/v1/chat/completions", Reply(events=events, drop_after=1))
    nexus = start_nexus(
        settings_for(
            backends=[backend("first", first, "vllm", 1), backend("second", second, "vllm", 2)],
            server=SHORT,
            routing=IN_ORDER,
        )
    )

    resp = post(client, nexus, stream=True)

    assert resp.status_code == 200
    assert resp.headers["x-nexus-backend"] == "first"
    out = data_events(resp.text)
    assert out[0] == events[0][len(b"data: ") : -2].decode()  # the first event, as sent
    assert orjson.loads(out[1])["error"]["code"] == "bad_gateway"
    assert out[2:] == ["[DONE]"]
    assert second.calls("/v1/chat/completions") == []
    assert_idle(nexus, "first", "second")


# --- a timeout is not an outage; a refused connection is ----------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_timeout_leaves_the_backend_up_a_refused_connection_marks_it_down(
    start_fake, start_nexus, client, kill, stream
):
    slow, dead, good = (start_fake(FakeOpenAI()) for _ in range(3))
    slow.push(
        "/v1/chat/completions", Reply(delay=SLOW, events=text_stream(["late"]) if stream else None)
    )
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("slow", slow, "vllm", 1),
                backend("dead", dead, "vllm", 2),
                backend("good", good, "vllm", 3),
            ],
            server=SHORT,
            routing={**IN_ORDER, "max_retries": 2},
        )
    )
    kill(dead)

    resp = post(client, nexus, stream=stream)

    assert_served_by(resp, "good")
    assert status_of(nexus, "slow") is Status.HEALTHY  # a slow generation is not an outage
    assert status_of(nexus, "dead") is Status.UNHEALTHY  # a refused connection is
    assert failures_of(nexus, "slow") == 1  # the timeout counts against its quality
    assert_idle(nexus, "slow", "dead", "good")
    # The slow backend is still first in line, and answers in time now.
    again = post(client, nexus, stream=stream)
    assert again.status_code == 200
    assert again.headers["x-nexus-backend"] == "slow"
    assert len(slow.calls("/v1/chat/completions")) == 2


# --- a connection lost before the request went out ----------------------------------------------


class _CloseAtOnce(asyncio.Protocol):
    """Accepts a connection and closes it before reading a byte."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


@pytest.fixture
def close_on_accept(loop_thread: LoopThread) -> Iterator[Callable[[FakeUpstream], None]]:
    """Stop a fake after Nexus learnt its models and listen on its port instead, closing every
    connection as soon as it is accepted."""
    servers: list[asyncio.Server] = []

    async def listen(port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(_CloseAtOnce, "127.0.0.1", port, reuse_address=True)

    def close_on_accept(fake: FakeUpstream) -> None:
        loop_thread.run(fake.stop())
        servers.append(loop_thread.run(listen(fake.port)))

    yield close_on_accept
    for server in servers:
        server.close()
        loop_thread.run(server.wait_closed())


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_connection_closed_before_the_request_fails_over(
    start_fake, start_nexus, client, close_on_accept, stream
):
    closing, good = start_fake(FakeOpenAI()), start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(
            backends=[backend("closing", closing, "vllm", 1), backend("good", good, "vllm", 2)],
            # Only a prompt failure can pass: waiting for a timeout would outlast GUARD.
            server={"request_timeout_seconds": 60, "stream_idle_timeout_seconds": 60},
            routing=IN_ORDER,
        )
    )
    close_on_accept(closing)

    for _ in range(2):  # and again: the backend is not marked down, it is tried each time
        resp = post(client, nexus, stream=stream)
        assert_served_by(resp, "good")
        if stream:
            assert streamed_text(resp) == "Hello there!"
    assert_idle(nexus, "closing", "good")
