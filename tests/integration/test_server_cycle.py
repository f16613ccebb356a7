"""Nexus's response head (``nexus/server_cycle.py``) writes what uvicorn's would: framing headers
read the same way, chunked encoding when no length is given, names lower-cased, and no header that
could split the response. Header lines Nexus made itself (``RAW_HEAD``) go out as they are, also
when the head is written by uvicorn's own path (the client is not reading). Raw sockets, a real
server with Nexus's protocol, a small ASGI app."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl

from nexus.api.http import RAW_HEAD, header_pairs
from nexus.config import Settings
from nexus.server_cycle import NexusCycle
from nexus.serving import uvicorn_config
from tests.harness import LoopThread

GUARD = 20.0
SEEN: list[Scope] = []  # the scopes the app was called with

RAW = b"x-request-id: abc\r\nx-ratelimit-limit-requests: 50\r\n"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    SEEN.append(scope)
    path = scope["path"]
    start: dict[str, Any] = {"type": "http.response.start", "status": 200, "headers": []}
    body = b"hello"
    if path == "/raw":
        start["headers"] = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
        start[RAW_HEAD] = RAW
    elif path == "/no-length":
        start["headers"] = [(b"content-type", b"text/plain")]
    elif path == "/empty":
        start["status"], body = 204, b""
    elif path == "/close":
        start["headers"] = [(b"content-length", b"5"), (b"Connection", b"Close")]
    elif path == "/mixed-case":
        start["headers"] = [(b"Content-Length", b"5"), (b"X-Custom", b"yes")]
    elif path == "/split-value":
        start["headers"] = [(b"content-length", b"5"), (b"x-bad", b"a\r\nx-injected: 1")]
    elif path == "/split-name":
        start["headers"] = [(b"content-length", b"5"), (b"x-bad\r\nx-injected", b"1")]
    await send(start)
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    loop = LoopThread()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(Settings(), app, lifespan="off")
    uv = uvicorn.Server(config)
    task = loop.run(_serve(uv, sock))
    try:
        yield port
    finally:
        uv.should_exit = True
        loop.run(_wait(task))
        loop.close()


async def _serve(uv: uvicorn.Server, sock: socket.socket) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(uv.serve(sockets=[sock]))
    while not uv.started:  # readiness, not timing
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    return task


async def _wait(task: asyncio.Task[None]) -> None:
    await task


def exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` on a new connection; what came back, and whether the server closed it
    right after (else the connection stays open for the next request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        fields = dict(header_pairs(head.split(b"\r\n", 1)[1] + b"\r\n"))
        chunked = fields.get(b"transfer-encoding") == b"chunked"
        want = int(fields.get(b"content-length", b"0"))  # none: no body (204, HEAD)
        while len(rest) < want or (chunked and not rest.endswith(b"0\r\n\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                return data + rest[len(data) :], True
            rest += chunk
        try:
            sock.sendall(get("/raw"))  # a next request: answered unless the server closed
            closed = sock.recv(65536) == b""
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        return head + b"\r\n\r\n" + rest, closed


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def parse(data: bytes) -> tuple[str, list[tuple[bytes, bytes]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, _, lines = head.partition(b"\r\n")
    return status.decode(), header_pairs(lines + b"\r\n"), body


def test_the_server_offers_the_raw_head_extension(server: int) -> None:
    exchange(server, get("/raw"))
    assert RAW_HEAD in SEEN[-1]["extensions"]


def test_raw_lines_are_written_as_headers_after_the_apps_own(server: int) -> None:
    data, closed = exchange(server, get("/raw"))
    status, headers, body = parse(data)

    assert status == "HTTP/1.1 200 OK"
    names = [name for name, _ in headers]
    assert names[-2:] == [b"x-request-id", b"x-ratelimit-limit-requests"]
    assert (b"content-type", b"text/plain") in headers
    assert dict(headers)[b"x-ratelimit-limit-requests"] == b"50"
    assert body == b"hello" and not closed


def test_an_answer_without_a_length_is_chunked(server: int) -> None:
    data, closed = exchange(server, get("/no-length"))
    _, headers, body = parse(data)

    assert dict(headers)[b"transfer-encoding"] == b"chunked"
    assert body == b"5\r\nhello\r\n0\r\n\r\n" and not closed


def test_no_body_no_chunking_for_204_and_head(server: int) -> None:
    data, _ = exchange(server, get("/empty"))
    status, headers, _ = parse(data)
    assert status.startswith("HTTP/1.1 204") and b"transfer-encoding" not in dict(headers)

    data, _ = exchange(server, get("/no-length", "HEAD"))
    status, headers, body = parse(data)
    assert status.startswith("HTTP/1.1 200") and b"transfer-encoding" not in dict(headers)
    assert body == b""


def test_connection_close_from_the_app_closes_after_the_answer(server: int) -> None:
    data, closed = exchange(server, get("/close"))
    _, headers, body = parse(data)

    assert dict(headers)[b"connection"] == b"Close"
    assert body == b"hello" and closed


def test_header_names_are_lower_cased(server: int) -> None:
    data, _ = exchange(server, get("/mixed-case"))
    _, headers, _ = parse(data)

    assert (b"x-custom", b"yes") in headers and (b"content-length", b"5") in headers


@pytest.mark.parametrize("path", ["/split-value", "/split-name"])
def test_a_header_that_would_split_the_response_is_never_written(server: int, path: str) -> None:
    data, closed = exchange(server, get(path))

    assert b"x-injected" not in data
    assert closed  # the answer could not be made: the connection ends, as under uvicorn


class _Transport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _send_through_uvicorn() -> bytes:
    transport = _Transport()
    cycle = NexusCycle(
        scope={  # type: ignore[typeddict-item]
            "method": "GET",
            "path": "/",
            "query_string": b"",
            "http_version": "1.1",
            "client": ("127.0.0.1", 5),
        },
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=True,  # uvicorn's path writes the head (as when the client is not reading)
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )
    message = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-length", b"5")],
        RAW_HEAD: RAW,
    }
    await cycle.send(message)
    return transport.written


def test_raw_lines_survive_uvicorns_own_path() -> None:
    written = asyncio.run(_send_through_uvicorn())

    status, headers, _ = parse(written)
    assert status == "HTTP/1.1 200 OK"
    assert headers == [
        (b"content-length", b"5"),
        (b"x-request-id", b"abc"),
        (b"x-ratelimit-limit-requests", b"50"),
    ]


def test_header_pairs_reads_what_raw_lines_carry() -> None:
    assert header_pairs(RAW) == [(b"x-request-id", b"abc"), (b"x-ratelimit-limit-requests", b"50")]
    assert header_pairs(b"") == []
