"""The cheapest OpenAI-compatible upstream we can write in Python: a raw asyncio Protocol on uvloop.

Run: ``python bench/mock_upstream.py PORT`` (binds 127.0.0.1).

Serves ``GET /v1/models``, ``POST /v1/chat/completions`` (plain JSON, or SSE when
``"stream": true``) and ``POST /v1/embeddings``. HTTP/1.1 with keep-alive and pipelining;
request bodies may use Content-Length or chunked encoding. Every response is pre-serialised;
only the Date header is refreshed, once a second. An SSE stream (6 events + ``[DONE]``) is sent
as one chunk of chunked encoding plus the last chunk, in a single write.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from email.utils import formatdate
from typing import Any, cast

import uvloop

MODEL = "mock-model"
CREATED = int(time.time())
MAX_BODY = 16 * 1024 * 1024
_JSON = "application/json"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _chat_body() -> bytes:
    return _dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello from mock!",
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
        }
    )


def _sse_body() -> bytes:
    base = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
    }

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + _dumps({**base, "choices": [choice]}) + b"\n\n"

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": t}) for t in ("Hello", " from", " mock", "!")]
    events.append(event({}, "stop"))
    return b"".join(events) + b"data: [DONE]\n\n"


def _embeddings_body(n: int) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(n)]
    usage = {"prompt_tokens": n, "total_tokens": n}
    return _dumps({"object": "list", "model": MODEL, "data": data, "usage": usage})


MODELS = _dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "mock"}]}
)
CHAT = _chat_body()
SSE = _sse_body()
SSE_CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SSE), SSE)
EMBED = {n: _embeddings_body(n) for n in range(1, 9)}


class Responses:
    """Whole responses (head + body) as bytes; the Date header is refreshed once per second."""

    def __init__(self) -> None:
        self.date = b""
        self.cache: dict[tuple[int, bool, str, bytes], bytes] = {}
        self.refresh()

    def refresh(self) -> None:
        self.date = formatdate(usegmt=True).encode()
        self.cache.clear()

    def get(self, status: int, ctype: str, body: bytes, close: bool = False) -> bytes:
        key = (status, close, ctype, body)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = self._build(status, ctype, body, close)
        return hit

    def sse(self, close: bool) -> bytes:
        key = (200, close, "sse", SSE)
        hit = self.cache.get(key)
        if hit is None:
            head = self._head(
                200,
                "text/event-stream",
                b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n",
                close,
            )
            hit = self.cache[key] = head + SSE_CHUNKED
        return hit

    def _build(self, status: int, ctype: str, body: bytes, close: bool) -> bytes:
        return self._head(status, ctype, b"Content-Length: %d\r\n" % len(body), close) + body

    def _head(self, status: int, ctype: str, extra: bytes, close: bool) -> bytes:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 413: b"Payload Too Large"}
        return (
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nServer: nexus-bench-mock\r\n"
            b"Content-Type: %s\r\n%s%s\r\n"
            % (
                status,
                reason.get(status, b"Error"),
                self.date,
                ctype.encode(),
                extra,
                b"Connection: close\r\n" if close else b"",
            )
        )


RESPONSES = Responses()


def _error(message: str) -> bytes:
    return _dumps({"error": {"message": message, "type": "invalid_request_error", "code": None}})


def _chunked_body(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``start``; return (body, end offset) or None if partial."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # skip any trailers
            return (bytes(out), end + 4) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        out += buf[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


def _parse_headers(lines: list[bytes], version: bytes) -> tuple[int, bool, bool, bool]:
    """(Content-Length, chunked?, close after the response?, expects 100-continue?)."""
    length, chunked, close, expect = 0, False, version != b"HTTP/1.1", False
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            v = value.strip().lower()
            close = v == b"close" or (close and v != b"keep-alive")
        elif name == b"expect":
            expect = value.strip().lower() == b"100-continue"
    return length, chunked, close, expect


class MockProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.continued = False  # "100 Continue" already sent for the request being read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            while self.transport is not None and self._one_request():
                pass
        except ValueError:  # unparsable Content-Length or chunk size
            self._send(RESPONSES.get(400, _JSON, _error("malformed request"), True), True)

    def _one_request(self) -> bool:
        """Handle one complete request from the buffer; False when more bytes are needed."""
        buf = self.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        lines = bytes(buf[:head_end]).split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self._send(RESPONSES.get(400, _JSON, _error("bad request line"), True), True)
            return False
        method, target, version = parts
        length, chunked, close, expect = _parse_headers(lines[1:], version)
        if length > MAX_BODY:
            self._send(RESPONSES.get(413, _JSON, _error("body too large"), True), True)
            return False
        start = head_end + 4
        got = _chunked_body(buf, start) if chunked else None
        if chunked and got is not None:
            body, end = got
        elif not chunked and len(buf) >= start + length:
            body, end = bytes(buf[start : start + length]), start + length
        else:
            if expect and not self.continued:  # e.g. curl with a body over 1 KB
                self.continued = True
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        self.continued = False
        del buf[:end]
        self._send(self._route(method, target.split(b"?", 1)[0], body, close), close)
        return True

    def _route(self, method: bytes, path: bytes, body: bytes, close: bool) -> bytes:
        if path == b"/v1/models" and method == b"GET":
            return RESPONSES.get(200, _JSON, MODELS, close)
        if method != b"POST" or path not in (b"/v1/chat/completions", b"/v1/embeddings"):
            return RESPONSES.get(404, _JSON, _error("not found"), close)
        try:
            req = json.loads(body)
        except ValueError:
            return RESPONSES.get(400, _JSON, _error("body is not JSON"), close)
        if not isinstance(req, dict):
            return RESPONSES.get(400, _JSON, _error("body is not an object"), close)
        if path == b"/v1/chat/completions":
            return (
                RESPONSES.sse(close)
                if req.get("stream")
                else RESPONSES.get(200, _JSON, CHAT, close)
            )
        inp = req.get("input")
        n = len(inp) if isinstance(inp, list) and inp and not isinstance(inp[0], int) else 1
        emb = EMBED.get(n) or _embeddings_body(n)
        return RESPONSES.get(200, _JSON, emb, close)

    def _send(self, data: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if close:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()

    def tick() -> None:
        RESPONSES.refresh()
        loop.call_later(1.0, tick)

    loop.call_later(1.0, tick)
    server = await loop.create_server(MockProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: mock_upstream.py PORT")
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
