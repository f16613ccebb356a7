"""The HTTP/1.1 upstream client against raw loopback servers that write exact bytes.

Every test runs twice: on asyncio's own event loop and on uvloop (the loop Nexus serves on).
Servers are ``asyncio.start_server`` on 127.0.0.1 port 0; each accepted connection runs a handler
that reads requests and writes the bytes the test chose. Ordering between the two sides is made
with events, never with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from nexus.backends import http1
from nexus.backends.http1 import ConnectFailed, HTTP1Client, ProtocolError, Target

T = TypeVar("T")

TEST_TIMEOUT = 10.0  # a bound on each test, not a timing assertion


# -- running a test on a loop -------------------------------------------------------------------
class Run:
    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
        self.loop_factory = loop_factory

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(TEST_TIMEOUT):
                return await coro

        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            return runner.run(bounded())


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    return Run(None if request.param == "asyncio" else uvloop.new_event_loop)


# -- a raw server -------------------------------------------------------------------------------
Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Handler = Callable[["RawServer", Reader, Writer, int], Awaitable[None]]


class RawServer:
    """Counts accepted connections and records each request (head and body) it reads."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.accepted = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        if self.errors and exc_info[0] is None:
            raise self.errors[0]

    async def _serve(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self.accepted
        self.accepted += 1
        try:
            await self.handler(self, reader, writer, index)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # reported by __aexit__: a server bug must fail the test
            self.errors.append(exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def read_request(self, reader: Reader) -> tuple[bytes, bytes] | None:
        """One whole request (head, body); None when the client closed between requests."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head, body


def ok(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    """A Content-Length response."""
    head = [b"HTTP/1.1 " + status, b"Content-Length: " + str(len(body)).encode()]
    head.extend(headers)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def answer_each(response: bytes) -> Handler:
    """Keep-alive: answer every request on the connection with ``response``."""

    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(response)
            await writer.drain()

    return handler


async def until_eof(reader: Reader) -> None:
    """Wait for the client to close its side (anything it still sends is dropped)."""
    while await reader.read(65536):
        pass


def parse_head(head: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode().lower(), value.strip().decode()))
    return lines[0], headers


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- 1. Content-Length and keep-alive -----------------------------------------------------------
def test_content_length_response_is_read_whole_and_its_connection_reused(run: Run) -> None:
    body = b'{"id": "x", "object": "list"}'
    response = ok(body, b"Content-Type: Application/JSON", b"X-Request-ID: Abc-1")

    async def main() -> None:
        async with RawServer(answer_each(response)) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/v1/models", {})
                assert resp.status == 200
                assert resp.headers == {
                    "content-length": str(len(body)),
                    "content-type": "Application/JSON",
                    "x-request-id": "Abc-1",
                }
                assert await resp.read() == body
                assert resp.closed

                again = await client.request("GET", server.url + "/v1/models", {})
                assert again.status == 200
                assert await again.read() == body
                assert server.accepted == 1
                assert len(server.requests) == 2
            finally:
                await client.aclose()

    run(main())


def test_empty_body_is_complete_at_once_and_reused(run: Run) -> None:
    async def main() -> None:
        async with RawServer(answer_each(ok(b"", status=b"204 No Content"))) as server:
            client = HTTP1Client()
            try:
                for _ in range(3):
                    resp = await client.request("GET", server.url + "/", {})
                    assert resp.status == 204
                    assert await resp.read() == b""
                assert server.accepted == 1
            finally:
                await client.aclose()

    run(main())


# -- 2. chunked ---------------------------------------------------------------------------------
def test_chunked_body_is_streamed_decoded_and_its_connection_reused(run: Run) -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]

    async def main() -> None:
        acks: asyncio.Queue[None] = asyncio.Queue()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            assert await server.read_request(reader) is not None
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for piece in pieces:  # the next chunk only once the client has the previous one
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                await writer.drain()
                await acks.get()
            writer.write(b"0\r\n\r\n")
            await answer_each(ok(b"after"))(server, reader, writer, index)

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("POST", server.url + "/v1/chat", {}, b"{}")
                assert resp.status == 200
                assert resp.headers["transfer-encoding"] == "chunked"
                got = b""
                acked = 0
                async for chunk in resp.iter_chunks():
                    got += chunk
                    while acked < len(pieces) and len(got) >= len(b"".join(pieces[: acked + 1])):
                        assert got == b"".join(pieces[: acked + 1])  # no chunk framing leaks
                        acked += 1
                        acks.put_nowait(None)
                assert got == b"".join(pieces)
                assert acked == len(pieces)
                assert resp.closed

                again = await client.request("GET", server.url + "/", {})
                assert await again.read() == b"after"
                assert server.accepted == 1
            finally:
                await client.aclose()

    run(main())


def test_chunked_body_with_trailers_and_extensions(run: Run) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n"
        b"A\r\n0123456789\r\n"
        b"0\r\nX-Trailer: done\r\n\r\n"
    )

    async def main() -> None:
        async with RawServer(answer_each(response)) as server:
            client = HTTP1Client()
            try:
                for _ in range(2):
                    resp = await client.request("GET", server.url + "/", {})
                    assert await resp.read() == b"abc0123456789"
                assert server.accepted == 1
            finally:
                await client.aclose()

    run(main())


# -- 3. close-delimited -------------------------------------------------------------------------
def test_close_delimited_body_is_complete_and_not_reused(run: Run) -> None:
    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        assert await server.read_request(reader) is not None
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
        await writer.drain()
        writer.write(b"second part")
        await writer.drain()
        # the handler returning closes the connection: that ends the body

    async def main() -> None:
        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert resp.status == 200
                assert "content-length" not in resp.headers
                assert await resp.read() == b"first part, second part"

                again = await client.request("GET", server.url + "/", {})
                assert await again.read() == b"first part, second part"
                assert server.accepted == 2
            finally:
                await client.aclose()

    run(main())


# -- 4. Connection: close ---------------------------------------------------------------------
NOT_KEEP_ALIVE = {
    "connection-close": ok(b"bye", b"Connection: close"),
    "http/1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",
}


@pytest.mark.parametrize("kind", sorted(NOT_KEEP_ALIVE))
def test_connection_close_header_means_not_reused(run: Run, kind: str) -> None:
    async def main() -> None:
        first_closed = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            assert await server.read_request(reader) is not None
            writer.write(NOT_KEEP_ALIVE[kind])
            await writer.drain()
            # the server keeps its side open: it is the client that must not reuse or keep it
            await until_eof(reader)
            if index == 0:
                first_closed.set()

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert await resp.read() == b"bye"
                await first_closed.wait()  # the client closed the connection once done with it

                again = await client.request("GET", server.url + "/", {})
                assert await again.read() == b"bye"
                assert server.accepted == 2
            finally:
                await client.aclose()

    run(main())


# -- 5. stale pooled connections ----------------------------------------------------------------
def stale_after_first(closed: asyncio.Event) -> Handler:
    """Connection 0 answers one request keep-alive, then the server closes it while idle."""

    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        if index == 0:
            assert await server.read_request(reader) is not None
            writer.write(ok(b"one"))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            closed.set()
            return
        await answer_each(ok(b"fresh"))(server, reader, writer, index)

    return handler


def test_connection_closed_by_the_server_while_idle_is_replaced(run: Run) -> None:
    """Whether or not the client noticed the close yet, the next request must succeed."""

    async def main() -> None:
        closed = asyncio.Event()
        async with RawServer(stale_after_first(closed)) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert await resp.read() == b"one"
                await closed.wait()

                again = await client.request("GET", server.url + "/", {})
                assert again.status == 200
                assert await again.read() == b"fresh"
                assert server.accepted == 2
            finally:
                await client.aclose()

    run(main())


def test_connection_the_client_saw_closed_is_not_used(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client has processed the close of its idle connection before the next request."""

    async def main() -> None:
        closed = asyncio.Event()
        lost = asyncio.Event()
        original = http1._Connection.connection_lost

        def connection_lost(self: http1._Connection, exc: Exception | None) -> None:
            original(self, exc)
            lost.set()

        monkeypatch.setattr(http1._Connection, "connection_lost", connection_lost)
        async with RawServer(stale_after_first(closed)) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert await resp.read() == b"one"
                await closed.wait()
                await lost.wait()

                again = await client.request("GET", server.url + "/", {})
                assert await again.read() == b"fresh"
                assert server.accepted == 2
                assert [body for _, body in server.requests] == [b"", b""]  # sent once each
            finally:
                await client.aclose()

    run(main())


def test_request_on_a_pooled_connection_closed_without_answer_is_sent_again(run: Run) -> None:
    """The server takes the next request on the idle connection, then closes without a byte:
    the client had no chance to notice beforehand, so it must retry on a fresh connection."""

    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        if index == 0:
            assert await server.read_request(reader) is not None
            writer.write(ok(b"one"))
            await writer.drain()
            assert await server.read_request(reader) is not None
            return  # closed without answering
        await answer_each(ok(b"fresh"))(server, reader, writer, index)

    async def main() -> None:
        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/a", {})
                assert await resp.read() == b"one"

                again = await client.request("GET", server.url + "/b", {})
                assert await again.read() == b"fresh"
                assert server.accepted == 2
                lines = [parse_head(head)[0] for head, _ in server.requests]
                assert lines == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1", b"GET /b HTTP/1.1"]
            finally:
                await client.aclose()

    run(main())


def test_fresh_connection_closed_without_answer_is_not_retried(run: Run) -> None:
    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        assert await server.read_request(reader) is not None  # then closed without answering

    async def main() -> None:
        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                with pytest.raises(OSError) as caught:
                    await client.request("GET", server.url + "/", {})
                assert not isinstance(caught.value, ConnectFailed)
                assert server.accepted == 1
            finally:
                await client.aclose()

    run(main())


def test_pooled_connection_that_broke_mid_answer_is_not_retried(run: Run) -> None:
    """Part of an answer arrived: the server saw the request, so it must not be sent again."""

    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        assert await server.read_request(reader) is not None
        writer.write(ok(b"one"))
        await writer.drain()
        assert await server.read_request(reader) is not None
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()

    async def main() -> None:
        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert await resp.read() == b"one"
                with pytest.raises(OSError):
                    await client.request("GET", server.url + "/", {})
                assert server.accepted == 1
                assert len(server.requests) == 2
            finally:
                await client.aclose()

    run(main())


def test_idle_connection_older_than_keepalive_is_not_reused(run: Run) -> None:
    async def main() -> None:
        async with RawServer(answer_each(ok(b"x"))) as server:
            client = HTTP1Client(keepalive_seconds=0)
            try:
                for _ in range(2):
                    resp = await client.request("GET", server.url + "/", {})
                    assert await resp.read() == b"x"
                assert server.accepted == 2
            finally:
                await client.aclose()

    run(main())


# -- 6. a connection that breaks mid-body -------------------------------------------------------
BROKEN_BODIES = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 40),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n",
    ),
}


@pytest.mark.parametrize("framing", sorted(BROKEN_BODIES))
def test_break_mid_body_hands_over_what_arrived_then_raises(run: Run, framing: str) -> None:
    head, sent = BROKEN_BODIES[framing]
    arrived = b"x" * 40 if framing == "content-length" else b"hello world"

    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        assert await server.read_request(reader) is not None
        writer.write(head + sent)
        await writer.drain()  # then closed, short of the announced end

    async def main() -> None:
        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert resp.status == 200
                got = b""
                with pytest.raises(OSError) as caught:
                    async for chunk in resp.iter_chunks():
                        got += chunk
                assert not isinstance(caught.value, ConnectFailed)
                assert got == arrived
                assert resp.closed

                again = await client.request("GET", server.url + "/", {})
                with pytest.raises(OSError):
                    await again.read()
                assert server.accepted == 2
            finally:
                await client.aclose()

    run(main())


def test_invalid_chunk_mid_body_raises_protocol_error(run: Run) -> None:
    async def main() -> None:
        closed = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            assert await server.read_request(reader) is not None
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\nzz\r\nnot a chunk\r\n"
            )
            await writer.drain()
            await until_eof(reader)
            closed.set()

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                got = b""
                with pytest.raises(ProtocolError):
                    async for chunk in resp.iter_chunks():
                        got += chunk
                assert got == b"hello"
                assert resp.closed
                await closed.wait()
            finally:
                await client.aclose()

    run(main())


# -- 7. connection refused ----------------------------------------------------------------------
def test_connection_refused_raises_connect_failed(run: Run) -> None:
    async def main() -> None:
        client = HTTP1Client()
        try:
            with pytest.raises(ConnectFailed):
                await client.request("GET", f"http://127.0.0.1:{free_port()}/", {})
        finally:
            await client.aclose()

    run(main())


# -- 8. not HTTP --------------------------------------------------------------------------------
def test_garbage_instead_of_http_raises_protocol_error_and_closes(run: Run) -> None:
    async def main() -> None:
        closed = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            assert await server.read_request(reader) is not None
            writer.write(b"hello\r\n\r\n")
            await writer.drain()
            await until_eof(reader)
            closed.set()

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                with pytest.raises(ProtocolError):
                    await client.request("GET", server.url + "/", {})
                await closed.wait()  # the client dropped the connection
            finally:
                await client.aclose()

    run(main())


# -- 9. error statuses --------------------------------------------------------------------------
def test_404_with_json_body_is_readable_and_connection_reusable(run: Run) -> None:
    body = b'{"error": {"message": "model not found", "code": 404}}'
    response = ok(body, b"Content-Type: application/json", status=b"404 Not Found")

    async def main() -> None:
        async with RawServer(answer_each(response)) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("POST", server.url + "/v1/chat/completions", {}, b"{}")
                assert resp.status == 404
                assert resp.headers["content-type"] == "application/json"
                assert await resp.read() == body

                again = await client.request("POST", server.url + "/v1/chat/completions", {})
                assert again.status == 404
                assert await again.read() == body
                assert server.accepted == 1
            finally:
                await client.aclose()

    run(main())


# -- 10. a large body ---------------------------------------------------------------------------
def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    framed = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("high_water", [http1.HIGH_WATER, 4096])
def test_large_body_is_read_fully_through_flow_control(
    run: Run, monkeypatch: pytest.MonkeyPatch, high_water: int, framing: str
) -> None:
    body = random.Random(1).randbytes(2 * 1024 * 1024)
    response = ok(body) if framing == "content-length" else chunked(body, 100_000)
    monkeypatch.setattr(http1, "HIGH_WATER", high_water)
    pauses = 0
    original = http1._Connection.on_body

    def on_body(self: http1._Connection, data: bytes) -> None:
        nonlocal pauses
        was_paused = self.paused
        original(self, data)
        pauses += self.paused and not was_paused

    monkeypatch.setattr(http1._Connection, "on_body", on_body)

    async def main() -> None:
        async with RawServer(answer_each(response)) as server:
            client = HTTP1Client()
            try:
                for _ in range(2):
                    resp = await client.request("GET", server.url + "/big", {})
                    assert resp.status == 200
                    got = await resp.read()
                    assert len(got) == len(body)
                    assert got == body
                assert server.accepted == 1
            finally:
                await client.aclose()

    run(main())
    if high_water < 65536:  # reads off the socket are bigger than this: reading was paused
        assert pauses > 0


# -- 11. request bytes --------------------------------------------------------------------------
def test_request_line_host_headers_and_content_length(run: Run) -> None:
    payload = b'{"model": "m", "messages": []}'

    async def main() -> None:
        async with RawServer(answer_each(ok(b"{}"))) as server:
            client = HTTP1Client()
            try:
                resp = await client.request(
                    "POST",
                    server.url + "/path?q=1",
                    {"Authorization": "Bearer k", "Content-Type": "application/json"},
                    payload,
                )
                await resp.read()
                resp = await client.request("GET", server.url + "/v1/models", {"X-A": "b"})
                await resp.read()
                resp = await client.request("POST", server.url + "/empty", {})
                await resp.read()

                (post_head, post_body), (get_head, get_body), (empty_head, _) = server.requests
                line, headers = parse_head(post_head)
                assert line == b"POST /path?q=1 HTTP/1.1"
                assert sorted(headers) == sorted(
                    [
                        ("host", f"127.0.0.1:{server.port}"),
                        ("authorization", "Bearer k"),
                        ("content-type", "application/json"),
                        ("content-length", str(len(payload))),
                    ]
                )
                assert post_body == payload

                line, headers = parse_head(get_head)
                assert line == b"GET /v1/models HTTP/1.1"
                assert sorted(headers) == [("host", f"127.0.0.1:{server.port}"), ("x-a", "b")]
                assert get_body == b""

                line, headers = parse_head(empty_head)
                assert line == b"POST /empty HTTP/1.1"
                assert ("content-length", "0") in headers  # a bodiless POST still says so
            finally:
                await client.aclose()

    run(main())


# -- 12. Target.parse ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/v1", Target("http", "example.com", 80, b"/v1", b"example.com")),
        ("https://example.com", Target("https", "example.com", 443, b"/", b"example.com")),
        ("http://example.com:80/", Target("http", "example.com", 80, b"/", b"example.com")),
        ("https://h:443/x", Target("https", "h", 443, b"/x", b"h")),
        ("http://h:8080/a/b", Target("http", "h", 8080, b"/a/b", b"h:8080")),
        ("https://h:8443/", Target("https", "h", 8443, b"/", b"h:8443")),
        ("http://h:443/", Target("http", "h", 443, b"/", b"h:443")),
        ("https://h:80/", Target("https", "h", 80, b"/", b"h:80")),
        ("http://h/p?q=1&r=a%20b", Target("http", "h", 80, b"/p?q=1&r=a%20b", b"h")),
        ("http://h?q=1", Target("http", "h", 80, b"/?q=1", b"h")),
        ("http://h/p#frag", Target("http", "h", 80, b"/p", b"h")),
        ("http://[::1]:8080/v1", Target("http", "::1", 8080, b"/v1", b"[::1]:8080")),
        ("http://[::1]/", Target("http", "::1", 80, b"/", b"[::1]")),
        ("https://[fe80::1]:443/", Target("https", "fe80::1", 443, b"/", b"[fe80::1]")),
        (
            "http://127.0.0.1:11434/api",
            Target("http", "127.0.0.1", 11434, b"/api", b"127.0.0.1:11434"),
        ),
    ],
)
def test_target_parse(url: str, expected: Target) -> None:
    assert Target.parse(url) == expected
    assert expected.key == (expected.scheme, expected.host, expected.port)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "example.com/v1", "ws://h/", "unix:///tmp/s", "http:///p", ""]
)
def test_target_parse_rejects_non_http_urls(url: str) -> None:
    with pytest.raises(ValueError):
        Target.parse(url)


def test_client_target_is_cached_per_url() -> None:
    client = HTTP1Client()
    assert client.target("http://h:1/a") is client.target("http://h:1/a")
    assert client.target("http://h:1/a") == Target.parse("http://h:1/a")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_host_is_connected_to_and_bracketed_in_host_header(run: Run) -> None:
    async def main() -> None:
        async with RawServer(answer_each(ok(b"v6")), host="::1") as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/v1", {})
                assert await resp.read() == b"v6"
                _, headers = parse_head(server.requests[0][0])
                assert ("host", f"[::1]:{server.port}") in headers
            finally:
                await client.aclose()

    run(main())


# -- 13. abandoning a response ------------------------------------------------------------------
def test_close_on_unfinished_response_closes_the_connection(run: Run) -> None:
    async def main() -> None:
        eof = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            if index == 0:
                assert await server.read_request(reader) is not None
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
                await writer.drain()
                await until_eof(reader)
                eof.set()
                return
            await answer_each(ok(b"next"))(server, reader, writer, index)

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert not resp.closed
                resp.close()
                assert resp.closed
                await eof.wait()  # the server saw the abandonment
                resp.close()  # idempotent
                resp.release()
                assert await resp.read() == b""

                again = await client.request("GET", server.url + "/", {})
                assert await again.read() == b"next"
                assert server.accepted == 2
            finally:
                await client.aclose()

    run(main())


def test_cancelled_while_waiting_for_headers_closes_the_connection(run: Run) -> None:
    async def main() -> None:
        got_request = asyncio.Event()
        eof = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            if index == 0:
                assert await server.read_request(reader) is not None
                got_request.set()
                await until_eof(reader)  # never answers
                eof.set()
                return
            await answer_each(ok(b"next"))(server, reader, writer, index)

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                task = asyncio.create_task(client.request("GET", server.url + "/", {}))
                await got_request.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await eof.wait()

                again = await client.request("GET", server.url + "/", {})
                assert await again.read() == b"next"
                assert server.accepted == 2
            finally:
                await client.aclose()

    run(main())


# -- more of the pool ---------------------------------------------------------------------------
def test_concurrent_requests_use_separate_connections_which_are_then_pooled(run: Run) -> None:
    async def main() -> None:
        in_flight = [0]
        both = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            while await server.read_request(reader) is not None:
                in_flight[0] += 1
                if in_flight[0] == 2:
                    both.set()
                await both.wait()  # answer only once two requests are in flight at the same time
                writer.write(ok(str(index).encode()))
                await writer.drain()

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:

                async def get() -> bytes:
                    resp = await client.request("GET", server.url + "/", {})
                    return await resp.read()

                first = await asyncio.gather(get(), get())
                assert sorted(first) == [b"0", b"1"]
                in_flight[0] = 0
                both.clear()
                second = await asyncio.gather(get(), get())
                assert sorted(second) == [b"0", b"1"]
                assert server.accepted == 2
            finally:
                await client.aclose()

    run(main())


def test_aclose_closes_idle_connections(run: Run) -> None:
    async def main() -> None:
        eof = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            await answer_each(ok(b"x"))(server, reader, writer, index)
            eof.set()

        async with RawServer(handler) as server:
            client = HTTP1Client()
            resp = await client.request("GET", server.url + "/", {})
            assert await resp.read() == b"x"
            await client.aclose()
            await eof.wait()

    run(main())


def test_status_of_reads_and_drops_the_body(run: Run) -> None:
    async def main() -> None:
        async with RawServer(answer_each(ok(b"nope", status=b"503 Service Unavailable"))) as srv:
            client = HTTP1Client()
            try:
                assert await client.status_of(srv.url + "/health", limit=5) == 503
                assert await client.status_of(srv.url + "/health", limit=5) == 503
                assert srv.accepted == 1
            finally:
                await client.aclose()

    run(main())


@pytest.mark.parametrize("interim", [b"100 Continue", b"103 Early Hints"])
def test_interim_1xx_response_is_skipped(
    run: Run, monkeypatch: pytest.MonkeyPatch, interim: bytes
) -> None:
    """RFC 9110 15.2: a client must parse 1xx answers before the final one, even unasked.

    The final answer is written only once the client has taken in the interim one.
    """

    async def main() -> None:
        interim_in = asyncio.Event()
        original = http1._Connection.data_received

        def data_received(self: http1._Connection, data: bytes) -> None:
            original(self, data)
            if interim in data:
                interim_in.set()

        monkeypatch.setattr(http1._Connection, "data_received", data_received)

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            while await server.read_request(reader) is not None:
                interim_in.clear()
                writer.write(b"HTTP/1.1 " + interim + b"\r\nLink: </a.css>\r\n\r\n")
                await writer.drain()
                await interim_in.wait()
                writer.write(ok(b"final", b"Content-Type: text/plain"))
                await writer.drain()

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                for _ in range(2):
                    resp = await client.request("GET", server.url + "/", {})
                    assert resp.status == 200
                    assert resp.headers["content-type"] == "text/plain"
                    assert await resp.read() == b"final"
            finally:
                await client.aclose()

    run(main())


# -- bounds: idle reaping, the connection cap, the response size, draining (issue 8) ---------------
def test_idle_connection_is_closed_after_keepalive_without_another_request(run: Run) -> None:
    async def main() -> None:
        eof = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            await answer_each(ok(b"x"))(server, reader, writer, index)
            eof.set()  # the client closed the idle connection

        async with RawServer(handler) as server:
            client = HTTP1Client(keepalive_seconds=0.05)
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert await resp.read() == b"x"
                assert client.open_connections == 1
                await eof.wait()
                assert client.open_connections == 0
            finally:
                await client.aclose()

    run(main())


def held_first(go: asyncio.Event) -> Handler:
    """Keep-alive; the first answer's body is finished only once ``go`` is set."""

    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        first = index == 0
        while await server.read_request(reader) is not None:
            if first:
                first = False
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
                await writer.drain()
                await go.wait()
                writer.write(b"llo")
            else:
                writer.write(ok(b"next"))
            await writer.drain()

    return handler


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition`` holds (the test's own timeout bounds the wait)."""
    while not condition():  # noqa: ASYNC110 (a condition on the client's internals)
        await asyncio.sleep(0.001)


def test_request_over_the_connection_cap_waits_and_reuses_the_freed_connection(run: Run) -> None:
    async def main() -> None:
        go = asyncio.Event()
        async with RawServer(held_first(go)) as server:
            client = HTTP1Client(max_connections=1)
            try:
                first = await client.request("GET", server.url + "/", {})
                second = asyncio.create_task(client.request("GET", server.url + "/", {}))
                await until(lambda: len(client._waiters) == 1)
                assert not second.done()
                go.set()
                assert await first.read() == b"hello"
                assert await (await second).read() == b"next"
                assert server.accepted == 1
                assert client.open_connections == 1
            finally:
                await client.aclose()

    run(main())


def test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout(run: Run) -> None:
    async def main() -> None:
        go = asyncio.Event()
        async with RawServer(held_first(go)) as server:
            client = HTTP1Client(max_connections=1, connect_timeout=0.05)
            try:
                first = await client.request("GET", server.url + "/", {})
                with pytest.raises(http1.PoolExhausted, match="1 upstream connections"):
                    await client.request("GET", server.url + "/", {})
                assert not client._waiters
                go.set()
                assert await first.read() == b"hello"
            finally:
                await client.aclose()

    run(main())


def test_a_woken_waiter_that_leaves_passes_the_connection_on(run: Run) -> None:
    async def main() -> None:
        go = asyncio.Event()
        async with RawServer(held_first(go)) as server:
            client = HTTP1Client(max_connections=1, connect_timeout=5)
            try:
                first = await client.request("GET", server.url + "/", {})
                leaving = asyncio.create_task(client.request("GET", server.url + "/", {}))
                await until(lambda: len(client._waiters) == 1)
                staying = asyncio.create_task(client.request("GET", server.url + "/", {}))
                await until(lambda: len(client._waiters) == 2)
                go.set()
                assert await first.read() == b"hello"  # wakes ``leaving``, which has not run yet
                leaving.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await leaving
                assert await (await staying).read() == b"next"
                assert server.accepted == 1
            finally:
                await client.aclose()

    run(main())


def test_an_idle_connection_to_another_host_is_closed_to_make_room(run: Run) -> None:
    async def main() -> None:
        eof = asyncio.Event()

        async def handler_a(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            await answer_each(ok(b"a"))(server, reader, writer, index)
            eof.set()

        async with RawServer(handler_a) as a, RawServer(answer_each(ok(b"b"))) as b:
            client = HTTP1Client(max_connections=1)
            try:
                assert await (await client.request("GET", a.url + "/", {})).read() == b"a"
                assert await (await client.request("GET", b.url + "/", {})).read() == b"b"
                await eof.wait()
                assert client.open_connections == 1
            finally:
                await client.aclose()

    run(main())


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_past_max_response_bytes_raises_after_what_fit(run: Run, framing: str) -> None:
    async def main() -> None:
        eof = asyncio.Event()
        body = b"x" * 60 + b"y" * 60
        if framing == "chunked":
            answer = chunked(body, 60)
        else:
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 120\r\n\r\n" + body

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            assert await server.read_request(reader) is not None
            writer.write(answer)
            await writer.drain()
            await until_eof(reader)
            eof.set()

        async with RawServer(handler) as server:
            client = HTTP1Client(max_response_bytes=100)
            try:
                resp = await client.request("GET", server.url + "/", {})
                got = b""
                with pytest.raises(http1.ResponseTooLarge):
                    while (chunk := await resp.next_chunk()) is not None:
                        got += chunk
                assert got == b"x" * len(got) and len(got) <= 100
                await eof.wait()
                assert client.open_connections == 0
            finally:
                await client.aclose()

    run(main())


def tail_later(tail: asyncio.Event) -> Handler:
    """A chunked answer whose last chunk comes only once ``tail`` is set; then keep-alive."""

    async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
        assert await server.read_request(reader) is not None
        writer.write(chunked(b"data: [DONE]\n\n", 64)[: -len(b"0\r\n\r\n")])
        await writer.drain()
        await tail.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await answer_each(ok(b"next"))(server, reader, writer, index)

    return handler


def test_released_before_its_end_the_connection_is_pooled_once_the_answer_ends(run: Run) -> None:
    async def main() -> None:
        tail = asyncio.Event()
        async with RawServer(tail_later(tail)) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert await resp.next_chunk() == b"data: [DONE]\n\n"
                resp.release(drain=True)
                assert client.open_connections == 1
                tail.set()
                await until(lambda: bool(client._idle.get(http1.Target.parse(server.url).key)))
                again = await client.request("GET", server.url + "/", {})
                assert await again.read() == b"next"
                assert server.accepted == 1
            finally:
                await client.aclose()

    run(main())


def test_released_before_its_end_the_connection_closes_if_the_end_never_comes(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http1, "DRAIN_SECONDS", 0.05)

    async def main() -> None:
        eof = asyncio.Event()

        async def handler(server: RawServer, reader: Reader, writer: Writer, index: int) -> None:
            assert await server.read_request(reader) is not None
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await until_eof(reader)
            eof.set()

        async with RawServer(handler) as server:
            client = HTTP1Client()
            try:
                resp = await client.request("GET", server.url + "/", {})
                assert await resp.next_chunk() == b"hello"
                resp.release(drain=True)
                await eof.wait()
                assert client.open_connections == 0
            finally:
                await client.aclose()

    run(main())
