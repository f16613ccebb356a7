"""The fault matrix: every way an upstream can fail x chat, stream, embeddings x alone or in front
of a good backend (issue 8, point 11).

Each case starts its own Nexus (so no case inherits another's backend state) with the faulty
backend first in the plan (``priority_only``, priority 1) and, beside it, a good one (priority 2).

What must hold:

- beside a good backend, the good one serves (200, ``X-Nexus-Backend: good``, route reason
  ``failover``), except where the fault strikes after a stream's first event: then the stream is
  committed, and a clean error event followed by ``[DONE]`` ends it;
- alone, a clear error: a JSON envelope with 502, 503 or 504 (a 429 keeps its status and its
  Retry-After), or, after a stream's first event, the same error event and ``[DONE]``;
- always: every backend's in-flight count back to 0, and the process's open file descriptors back
  to what they were before the request. Nexus, the fakes and the client all live in this process,
  so a leaked upstream socket shows up here. Beside a good backend, one keep-alive connection to
  it may stay pooled (2 descriptors: Nexus's end and the fake's), hence a slack of 2 there.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import orjson
import pytest

from tests.fakes import FakeOpenAI
from tests.harness import LoopThread, NexusServer, data_events, settings_for, wait_for

from .faulty import FAULTS, RETRY_AFTER, FaultyUpstream, first_event

KINDS = ("chat", "stream", "embeddings")
PATHS = {
    "chat": "/v1/chat/completions",
    "stream": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
}
BODIES: dict[str, dict[str, Any]] = {
    "chat": {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
    "stream": {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    },
    "embeddings": {"model": "mock-model", "input": "hi"},
}
# Faults that strike after a stream's first event: the stream is committed by then.
AFTER_FIRST_EVENT = frozenset({"drop", "oversize", "slow_drip"})
MAX_RESPONSE_BYTES = 64 * 1024
SERVER = {
    "connect_timeout_seconds": 0.5,
    "request_timeout_seconds": 1.0,
    "stream_idle_timeout_seconds": 0.5,
    "max_response_bytes": MAX_RESPONSE_BYTES,
}
ENVELOPE_KEYS = ("message", "type", "param", "code")
POOLED_GOOD_CONNECTION = 2  # descriptors: Nexus's end and the in-process fake's end
CLIENT_TIMEOUT = 10.0  # far above every configured timeout: hitting it means Nexus hung


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(targets)


@pytest.fixture
def start_faulty(loop_thread: LoopThread) -> Iterator[Callable[[str], FaultyUpstream]]:
    started: list[FaultyUpstream] = []

    def start(fault: str) -> FaultyUpstream:
        upstream = FaultyUpstream(fault, oversize=4 * 1024 * 1024)
        loop_thread.run(upstream.start())
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        loop_thread.run(upstream.stop())


@pytest.fixture
def squat() -> Iterator[Callable[[int], None]]:
    """Hold a port without listening on it, so that connections to it are refused."""
    held: list[socket.socket] = []

    def hold(port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # taken meanwhile: still not our upstream
            sock.bind(("127.0.0.1", port))
        held.append(sock)

    yield hold
    for sock in held:
        sock.close()


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside_good"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault(
    fault, kind, beside, loop_thread, start_fake, start_faulty, start_nexus, squat
) -> None:
    faulty = start_faulty(fault)
    backends = [{"name": "faulty", "url": faulty.url, "type": "vllm", "priority": 1}]
    if beside:
        good = start_fake(FakeOpenAI())
        backends.append({"name": "good", "url": good.url, "type": "vllm", "priority": 2})
    nexus = start_nexus(
        settings_for(
            backends=backends,
            server=SERVER,
            routing={"strategy": "priority_only", "affinity": False},
        )
    )
    assert all(b.healthy for b in nexus.gateway.registry), "every backend starts healthy"
    if fault == "refused":  # it served its model list; now it is gone
        loop_thread.run(faulty.stop())
        squat(faulty.port)
    baseline = open_fds()

    with httpx2.Client(timeout=CLIENT_TIMEOUT) as client:
        resp = client.post(nexus.url + PATHS[kind], json=BODIES[kind])

    if kind == "stream" and fault in AFTER_FIRST_EVENT:
        assert_error_event_after_first(resp)
    elif beside:
        assert_served_by_good(resp, kind)
        assert fault == "refused" or faulty.posts >= 1, "the faulty backend was tried first"
    else:
        assert_clear_error(resp, fault)
    assert_settled(nexus, baseline + (POOLED_GOOD_CONNECTION if beside else 0))


# --- what the client sees ------------------------------------------------------------------------
def assert_served_by_good(resp: httpx2.Response, kind: str) -> None:
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["x-nexus-backend"] == "good"
    assert resp.headers["x-nexus-route-reason"] == "failover"
    if kind == "stream":
        events = data_events(resp.text)
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(event) for event in events[:-1]]
        assert all("error" not in c for c in chunks), events
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == "Hello there!"
    elif kind == "chat":
        assert resp.json()["choices"][0]["message"]["content"] == "Hello!"
    else:
        assert resp.json()["data"][0]["embedding"] == [0.1, 0.2, 0.0]


def assert_clear_error(resp: httpx2.Response, fault: str) -> None:
    """A JSON envelope; 429 stays 429 (with the backend's Retry-After), anything else is 5xx."""
    if fault == "status_429":  # the backend's own envelope passes through, as it came
        assert resp.status_code == 429, resp.text[:500]
        assert resp.headers.get("retry-after") == RETRY_AFTER
        assert_envelope(resp, keys={"message", "type"})
    else:
        assert resp.status_code in (502, 503, 504), (resp.status_code, resp.text[:500])
        assert_envelope(resp)


def assert_envelope(
    resp: httpx2.Response, keys: frozenset[str] | set[str] = frozenset(ENVELOPE_KEYS)
) -> None:
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), resp.text[:500]
    error = body["error"]
    assert keys <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]


def assert_error_event_after_first(resp: httpx2.Response) -> None:
    """Committed to the faulty backend at its first event: that event, one error event, [DONE],
    and nothing else (no half event, no oversize garbage)."""
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["x-nexus-backend"] == "faulty"
    events = data_events(resp.text)
    assert len(events) == 3, [event[:200] for event in events]
    first = data_events(first_event().decode())[0]
    assert events[0] == first
    error = orjson.loads(events[1]).get("error")
    assert isinstance(error, dict), events[1][:500]
    assert isinstance(error.get("message"), str) and error["message"]
    assert isinstance(error.get("type"), str) and error["type"]
    assert events[2] == "[DONE]"


# --- what must be true afterwards ----------------------------------------------------------------
def assert_settled(nexus: NexusServer, fd_limit: int) -> None:
    registry = nexus.gateway.registry
    in_flight = lambda: {b.name: b.in_flight for b in registry}  # noqa: E731
    assert wait_for(lambda: not any(in_flight().values()), timeout=5), in_flight()
    if not wait_for(lambda: open_fds() <= fd_limit, timeout=10):
        pytest.fail(f"{open_fds()} descriptors open, at most {fd_limit} expected: {fd_targets()}")
