"""Server-sent events: split an upstream byte stream on event boundaries, one event at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ..errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from ..registry import Backend
from .http1 import ProtocolError, Response

DONE = b"data: [DONE]\n\n"


def is_done(event: bytes) -> bool:
    """True for the ``data: [DONE]`` terminator (with or without the space)."""
    return event.startswith(b"data:") and event[5:].strip() == b"[DONE]"


class SSEStream:
    """Upstream SSE relayed event for event: each item is one whole event ending in a blank line.

    Bytes are not re-encoded; only CRLF line ends are normalised to LF so that events can be split.
    Reading stops after ``[DONE]``. The response is released on exhaustion and on ``aclose``.
    """

    def __init__(self, backend: Backend, resp: Response, idle_timeout: float) -> None:
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
        """Body pieces as they arrive; what came before a failure is still handed over."""
        name = self._backend.name
        chunks = self._resp.iter_chunks()
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    name, f"Backend '{name}' sent nothing for {self._idle:g}s during the stream"
                ) from exc
            except ProtocolError as exc:
                raise UpstreamProtocolError(
                    name, f"Backend '{name}' broke the stream: {exc}"
                ) from exc
            except OSError as exc:
                raise UpstreamUnavailable(
                    name, f"Backend '{name}' broke off the stream: {exc}"
                ) from exc
            yield chunk

    async def aclose(self) -> None:
        # An unfinished answer is abandoned by closing its connection: that is what tells the
        # backend to stop generating. A finished one gives its connection back to the pool.
        self._resp.close()
