"""An OpenAI-compatible upstream that fails in one chosen way, written on raw asyncio streams.

aiohttp (``tests/fakes.py``) always speaks correct HTTP; the faults here need bytes on the wire
that no framework writes: a status line and headers and then nothing, a body cut off mid-way,
an RST (``SO_LINGER`` 0), one byte at a time. ``GET /v1/models`` always answers correctly (with
``Connection: close``, so no probe connection stays pooled), so that Nexus learns the model at
start-up; every ``POST`` meets the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

import orjson

from tests.fakes import completion, text_stream

MODEL = "mock-model"
FAULTS = (
    "refused",  # the port is closed: connections are refused
    "hang",  # the request is read, nothing is ever answered
    "headers_hang",  # a 200 status line and headers, then nothing
    "headers_close",  # a 200 status line and headers, then the connection closes
    "status_500",  # a 500 with a plain-text body
    "status_429",  # a 429 with Retry-After
    "drop",  # the body is cut off: mid-body, or mid-stream after the first event
    "reset",  # the request is read, then the connection is reset (RST)
    "bad_json",  # a 200 application/json body that is not JSON
    "malformed_sse",  # a 200 text/event-stream body that carries no SSE event
    "oversize",  # more bytes than max_response_bytes: one body, or one event with no boundary
    "slow_drip",  # one byte per DRIP_SECONDS: the whole answer, or after a stream's first event
)
RETRY_AFTER = "7"
DRIP_SECONDS = 0.05


def first_event() -> bytes:
    """The one valid event a stream sends before a fault that strikes after it."""
    return text_stream(["Hello"])[0]


class FaultyUpstream:
    """Serves ``/v1/models``; answers every POST with ``fault``. ``oversize`` is how many bytes the
    ``oversize`` fault sends."""

    def __init__(self, fault: str, oversize: int = 4 * 1024 * 1024) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        self.fault = fault
        self.oversize = oversize
        self.port = 0
        self.posts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection (the port is then refused)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- one connection ------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, body = request
                if method == "GET" and path == "/v1/models":
                    data = [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fault"}]
                    payload = orjson.dumps({"object": "list", "data": data})
                    writer.write(_head(200, "application/json", len(payload), close=True))
                    writer.write(payload)
                    await writer.drain()
                    return
                self.posts += 1
                stream = path == "/v1/chat/completions" and _wants_stream(body)
                await self._fault(reader, writer, path, stream)
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._tasks.discard(task)
            if self.fault == "reset":
                writer.transport.abort()  # with SO_LINGER 0 set: an RST
            else:  # what was written still goes out, then a FIN
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def _fault(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, stream: bool
    ) -> None:
        answer = _answer(path, stream)
        send = _sender(writer, reader)
        fault = self.fault
        if fault == "hang":
            await _until_closed(reader)
        elif fault in ("headers_hang", "headers_close"):
            await send(_stream_head() if stream else _head(200, "application/json", len(answer)))
            if fault == "headers_hang":
                await _until_closed(reader)
        elif fault == "status_500":
            await send(_whole(500, "text/plain", b"upstream exploded"))
        elif fault == "status_429":
            body = orjson.dumps(
                {"error": {"message": "slow down", "type": "rate_limit_error", "code": None}}
            )
            await send(_whole(429, "application/json", body, f"Retry-After: {RETRY_AFTER}\r\n"))
        elif fault == "drop":
            if stream:
                await send(_stream_head() + _chunk(first_event()))
            else:
                await send(_head(200, "application/json", len(answer)) + answer[: len(answer) // 2])
        elif fault == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif fault == "bad_json":
            await send(_whole(200, "application/json", b"not json{"))
        elif fault == "malformed_sse":
            await self._malformed_sse(send, stream)
        elif fault == "oversize":
            await self._oversize(send, path, stream)
        elif fault == "slow_drip":
            await self._drip(send, answer, stream)

    async def _malformed_sse(self, send: Callable[[bytes], Awaitable[None]], stream: bool) -> None:
        if stream:  # lines without a field or a blank line: no event at all, then a clean end
            junk = b"this is not an event stream\n" * 3 + b"{still: not sse}\n"
            await send(_stream_head() + _chunk(junk) + b"0\r\n\r\n")
        else:  # an event stream where a JSON body was due
            events = b"".join(text_stream(["not", "json"]))
            await send(_whole(200, "text/event-stream", events))

    async def _oversize(
        self, send: Callable[[bytes], Awaitable[None]], path: str, stream: bool
    ) -> None:
        if stream:  # one event that never ends, bigger than any sane limit; then a clean end
            endless = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * self.oversize
            await send(_stream_head() + _chunk(first_event()) + _chunk(endless) + b"0\r\n\r\n")
        else:  # a well-formed, complete answer that is simply too big
            await send(_whole(200, "application/json", _answer(path, stream, self.oversize)))

    async def _drip(
        self, send: Callable[[bytes], Awaitable[None]], answer: bytes, stream: bool
    ) -> None:
        if stream:  # a first event, then an event that never completes, one byte at a time
            await send(_stream_head() + _chunk(first_event()))
            endless = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"z" * 100_000
            for byte in endless:
                await send(_chunk(bytes([byte])))
                await asyncio.sleep(DRIP_SECONDS)
        else:  # the whole answer, status line included, one byte at a time
            for byte in _head(200, "application/json", len(answer)) + answer:
                await send(bytes([byte]))
                await asyncio.sleep(DRIP_SECONDS)


# --- HTTP pieces ---------------------------------------------------------------------------------
async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return method, path.split("?", 1)[0], body


def _wants_stream(body: bytes) -> bool:
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(body)
        return isinstance(data, dict) and data.get("stream") is True
    return False


def _answer(path: str, stream: bool, size: int = 0) -> bytes:
    """The correct answer's body (padded to about ``size`` bytes when asked)."""
    if path == "/v1/embeddings":
        vector = [0.25] * max(3, size // 5)
        data = [{"object": "embedding", "index": 0, "embedding": vector}]
        usage = {"prompt_tokens": 1, "total_tokens": 1}
        return orjson.dumps({"object": "list", "data": data, "model": MODEL, "usage": usage})
    if stream:
        return b"".join(text_stream(["Hello", " there"]))
    return orjson.dumps(completion(content="Hello!" + "x" * size))


def _head(status: int, content_type: str, length: int, *, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    head = f"HTTP/1.1 {status} Fault\r\nContent-Type: {content_type}\r\n{connection}"
    return f"{head}Content-Length: {length}\r\n\r\n".encode()


def _whole(status: int, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status} Fault\r\nContent-Type: {content_type}\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _stream_head() -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sender(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader
) -> Callable[[bytes], Awaitable[None]]:
    """Write and flush; once Nexus has closed its end, stop (a drip would go on for minutes)."""

    async def send(data: bytes) -> None:
        if reader.at_eof():
            raise ConnectionResetError("the client closed the connection")
        writer.write(data)
        await writer.drain()

    return send


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Answer nothing, but notice when Nexus gives up and closes the connection."""
    while await reader.read(65536):
        pass
