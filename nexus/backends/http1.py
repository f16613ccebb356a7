"""A lean HTTP/1.1 client for upstream calls: pooled keep-alive connections, httptools parsing.

Nexus's upstream traffic is simple (JSON bodies to a few hosts, JSON or SSE back), and a general
client's per-request machinery (URL objects, header multidicts, cookies, tracing) costs more than
the rest of a proxied request. Here a request is one prepared byte string; the response is parsed
by httptools (llhttp, as in uvicorn), handed over as it arrives, and the connection goes back to the
pool once its response is complete.

Bounds: at most ``max_connections`` connections are open at once (idle ones included; an idle one
is closed to make room for another host); a request that finds none free waits up to the connect
timeout, then raises ``PoolExhausted``. A response body past ``max_response_bytes`` raises
``ResponseTooLarge``. Idle connections are closed after ``keepalive_seconds`` by a timer, whether
or not another request comes.

Before a request is written, ``BEFORE_SEND`` (a context variable: the caller's task) is awaited
once when set: the shared store's admission of the call, which may refuse it (its error passes
through; the connection goes back to the pool unused). Everything the request needs before it is
written (its bytes, a connection) is made while the store answers.

Errors: ``ConnectFailed`` (no connection could be made), ``TimeoutError``, ``ConnectionError``
(the connection broke), ``ProtocolError`` (not HTTP, or too large), ``PoolExhausted``. A request
on a pooled connection that the server had already closed is sent again once on a fresh one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from ..config import ProxyServer
from .proxy import ProxyRules

HIGH_WATER = 256 * 1024  # stop reading from the socket while this much is waiting unread
MAX_IDLE_PER_HOST = 256
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# A response given back before its end (a stream after its last event) may take this long and
# this many more bytes to finish; then its connection is pooled, else closed.
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 64 * 1024
# awaited once before the first request written in this context (see above)
BEFORE_SEND: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar(
    "before_send", default=None
)


class ConnectFailed(OSError):
    """No connection could be made to the upstream at all."""


class ProtocolError(Exception):
    """The upstream's answer was not valid HTTP/1.1."""


class ResponseTooLarge(ProtocolError):
    """The response body went past the client's ``max_response_bytes``."""


class PoolExhausted(Exception):
    """Every allowed connection stayed busy for the whole wait (Nexus's cap, not the upstream)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed upstream URL: where to connect and what to put in the request line."""

    scheme: str
    host: str
    port: int
    path: bytes  # path and query, already encoded: the request line's target
    host_header: bytes
    proxy: ProxyServer | None = None
    proxy_headers: tuple[bytes, ...] = ()  # sent to an http proxy with every request

    @classmethod
    def parse(cls, url: str, proxies: ProxyRules | None = None) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        default = (parts.scheme == "http" and port == 80) or (
            parts.scheme == "https" and port == 443
        )
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if default else f"{shown}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        proxy = proxies.proxy_for(parts.scheme, host, port) if proxies is not None else None
        proxy_headers: tuple[bytes, ...] = ()
        if proxy is not None and parts.scheme == "http":
            # Through an http proxy a plain-http request names its whole URL (absolute form);
            # https goes through a CONNECT tunnel and is sent as to the server itself.
            path = f"http://{host_header}{path}"
            if proxy.authorization:
                proxy_headers = (f"Proxy-Authorization: {proxy.authorization}".encode("latin-1"),)
        return cls(
            parts.scheme,
            host,
            port,
            path.encode("ascii"),
            host_header.encode("ascii"),
            proxy,
            proxy_headers,
        )

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: HTTP1Client) -> None:
        self.loop = loop
        self.client = client  # told once when this connection closes: it frees a slot
        self.max_body = client.max_response_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.on_drained: Callable[[], None] | None = None
        self.drain_timer: asyncio.TimerHandle | None = None
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
        self.body_bytes = 0
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
        self._mark_closed()
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
        self.body_bytes += len(body)
        if self.on_drained is not None:  # given back before its end: drop the rest, bounded
            if self.body_bytes > DRAIN_BYTES:
                self.close()
            return
        if self.body_bytes > self.max_body:
            if self.error is None:
                self._fail(ResponseTooLarge(f"the response is larger than {self.max_body} bytes"))
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.error is not None:  # failed (e.g. too large) before its end: never complete
            return
        if self.interim:
            self.interim = False
            self.headers = []
            return
        self.complete = True
        self._wake()
        if self.on_drained is not None:
            done, self.on_drained = self.on_drained, None
            if self.drain_timer is not None:
                self.drain_timer.cancel()
            done()

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
        if self.closed or self.transport.is_closing():
            # Lost between connect (or pooling) and now: a write would vanish silently and
            # nothing would ever answer, so fail at once instead of waiting for a timeout.
            self._fail(ConnectionResetError("the upstream closed the connection before we sent"))
            return
        self.transport.write(request)

    def drain(self, on_done: Callable[[], None]) -> None:
        """The reader is done before the response is: call ``on_done`` once it ends (the
        connection is then reusable), or close the connection if it takes too long."""
        self.chunks.clear()
        self.buffered = 0
        self.body_bytes = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.on_drained = on_done
        self.drain_timer = self.loop.call_later(DRAIN_SECONDS, self.close)

    def close(self) -> None:
        self._mark_closed()
        if self.transport is not None:
            self.transport.close()

    def _mark_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.on_drained = None
        if self.drain_timer is not None:
            self.drain_timer.cancel()
        self.client._slot_freed()


class Response:
    """An upstream response whose headers have arrived; its body is read as it comes."""

    def __init__(self, client: HTTP1Client, key: tuple[str, str, int], conn: _Connection) -> None:
        self._client = client
        self._key = key
        self._conn: _Connection | None = conn
        self.status = conn.status
        self._raw_headers = conn.headers
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Lower-case names; decoded on first use (the hot path never looks)."""
        if self._headers is None:
            self._headers = {
                name.decode("latin-1"): value.decode("latin-1") for name, value in self._raw_headers
            }
        return self._headers

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def next_chunk(self) -> bytes | None:
        """The next piece of body; None at its end (the connection is then given back)."""
        conn = self._conn
        if conn is None:
            return None
        try:
            chunk = await conn.next_chunk()
        except BaseException:
            self.close()
            raise
        if chunk is None:
            self.release()
        return chunk

    def release(self, *, drain: bool = False) -> None:
        """Give the connection back when its response is complete, else close it. With ``drain``
        an unfinished response may still finish (briefly, unread) and then be given back."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not conn.keep_alive or conn.closed or conn.error is not None:
            conn.close()
        elif conn.complete:
            self._client._put_back(self._key, conn)
        elif drain:
            key, client = self._key, self._client
            conn.drain(lambda: client._put_back(key, conn))
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


class _TunnelOpener(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT: its status line and headers, nothing after them."""

    MAX_HEAD = 16 * 1024

    def __init__(self) -> None:
        self.reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.status_line = ""
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if self.reply.done():
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > self.MAX_HEAD:
                self._fail("an endless answer to CONNECT")
            return
        line = self._head.split(b"\r\n", 1)[0].decode("latin-1")
        self.status_line = line.partition(" ")[2].strip()[:200]
        version, _, rest = line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            self._fail(f"not HTTP in answer to CONNECT: {line[:80]!r}")
        elif end + 4 != len(self._head) and code == "200":
            self._fail("bytes after the proxy's answer to CONNECT")
        else:
            self.reply.set_result(int(code))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("the proxy closed the connection during CONNECT")

    def _fail(self, reason: str) -> None:
        if not self.reply.done():
            self.reply.set_exception(ConnectFailed(reason))
            self.reply.exception()  # retrieved: a caller that timed out leaves no warning


class HTTP1Client:
    def __init__(
        self,
        *,
        keepalive_seconds: float = 4.0,
        connect_timeout: float = 5.0,
        max_connections: int = 1000,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        proxies: ProxyRules | None = None,
    ) -> None:
        self.proxies = proxies
        self.keepalive_seconds = keepalive_seconds
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self.open_connections = 0  # idle, busy and connecting
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._reaper: asyncio.TimerHandle | None = None
        self._closing = False
        self._ssl: ssl.SSLContext | None = None
        self._targets: dict[str, Target] = {}

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 4096:  # backends come and go; never grow without bound
                self._targets.clear()
            target = self._targets[url] = Target.parse(url, self.proxies)
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
        if target.proxy_headers:
            head.extend(target.proxy_headers)
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: " + str(len(body)).encode("ascii"))
        request = b"\r\n".join(head) + b"\r\n\r\n" + body
        before = BEFORE_SEND.get()
        while True:
            conn, reused = await self._acquire(target)
            if before is not None:
                try:
                    await before()
                except BaseException:
                    self._put_back(target.key, conn)
                    raise
                before = None
            conn.send(request)
            try:
                await conn.headers_done
            except (ConnectionError, OSError):
                conn.close()
                if reused and not conn.received_any:
                    # The server had closed this idle connection, and likely its idle siblings
                    # too (a restart closes them all): send once more, on a fresh connection.
                    for stale in self._idle.pop(target.key, ()):
                        stale.close()
                    continue
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
        deadline: float | None = None
        while True:
            idle = self._idle.get(target.key)
            now = loop.time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.keepalive_seconds:
                    return conn, True
                conn.close()
            if self.open_connections < self.max_connections or self._evict_idle():
                break
            if deadline is None:
                deadline = now + self.connect_timeout
            await self._wait_for_room(deadline)
        return await self._connect(loop, target), False

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: Target) -> _Connection:
        self.open_connections += 1  # the slot is the new connection's; its close gives it back
        made: list[_Connection] = []

        def factory() -> _Connection:
            made.append(_Connection(loop, self))
            return made[-1]

        proxy = target.proxy
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is None:
                    _, protocol = await loop.create_connection(
                        factory,
                        target.host,
                        target.port,
                        ssl=self._ssl_context() if target.scheme == "https" else None,
                    )
                elif target.scheme == "http":
                    _, protocol = await loop.create_connection(factory, proxy.host, proxy.port)
                else:
                    protocol = await self._tunnel(loop, target, proxy, factory)
        except BaseException as exc:
            if made:
                made[0].close()
            else:
                self._slot_freed()
            where = f"{target.host}:{target.port}"
            if proxy is not None:
                where += f" through the proxy {proxy.shown}"
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(f"connecting to {where} timed out") from None
            if isinstance(exc, ConnectFailed):
                raise
            if isinstance(exc, OSError):
                reason = exc.strerror or str(exc)
                if proxy is not None:
                    reason = f"{reason} (connecting to {where})"
                raise ConnectFailed(reason) from exc
            raise
        return protocol

    async def _tunnel(
        self,
        loop: asyncio.AbstractEventLoop,
        target: Target,
        proxy: ProxyServer,
        factory: Callable[[], _Connection],
    ) -> _Connection:
        """Open a CONNECT tunnel through ``proxy`` and start TLS with the server inside it."""
        transport, opener = await loop.create_connection(_TunnelOpener, proxy.host, proxy.port)
        try:
            authority = target.host_header.decode("ascii")
            if target.port == 443:
                authority += ":443"
            request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            if proxy.authorization:
                request += f"Proxy-Authorization: {proxy.authorization}\r\n"
            transport.write(request.encode("latin-1") + b"\r\n")
            status = await opener.reply
            if status != 200:
                hint = " (check the user and password in the proxy URL)" if status == 407 else ""
                raise ConnectFailed(
                    f"the proxy {proxy.shown} refused the tunnel to {authority}: "
                    f"{opener.status_line}{hint}"
                )
            conn = factory()
            tls = await loop.start_tls(
                transport, conn, self._ssl_context(), server_hostname=target.host
            )
            if tls is None:  # the loop gave up on TLS without raising
                raise ConnectFailed(f"no TLS session with {authority}")
            conn.connection_made(tls)
            return conn
        except BaseException:
            transport.close()
            raise

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection to make room for another; False when none is idle."""
        oldest: collections.deque[_Connection] | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest[0].idle_since):
                oldest = idle
        if oldest is None:
            return False
        oldest.popleft().close()
        return True

    async def _wait_for_room(self, deadline: float) -> None:
        """Wait until a connection closes or comes back to the pool, at most until ``deadline``."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but leaving: the room goes to the next in line
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise PoolExhausted(
                    f"all {self.max_connections} upstream connections stayed busy for "
                    f"{self.connect_timeout:g}s"
                ) from None
            raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _slot_freed(self) -> None:
        self.open_connections -= 1
        if self._waiters:
            self._wake_one()

    def _put_back(self, key: tuple[str, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, collections.deque())
        if len(idle) >= MAX_IDLE_PER_HOST or self._closing:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        idle.append(conn)
        if self._reaper is None:
            self._reaper = loop.call_at(conn.idle_since + self.keepalive_seconds, self._reap)
        if self._waiters:
            self._wake_one()

    def _reap(self) -> None:
        """Close connections idle for ``keepalive_seconds``; run again for the next to expire."""
        self._reaper = None
        loop = asyncio.get_running_loop()
        expired = loop.time() - self.keepalive_seconds + 0.005  # timers may fire a little early
        next_due: float | None = None
        for key, idle in list(self._idle.items()):
            while idle and (idle[0].closed or idle[0].idle_since <= expired):
                idle.popleft().close()
            if not idle:
                del self._idle[key]
            elif next_due is None or idle[0].idle_since < next_due:
                next_due = idle[0].idle_since
        if next_due is not None:
            self._reaper = loop.call_at(next_due + self.keepalive_seconds, self._reap)

    def _ssl_context(self) -> ssl.SSLContext:
        # The system store; OpenSSL reads SSL_CERT_FILE and SSL_CERT_DIR (checked at start-up).
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        return self._ssl

    async def aclose(self) -> None:
        self._closing = True  # a response still draining closes instead of coming back
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
