"""A tiny HTTP/1.1 client on a raw socket: it sends exactly the bytes it is given.

Real clients refuse what the fuzzer needs to send (a foreign or missing ``Host``, odd methods,
header values in Latin-1, an ``Upgrade`` on a POST); this one writes any request line, headers and
body, keeps the connection alive between requests, and reads one answer: Content-Length, chunked,
or until the server closes.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

TIMEOUT = 15.0  # far beyond any answer Nexus gives here: running into it means it hung
# A connection idle for longer is not reused: uvicorn closes idle ones after 5 s, and a request
# must never meet a connection closing under it (that would look like a request left unanswered).
REUSE_SECONDS = 2.0


class NoAnswer(AssertionError):
    """The server closed the connection or went silent without answering the request."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes
    raw_head: bytes = field(repr=False, default=b"")


class WireClient:
    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.last_used = 0.0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.buffer = b""

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes) -> Answer:  # fmt: skip
        head = b"%s %s HTTP/1.1\r\n" % (method, target)
        head += b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
        if time.monotonic() - self.last_used > REUSE_SECONDS:
            self.close()
        try:
            return self._exchange(head + b"\r\n" + body, method == b"HEAD")
        except BaseException:
            self.close()
            raise
        finally:
            self.last_used = time.monotonic()

    def _exchange(self, data: bytes, head_only: bool) -> Answer:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The server may answer (413, 408) and close before it has read everything.
        with contextlib.suppress(ConnectionError):
            self.sock.sendall(data)
        answer, keep = self._read_answer(head_only)
        if not keep:
            self.close()
        return answer

    # --- reading -----------------------------------------------------------------------------
    def _recv(self) -> bytes:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise NoAnswer(f"no answer within {TIMEOUT:g}s") from None
        except ConnectionResetError:
            data = b""
        return data

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            data = self._recv()
            if not data:
                raise NoAnswer("the connection closed before a whole answer head")
            self.buffer += data
        found, _, self.buffer = self.buffer.partition(marker)
        return found

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self._recv()
            if not data:
                raise NoAnswer("the connection closed in the middle of a body")
            self.buffer += data
        found, self.buffer = self.buffer[:size], self.buffer[size:]
        return found

    def _read_answer(self, head_only: bool) -> tuple[Answer, bool]:
        while True:
            raw_head = self._until(b"\r\n\r\n")
            lines = raw_head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            if not 100 <= status < 200 or status == 101:
                break  # an interim answer (100 Continue) is followed by the real one
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        keep = headers.get("connection", "").lower() != "close" and status != 101
        if head_only or status in (101, 204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._chunked()
        elif "content-length" in headers:
            body = self._exactly(int(headers["content-length"]))
        else:
            body, keep = self._to_close(), False
        return Answer(status, headers, body, raw_head), keep

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self._until(b"\r\n").split(b";", 1)[0], 16)
            if size == 0:
                while self._until(b"\r\n"):  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            self._exactly(2)

    def _to_close(self) -> bytes:
        while data := self._recv():
            self.buffer += data
        body, self.buffer = self.buffer, b""
        return body
