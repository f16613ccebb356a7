"""uvicorn's request-response cycle, with a cheaper response head.

uvicorn checks each response header with two regular expressions and lower-cases its name, one
header at a time: about half a microsecond a header, on every answer. Here the names and the
values are each checked with one search over all of them at once (a character that is not allowed
is caught the same), a name is lower-cased only when some name is not already, and the head is
written as uvicorn writes it. A response start may also carry header lines that Nexus made itself
and that need no check (``RAW_HEAD``: the request id and the rate-limit headers), as one block.

Everything else (bodies, backpressure, a client that left, the access log) is uvicorn's own.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

from .api.http import RAW_HEAD, header_pairs

_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class NexusCycle(RequestResponseCycle):
    async def send(self, message: Any) -> None:
        if (
            message["type"] != "http.response.start"
            or self.response_started
            or self.disconnected
            or self.flow.write_paused
            or self.access_log
        ):
            raw = message.get(RAW_HEAD) if message["type"] == "http.response.start" else None
            if raw:  # uvicorn's own path takes the lines as headers
                message = {**message, "headers": [*message.get("headers", ()), *header_pairs(raw)]}
            await RequestResponseCycle.send(self, message)
            return
        self.transport.write(self._head(message))

    def _head(self, message: Any) -> bytes:
        self.response_started = True
        self.waiting_for_100_continue = False
        status: int = message["status"]
        headers = [*self.default_headers, *message.get("headers", ())]
        names = b"".join([name for name, _ in headers])
        if HEADER_RE.search(names):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"".join([value for _, value in headers])):
            raise RuntimeError("Invalid HTTP header value.")
        if names != names.lower():
            headers = [(name.lower(), value) for name, value in headers]
        content = [STATUS_LINE[status]]
        has_connection_close = False
        for name, value in headers:
            if name in _FRAMING:
                has_connection_close |= self._framing(name, value)
            content += (name, b": ", value, b"\r\n")
        raw = message.get(RAW_HEAD)
        if raw:
            content.append(raw)
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status not in (204, 304)
        ):
            self.chunked_encoding = True  # neither a length nor an encoding was given
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)

    def _framing(self, name: bytes, value: bytes) -> bool:
        """As uvicorn reads these three headers; True for ``connection: close``."""
        if name == b"content-length":
            if self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
        elif name == b"transfer-encoding":
            if value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
        elif b"close" in [token.lower().strip() for token in value.split(b",")]:
            self.keep_alive = False
            return True
        return False
