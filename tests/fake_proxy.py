"""A corporate-style HTTP proxy on loopback: CONNECT tunnels for https, absolute-form requests for
http, optional Basic credentials, and its own name table (the proxy resolves names, not Nexus).

It records what it saw: the CONNECT targets, the plain requests' first lines, the credentials
sent, and every byte it relayed through tunnels (to show TLS kept secrets from it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from urllib.parse import urlsplit


class FakeProxy:
    def __init__(self, hosts: dict[str, int], credentials: str | None = None) -> None:
        self.hosts = hosts  # name -> port on 127.0.0.1
        self.required = (
            "Basic " + base64.b64encode(credentials.encode()).decode() if credentials else None
        )
        self.connects: list[str] = []
        self.plain: list[str] = []  # request lines of absolute-form requests
        self.authorizations: list[str | None] = []
        self.relayed = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (item.partition(":") for item in lines if item)
        }
        authorization = headers.get("proxy-authorization")
        self.authorizations.append(authorization)
        if self.required is not None and authorization != self.required:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
            )
            await writer.drain()
            return
        method, target, _ = line.split(" ", 2)
        if method == "CONNECT":
            self.connects.append(target)
            name, _, port = target.rpartition(":")
            if self.hosts.get(name) != int(port):
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await self._pipe_both(reader, writer, up_reader, up_writer)
            return
        self.plain.append(line)
        url = urlsplit(target)
        if url.scheme != "http" or self.hosts.get(url.hostname or "") != url.port:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        kept = [item for item in lines if item and not item.lower().startswith("proxy-")]
        kept = [item for item in kept if not item.lower().startswith("connection:")]
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""])
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", url.port)
        up_writer.write(request.encode("latin-1") + body)
        await up_writer.drain()
        # One request per connection: the answer's end is the upstream closing.
        await self._pipe(up_reader, writer, record=False)
        up_writer.close()

    async def _pipe_both(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            up_writer.close()

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bool = True
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if record:
                    self.relayed += data
                sink.write(data)
                await sink.drain()
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()
