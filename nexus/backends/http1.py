"""A lean HTTP/1.1 client for upstream calls: pooled keep-alive connections, httptools parsing.

Nexus's upstream traffic is simple (JSON bodies to a few hosts, JSON or SSE back), and a general
client's per-request machinery (URL objects, header multidicts, cookies, tracing) costs more than
the rest of a proxied request. Here a request is one prepared byte string; the response is parsed
by httptools (llhttp, as in uvicorn), handed over as it arrives, and the connection goes back to the
pool once its response is complete.

Errors: ``ConnectFailed`` (no connection could be made), ``TimeoutError``, ``ConnectionError``
(the connection broke), ``ProtocolError`` (not HTTP). A request on a pooled connection that the
server had already closed is sent again once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # stop reading from the socket while this much is waiting unread
MAX_IDLE_PER_HOST = 256


class ConnectFailed(OSError):
    """No connection could be made to the upstream at all."""


class ProtocolError(Exception):
    """The upstream's answer was not valid HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed upstream URL: where to connect and what to put in the request line."""

    scheme: str
    host: str
    port: int
    path: bytes  # path and query, already encoded
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        default = (parts.scheme == "http" and port == 80) or (
            parts.scheme == "https" and port == 443
        )
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(
            parts.scheme,
            host,
            port,
            path.encode("ascii"),
            (shown if default else f"{shown}:{port}").encode("ascii"),
        )

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.interim = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.received_any = False
        self.complete = False
        self.error: BaseException | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.headers_done: asyncio.Future[None] = self.loop.create_future()
        self.wakeup: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP from the upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if self.headers_done.done() and not self._has_length():
            self.on_message_complete()  # the body was delimited by the connection closing
            return
        self._fail(
            ConnectionResetError("the upstream closed the connection") if exc is None else exc
        )

    def pause_writing(self) -> None:  # request bodies are written whole; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks --------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            self.headers = []
            return
        self.complete = True
        self._wake()

    # -- helpers --------------------------------------------------------------------------
    def _has_length(self) -> bool:
        return any(name in (b"content-length", b"transfer-encoding") for name, _ in self.headers)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not self.headers_done.done():
            self.headers_done.set_exception(exc)
            self.headers_done.exception()  # retrieved: no "never retrieved" warning
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def next_chunk(self) -> bytes | None:
        """The next piece of body; None at its end; raises if the connection broke first."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.wakeup = self.loop.create_future()
            await self.wakeup
            self.wakeup = None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def send(self, request: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.transport.write(request)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """An upstream response whose headers have arrived; its body is read as it comes."""

    def __init__(self, client: HTTP1Client, key: tuple[str, str, int], conn: _Connection) -> None:
        self._client = client
        self._key = key
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in conn.headers
        }

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.iter_chunks()]
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            while (chunk := await conn.next_chunk()) is not None:
                yield chunk
        except BaseException:
            self.close()
            raise
        self.release()

    def release(self) -> None:
        """Give the connection back when its response is complete, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete and conn.keep_alive and not conn.closed:
            self._client._put_back(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the connection: an unfinished answer is abandoned (the upstream sees it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @property
    def closed(self) -> bool:
        return self._conn is None


class HTTP1Client:
    def __init__(self, *, keepalive_seconds: float = 4.0, connect_timeout: float = 5.0) -> None:
        self.keepalive_seconds = keepalive_seconds
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._targets: dict[str, Target] = {}

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 4096:  # backends come and go; never grow without bound
                self._targets.clear()
            target = self._targets[url] = Target.parse(url)
        return target

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Response:
        """Send the request and return once the response's headers are in."""
        target = self.target(url)
        head = [
            f"{method} ".encode("ascii") + target.path + b" HTTP/1.1\r\nHost: " + target.host_header
        ]
        for name, value in headers.items():
            head.append(f"{name}: {value}".encode("latin-1"))
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: " + str(len(body)).encode("ascii"))
        request = b"\r\n".join(head) + b"\r\n\r\n" + body
        while True:
            conn, reused = await self._acquire(target)
            conn.send(request)
            try:
                await conn.headers_done
            except (ConnectionError, OSError):
                conn.close()
                if reused and not conn.received_any:
                    continue  # the server had closed this idle connection: try a fresh one
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, target.key, conn)

    async def status_of(self, url: str, limit: float) -> int:
        """GET ``url`` and return its status (the body is read and dropped)."""
        async with asyncio.timeout(limit):
            resp = await self.request("GET", url, {})
            await resp.read()
        return resp.status

    async def _acquire(self, target: Target) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(target.key)
        now = loop.time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_seconds:
                return conn, True
            conn.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop),
                    target.host,
                    target.port,
                    ssl=self._ssl_context() if target.scheme == "https" else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connecting to {target.host}:{target.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from exc
        return protocol, False

    def _put_back(self, key: tuple[str, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, collections.deque())
        if len(idle) >= MAX_IDLE_PER_HOST:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
