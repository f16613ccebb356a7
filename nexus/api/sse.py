"""Sending a relayed SSE stream to the client.

The caller runs this inside a ``DisconnectGuard``: if the client leaves, the task is cancelled
wherever it waits, and the relay's clean-up closes the upstream and releases the backend's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Protocol

from starlette.types import Send

from ..dispatch import StreamResult, stream_failure
from ..errors import NexusError, ServiceUnavailable
from .http import ClientGone

SHUTTING_DOWN = "Nexus is shutting down; the stream was cut short (retry against a running Nexus)"

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def ends_stream(item: bytes) -> bool:
    """The relay's last item ends with its own ``data: [DONE]`` event: it goes out as the last
    body (one write fewer per stream). Nothing follows it; a spaceless upstream ``[DONE]`` only
    misses the shortcut."""
    return item.endswith(b"data: [DONE]\n\n") and (len(item) == 14 or item[-16:-14] == b"\n\n")


async def send_stream(
    send: Send,
    result: StreamResult,
    events: AsyncGenerator[bytes, None] | None = None,
    *,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    failure: Callable[[NexusError], bytes] = stream_failure,
) -> None:
    """Send ``result``'s stream, or ``events`` made from it (another API's translation, which
    closes the relay when it is closed); ``failure`` is that API's last event for a stream that
    Nexus itself has to cut."""
    if events is None:
        events = result.events
    try:
        # Start the relay before anything else can fail: its clean-up (release the slot, close
        # the upstream) runs only in a relay that started. Its first event is already in hand.
        first = await anext(events, None)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*SSE_HEADERS, *result.served.headers(), *extra_headers],
            }
        )
        more = True
        if first is not None:
            more = not ends_stream(first)
            await send({"type": "http.response.body", "body": first, "more_body": more})
        async for event in events:
            more = not ends_stream(event)
            await send({"type": "http.response.body", "body": event, "more_body": more})
        if more:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:  # servers other than uvicorn raise when writing to a closed connection
        raise ClientGone from None
    except asyncio.CancelledError:
        # Cancelled from outside: the server's shutdown wait ran out (a client that left is gone
        # already, and the body below is then dropped). End the stream as a failure, not a cut.
        await events.aclose()
        with contextlib.suppress(Exception):
            ending = failure(ServiceUnavailable(SHUTTING_DOWN))
            await send({"type": "http.response.body", "body": ending, "more_body": False})
        raise
    finally:
        await events.aclose()


class Translator(Protocol):
    """Another API's stream made from the relay's OpenAI events (``dialects``)."""

    def feed(self, item: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


async def translated(
    events: AsyncGenerator[bytes, None], translator: Translator, opening: bytes = b""
) -> AsyncGenerator[bytes, None]:
    """``events`` as another API's: ``opening`` first, then what each item becomes, then what
    ends the stream. Closing this closes ``events`` (the relay: its slot, its upstream)."""
    try:
        if opening:
            yield opening
        async for item in events:
            out = translator.feed(item)
            if out:
                yield out
        tail = translator.finish()
        if tail:
            yield tail
    finally:
        await events.aclose()


async def with_pings(
    events: AsyncGenerator[bytes, None], ping: bytes, interval: float
) -> AsyncGenerator[bytes, None]:
    """``events``, with ``ping`` sent whenever the stream was silent for ``interval`` seconds
    (clients and proxies that give up on a quiet connection keep it). Closing this closes
    ``events``."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait((pending,), timeout=interval)
            if not done:
                yield ping
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()
