"""Connections are bounded (issue 8, point 4): a cap on client connections, deadlines for a
request's whole head and body that trickling bytes do not extend, an answer to every request the
server can parse, and JSON envelopes where uvicorn answered in plain text. Raw sockets only."""

from __future__ import annotations

import contextlib
import os
import select
import socket
from typing import Any

import orjson
import pytest

from tests.fakes import FakeOpenAI, Reply, text_stream
from tests.harness import NexusServer, settings_for, wait_for

CHAT = "/v1/chat/completions"
DEADLINE = 0.5  # the configured head and body deadlines in these tests
GUARD = 20.0  # seconds before a test gives up waiting for the server (a failure, not a timing)


def connect(nexus: NexusServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", nexus.port))
    sock.settimeout(GUARD)
    return sock


def head(path: str = "/health", method: str = "GET", **headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer counts as close)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def trickle_until_closed(sock: socket.socket, byte: bytes = b"a") -> bytes:
    """Send one byte every 50 ms until the server answers and closes; returns its answer."""
    data = b""
    rounds = int(GUARD / 0.05)
    for _ in range(rounds):
        readable, _, _ = select.select([sock], [], [], 0.05)  # paces the trickle
        if readable:
            return data + read_to_close(sock)
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError):
            return data + read_to_close(sock)
    raise AssertionError("the server kept a trickling request open")


def envelope(data: bytes, status: int, code: str) -> dict[str, Any]:
    """``data`` is exactly one HTTP response: ``status``, a JSON envelope, ``Connection: close``."""
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), data[:300]
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return headers


def open_connections(nexus: NexusServer) -> int:
    return len(nexus.server.server_state.connections)


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fake(start_fake):
    return start_fake(FakeOpenAI())


@pytest.fixture
def nexus(fake, start_nexus):
    server = {"header_timeout_seconds": DEADLINE, "body_timeout_seconds": DEADLINE}
    return start_nexus(settings_for(("main", fake, "vllm"), server=server))


# --- deadlines --------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_with_408(nexus):
    with connect(nexus) as sock:
        envelope(read_to_close(sock), 408, "request_timeout")
    assert wait_for(lambda: open_connections(nexus) == 0)


def test_a_trickling_head_is_cut_at_its_deadline(nexus):
    with connect(nexus) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        answer = trickle_until_closed(sock)
    envelope(answer, 408, "request_timeout")


def test_a_trickling_body_is_cut_although_bytes_keep_coming(nexus, fake):
    with connect(nexus) as sock:
        sock.sendall(
            head(CHAT, "POST", **{"Content-Type": "application/json", "Content-Length": "100000"})
        )
        answer = trickle_until_closed(sock, b" ")
    envelope(answer, 408, "request_timeout")
    assert fake.calls(CHAT) == []
    # The handler that waited for the body saw the client gone and let go of it.
    assert wait_for(lambda: open_connections(nexus) == 0)


def test_a_kept_alive_connection_gets_a_new_head_deadline(nexus):
    with connect(nexus) as sock:
        sock.sendall(head("/livez"))
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        envelope(trickle_until_closed(sock), 408, "request_timeout")


def test_a_late_head_never_interleaves_with_a_response_being_written(nexus, fake):
    """A pipelined head that stalls while the previous response streams: the stream is left
    whole (no 408 inside it) and the connection is to close when it ends."""
    fake.push(CHAT, Reply(events=text_stream(["a", "b"]), hang_after=2))
    body = orjson.dumps(
        {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    request = head(
        CHAT, "POST", **{"Content-Type": "application/json", "Content-Length": str(len(body))}
    )
    with connect(nexus) as sock:
        sock.sendall(request + body + b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        received = b""
        while b"data:" not in received:
            received += sock.recv(65536)

        def closing_after_response() -> bool:
            protocols = list(nexus.server.server_state.connections)
            return bool(protocols) and all(p.cycle.keep_alive is False for p in protocols)

        assert wait_for(closing_after_response, timeout=GUARD)  # the head deadline has passed
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"text/event-stream" in received
    assert b"408" not in received


def test_pipelined_requests_are_all_answered(nexus):
    with connect(nexus) as sock:
        sock.sendall(head("/livez") * 200 + head("/livez", Connection="close"))
        answers = read_to_close(sock)
    assert answers.count(b"HTTP/1.1 200 ") == 201


# --- answers instead of silence or plain text -----------------------------------------------


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
def test_a_post_with_upgrade_gets_an_envelope(nexus, fake, upgrade):
    body = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})
    request = head(
        CHAT,
        "POST",
        Connection="Upgrade",
        Upgrade=upgrade,
        **{"Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    with connect(nexus) as sock:
        sock.sendall(request + body)
        envelope(read_to_close(sock), 400, "invalid_request_error")
    assert fake.calls(CHAT) == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"FOO BAR\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n",
    ],
    ids=["request-line", "content-length", "non-ascii-path", "header-line", "chunk-size"],
)
def test_malformed_http_gets_an_envelope(nexus, request_bytes):
    with connect(nexus) as sock:
        sock.sendall(request_bytes)
        envelope(read_to_close(sock), 400, "invalid_request_error")


def test_a_head_past_64_kib_is_431(nexus):
    with connect(nexus) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer = b""
        for _ in range(100):  # up to 1 MiB of headers, 10 KiB at a time
            try:
                sock.sendall(b"X-Filler: " + b"a" * 10_000 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = read_to_close(sock)
    envelope(answer, 431, "header_too_large")


@pytest.mark.parametrize(
    "request_bytes",
    [
        head("/health?x=" + "a" * 70_000),
        head(**{f"X-H{i}": "b" for i in range(20_000)}),
        head(**{"X-Big": "c" * 100_000}),
    ],
    ids=["long-url", "many-headers", "one-huge-header"],
)
def test_a_head_past_64_kib_is_431_even_in_one_read(nexus, request_bytes):
    with connect(nexus) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request_bytes)
        envelope(read_to_close(sock), 431, "header_too_large")


def test_every_head_near_the_limit_gets_one_whole_answer(nexus):
    """Around 64 KiB a head is served or refused with an envelope, never left unanswered (a URL
    that httptools refused while the head completed used to end in a bare EOF)."""
    for size in range(65_380, 65_560, 12):
        with connect(nexus) as sock:
            sock.sendall(head("/health?x=" + "a" * (size - 10), Connection="close"))
            answer = read_to_close(sock)
        assert answer.startswith(b"HTTP/1.1 "), (size, answer[:100])
        if not answer.startswith(b"HTTP/1.1 200 "):
            envelope(answer, 431, "header_too_large")


def test_a_refused_websocket_handshake_is_an_envelope(nexus):
    with connect(nexus) as sock:
        sock.sendall(head("/ws", Connection="Upgrade", Upgrade="websocket"))  # no key, no version
        data = read_to_close(sock)
    assert data.startswith(b"HTTP/1.1 400 ")
    body = data.partition(b"\r\n\r\n")[2]
    error = orjson.loads(body)["error"]
    assert "Sec-WebSocket-Key" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_a_websocket_refused_by_the_app_gets_an_envelope(nexus):
    """The feed refuses a foreign Host before accepting: that 403 is JSON too."""
    handshake = head(
        "/ws",
        Connection="Upgrade",
        Upgrade="websocket",
        **{"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"},
    ).replace(b"Host: 127.0.0.1", b"Host: rebound.example")
    with connect(nexus) as sock:
        sock.sendall(handshake)
        data = read_to_close(sock)
    assert data.startswith(b"HTTP/1.1 403 "), data[:200]
    error = orjson.loads(data.partition(b"\r\n\r\n")[2])["error"]
    assert (error["type"], error["code"]) == ("permission_error", "forbidden")


# --- the connection cap and descriptors -------------------------------------------------------


def test_connections_past_the_cap_are_refused_and_service_resumes(fake, start_nexus):
    nexus = start_nexus(settings_for(("main", fake, "vllm"), server={"max_connections": 4}))
    held = [connect(nexus) for _ in range(4)]
    try:
        assert wait_for(lambda: open_connections(nexus) == 4)
        with connect(nexus) as extra:
            headers = envelope(read_to_close(extra), 503, "too_many_connections")
        assert headers["retry-after"] == "1"
        assert open_connections(nexus) == 4
    finally:
        for sock in held:
            sock.close()
    assert wait_for(lambda: open_connections(nexus) == 0)
    with connect(nexus) as sock:
        sock.sendall(head("/livez", Connection="close"))
        assert read_to_close(sock).startswith(b"HTTP/1.1 200 ")


def test_descriptors_come_back_after_a_slowloris_burst(fake, start_nexus):
    server = {"max_connections": 40, "header_timeout_seconds": DEADLINE}
    nexus = start_nexus(settings_for(("main", fake, "vllm"), server=server))
    with connect(nexus) as sock:  # warm: whatever a first request opens for good is open now
        sock.sendall(head("/livez", Connection="close"))
        read_to_close(sock)
    assert wait_for(lambda: open_connections(nexus) == 0)
    baseline = descriptors()
    slow = [connect(nexus) for _ in range(60)]  # 40 held, 20 refused at once
    for sock in slow:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
    answers = [read_to_close(sock) for sock in slow]  # every one is cut, none held
    for sock in slow:
        sock.close()
    assert sum(a.startswith(b"HTTP/1.1 408 ") for a in answers) >= 1
    assert sum(a.startswith(b"HTTP/1.1 503 ") for a in answers) >= 1
    assert wait_for(lambda: open_connections(nexus) == 0)
    assert wait_for(lambda: descriptors() <= baseline), (descriptors(), baseline)
