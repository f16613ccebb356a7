"""Server-sent events: split an upstream byte stream on event boundaries, one event at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from ..errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from ..registry import Backend

DONE = b"data: [DONE]\n\n"


def is_done(event: bytes) -> bool:
    """True for the ``data: [DONE]`` terminator (with or without the space)."""
    return event.startswith(b"data:") and event[5:].strip() == b"[DONE]"


class SSEStream:
    """Upstream SSE relayed event for event: each item is one whole event ending in a blank line.

    Bytes are not re-encoded; only CRLF line ends are normalised to LF so that events can be split.
    Reading stops after ``[DONE]``. The response is released on exhaustion and on ``aclose``.
    """

    def __init__(self, backend: Backend, resp: aiohttp.ClientResponse, idle_timeout: float) -> None:
        self._backend = backend
        self._resp = resp
        self._idle = idle_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buffer = b""
        try:
            async for chunk in self._chunks():
                if b"\r" in chunk:
                    chunk = chunk.replace(b"\r\n", b"\n")
                buffer += chunk
                while True:
                    end = buffer.find(b"\n\n")
                    if end < 0:
                        break
                    event, buffer = buffer[: end + 2], buffer[end + 2 :]
                    if event.strip():
                        yield event
                        if is_done(event):
                            return
            tail = buffer.strip()
            if tail:  # the upstream closed without the final blank line
                yield tail + b"\n\n"
        finally:
            await self.aclose()

    async def _chunks(self) -> AsyncIterator[bytes]:
        name = self._backend.name
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(
                name, f"Backend '{name}' sent nothing for {self._idle:g}s during the stream"
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            if rest := self._unread():
                yield rest
            raise UpstreamProtocolError(
                name, f"Backend '{name}' broke off the stream: {exc}"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            if rest := self._unread():
                yield rest
            raise UpstreamUnavailable(name, f"Backend '{name}' stream failed: {exc}") from exc

    def _unread(self) -> bytes:
        """Bytes that arrived just before the connection broke. aiohttp raises the error before
        handing them over, but they may hold whole events the client should still get."""
        try:
            rest: bytes = self._resp.content._read_nowait(-1)
        except Exception:  # a private API: if it changes, the tail is lost, nothing worse
            return b""
        return rest

    async def aclose(self) -> None:
        # close(), not release(): an unfinished body must not go back to the pool, and closing
        # the connection is what tells the backend to stop generating.
        if self._resp.closed:
            return
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()
