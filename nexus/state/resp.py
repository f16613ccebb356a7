"""A small Redis client for the request path: one pipelined connection, RESP2, scripts.

redis-py's asyncio client spends about a hundred microseconds of Python on each call; the
request path makes one call (the admission script), so that call is made here instead: the
command is one ``bytes`` written to one connection, replies are matched to callers in order (the
connection is pipelined: any number of calls in flight at once), and a reply is parsed from the
buffer in place. Start-up reads, the blocking writer and pub/sub stay on redis-py.

A call fails with ``ConnectionError`` when the server cannot be reached, the connection drops or
no reply came within ``timeout`` (every call in flight on it fails with it; the next call
connects again), and with ``ReplyError`` when Redis answered with an error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import socket
import ssl
import time
from typing import Any

Reply = Any  # int | bytes | None | list[Reply]


class ReplyError(Exception):
    """Redis answered with an error (``NOSCRIPT``, ``WRONGTYPE``...)."""


class _Incomplete(Exception):
    pass


def bulk(arg: bytes | str | int | float) -> bytes:
    """One argument as a RESP bulk string."""
    data = arg if isinstance(arg, bytes) else b"%d" % arg if type(arg) is int else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*args: bytes | str | int | float) -> bytes:
    """A command in RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join([bulk(arg) for arg in args])


def _parse(buffer: bytearray, at: int) -> tuple[Reply, int]:
    """One reply starting at ``at``: the reply and where the next one starts."""
    end = buffer.find(b"\r\n", at)
    if end < 0:
        raise _Incomplete
    kind = buffer[at]
    if kind == 58:  # ':'
        return int(buffer[at + 1 : end]), end + 2
    if kind == 36:  # '$'
        size = int(buffer[at + 1 : end])
        at = end + 2
        if size < 0:
            return None, at
        if len(buffer) < at + size + 2:
            raise _Incomplete
        return bytes(buffer[at : at + size]), at + size + 2
    if kind == 42:  # '*': its items in a loop, recursing only into nested arrays
        count = int(buffer[at + 1 : end])
        at = end + 2
        if count < 0:
            return None, at
        items: list[Reply] = []
        for _ in range(count):
            end = buffer.find(b"\r\n", at)
            if end < 0:
                raise _Incomplete
            if buffer[at] == 58:
                items.append(int(buffer[at + 1 : end]))
                at = end + 2
            else:
                item, at = _parse(buffer, at)
                items.append(item)
        return items, at
    line = bytes(buffer[at + 1 : end])
    if kind == 43:  # '+'
        return line, end + 2
    if kind == 45:  # '-'
        return ReplyError(line.decode(errors="replace")), end + 2
    raise ConnectionError(f"Redis sent something that is not RESP2 ({kind:#x})")


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.transport: Any = None  # asyncio's or uvloop's transport
        self.buffer = bytearray()
        self.waiting: collections.deque[tuple[asyncio.Future[Reply], float]] = collections.deque()
        self.lost: Exception | None = None
        self._watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a command goes out at once, not after a delayed ACK
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> asyncio.Future[Reply]:
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise ConnectionError(f"the connection to Redis is closed ({self.lost})")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self.waiting.append((future, loop.time()))
        self.transport.write(data)
        if self._watch is None:
            self._watch = loop.call_later(self.timeout, self._check)
        return future

    def _check(self) -> None:
        """No reply for ``timeout``: the connection is given up (and every call on it)."""
        self._watch = None
        if not self.waiting:
            return
        loop = asyncio.get_running_loop()
        late = loop.time() - self.waiting[0][1]
        if late >= self.timeout:
            self._fail(ConnectionError(f"no answer from Redis in {self.timeout:g} s"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._watch = loop.call_later(self.timeout - late, self._check)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        at = 0
        while self.waiting and at < len(buffer):
            try:
                reply, at_next = _parse(buffer, at)
            except _Incomplete:
                break
            except (ValueError, ConnectionError) as exc:  # not RESP: nothing more can be trusted
                self._fail(ConnectionError(str(exc)))
                if self.transport is not None:
                    self.transport.abort()
                return
            at = at_next
            future, _ = self.waiting.popleft()
            if not future.done():
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        del buffer[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"the connection to Redis was lost ({exc or 'closed'})"))

    def _fail(self, error: Exception) -> None:
        self.lost = error
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class Script:
    """A Lua script: run by its SHA1, loaded on the first NOSCRIPT. ``fixed``: its first
    arguments, when every call passes the same ones (encoded once)."""

    def __init__(self, text: str, *fixed: bytes | str | int) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest().encode()
        self.fixed = fixed
        self._head = bulk(b"EVALSHA") + bulk(self.sha) + bulk(0) + b"".join(map(bulk, fixed))

    def call(self, args: tuple[bytes | str | int | float, ...]) -> bytes:
        """EVALSHA with the fixed arguments, then ``args`` (no keys declared)."""
        count = 3 + len(self.fixed) + len(args)
        return b"*%d\r\n" % count + self._head + b"".join([bulk(arg) for arg in args])


class RespClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        timeout: float = 2.0,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.tls = ssl.create_default_context() if tls else None
        self.timeout = timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def call(self, *args: bytes | str | int | float) -> Reply:
        return await self._send(command(*args))

    async def _send(self, data: bytes) -> Reply:
        connection = self._connection
        if connection is None or connection.lost is not None:
            connection = await self._connect()
        return await connection.send(data)

    def start(
        self, script: Script, args: tuple[bytes | str | int | float, ...]
    ) -> asyncio.Future[Reply] | None:
        """The script's EVALSHA written now, its reply read later (``run`` again on NOSCRIPT);
        None when no connection is open (``run`` opens one)."""
        connection = self._connection
        if connection is None or connection.lost is not None:
            return None
        try:
            return connection.send(script.call(args))
        except ConnectionError:
            return None

    async def run(self, script: Script, *args: bytes | str | int | float) -> Reply:
        """The script's EVALSHA (no keys declared: the scripts build theirs), after its fixed
        arguments; its text is loaded once if Redis does not have it (a restarted server)."""
        data = script.call(args)
        try:
            return await self._send(data)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call(b"SCRIPT", b"LOAD", script.text)
        return await self._send(data)

    async def _connect(self) -> _Connection:
        if self._connecting is not None:  # one connect at a time; the others wait for it
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            connection = await self._open()
        except BaseException as exc:
            error = exc if isinstance(exc, ConnectionError) else ConnectionError(str(exc))
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: nobody else may be waiting
            self._connecting = None
            raise error from exc
        self._connecting.set_result(connection)
        self._connecting = None
        self._connection = connection
        return connection

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self.timeout), self.host, self.port, ssl=self.tls
                ),
                self.timeout,
            )
        except (TimeoutError, OSError) as exc:
            raise ConnectionError(
                f"cannot connect to Redis at {self.host}:{self.port} ({exc or 'timed out'})"
            ) from exc
        left = max(self.timeout - (time.monotonic() - started), 0.1)
        if self.password is not None:
            user = [self.username] if self.username else []
            await asyncio.wait_for(connection.send(command(b"AUTH", *user, self.password)), left)
        if self.db:
            await asyncio.wait_for(connection.send(command(b"SELECT", self.db)), left)
        return connection

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.close()
