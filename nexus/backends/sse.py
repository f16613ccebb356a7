"""Server-sent events: split an upstream byte stream on event boundaries, one event at a time.

Upstream answers are bounded here: an event (or NDJSON line) may be at most ``MAX_EVENT_BYTES``
long, and the idle timeout runs until a whole event is in, so bytes that trickle in without ever
ending an event cannot hold a stream open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ..dialects.events import (
    DONE,
    MAX_EVENT_BYTES,
    EventSplitter,
    EventTooLarge,
    LineSplitter,
)
from ..errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from ..registry import Backend
from .http1 import ProtocolError, Response, ResponseTooLarge

if TYPE_CHECKING:
    from .base import StartedStream

__all__ = ["DONE", "MAX_EVENT_BYTES", "EventSplitter", "LineSplitter", "SSEStream", "is_done"]


def is_done(item: bytes) -> bool:
    """True when ``item`` (one event, or events that came together) ends with the ``data: [DONE]``
    terminator (with or without the space)."""
    tail = max(0, len(item) - 24)
    if item.find(b"[DONE]", tail) < 0:  # the usual case, decided without a copy
        return False
    start = item.rfind(b"data:", tail)
    if start < 0 or (start > 0 and item[start - 2 : start] != b"\n\n"):
        return False
    return item[start + 5 :].strip() == b"[DONE]"


_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})


def opens_chunks(item: bytes) -> bool | None:
    """Whether ``item`` (the first events of a stream) opens a stream of OpenAI chunks: True at a
    first ``data`` field that holds a JSON object or ``[DONE]``; False at anything that is not such
    SSE (a JSON body, an HTML page, junk); None while it holds only comments and other fields
    (a keep-alive before the first chunk: the next events decide). Checked once per stream."""
    lines = item.split(b"\n")
    for index, line in enumerate(lines):
        if not line or line.startswith(b":"):
            continue
        field, colon, value = line.partition(b":")
        if not colon or field not in _FIELDS:
            return False
        if field != b"data":
            continue
        data = [value.removeprefix(b" ")]
        for more in lines[index + 1 :]:  # a value may span several data lines (joined by LF)
            if not more.startswith(b"data:"):
                break
            data.append(more[5:].removeprefix(b" "))
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            return True
        try:
            return isinstance(orjson.loads(payload), dict)
        except orjson.JSONDecodeError:
            return False
    return None


def joined(events: list[bytes], start: int, end: int) -> bytes:
    return events[start] if end - start == 1 else b"".join(events[start:end])


def writes(events: list[bytes]) -> Iterator[bytes]:
    """Events that came in one read as few items (client writes) as possible: an event that
    carries ``usage`` goes alone (dispatch reads usage from an item's first event), and the item
    that ends with ``[DONE]`` is the last."""
    start = 0
    for index, event in enumerate(events):
        if b'"usage":{' in event:
            if index > start:
                yield joined(events, start, index)
            start = index + 1
            yield event
        elif is_done(event):
            yield joined(events, start, index + 1)
            return
    if start < len(events):
        yield joined(events, start, len(events))


class Splitter(Protocol):
    def feed(self, data: bytes) -> list[bytes]: ...


class SSEStream:
    """Upstream SSE relayed event for event: each item is whole events, unchanged. Events that
    arrived in one read go on as one item (one write to the client instead of one per event);
    ``[DONE]`` is always the end of an item, and an event that carries ``usage`` an item alone.

    Reading stops after ``[DONE]``. On ``aclose`` a finished answer gives its connection back to
    the pool; an unfinished one closes it.
    """

    # The stream's usage as it was read (whether or not the client also gets a usage chunk), and
    # the StartedStream that hands it to dispatch (bound once the first event is in).
    usage: dict[str, Any] | None = None
    owner: StartedStream | None = None

    def __init__(self, backend: Backend, resp: Response, idle_timeout: float) -> None:
        self._backend = backend
        self._resp = resp
        self._idle = idle_timeout
        self._finished = False  # the answer was read to its end ([DONE] or the end of the body)
        # The idle timeout starts after the first event; until then the caller's deadline (the
        # request timeout, see HTTPAdapter.open_events) bounds the wait.
        self._started = False

    def bind(self, started: StartedStream) -> None:
        """Usage read from now on goes to ``started``; usage read before the first event was in
        (a whole answer in one read) is handed over here."""
        self.owner = started
        started.usage = self.usage

    def keep_usage(self, usage: dict[str, Any]) -> None:
        """Record the stream's usage for dispatch, before the stream's last event."""
        self.usage = usage
        if self.owner is not None:
            self.owner.usage = usage

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = EventSplitter()
        try:
            while (events := await self._next(splitter)) is not None:
                for item in writes(self.passing(events)):
                    if is_done(item):
                        self._finished = True  # before the yield: the reader stops at [DONE]
                        yield item
                        return
                    yield item
            self._finished = True
            tail = splitter.tail()
            if tail is not None:
                for item in self.passing([tail]):
                    yield item
        finally:
            await self.aclose()

    def passing(self, events: list[bytes]) -> list[bytes]:
        """What the client gets of a read's events: all of them (a subclass may hold some)."""
        return events

    async def _next(self, splitter: Splitter) -> list[bytes] | None:
        """The next whole events (one or more), or None at the end of the body. The idle timeout
        runs until an event is complete: bytes that do not end one do not reset it."""
        name = self._backend.name
        try:
            if not self._started:
                return await self._read(splitter)
            async with asyncio.timeout(self._idle):
                return await self._read(splitter)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                name, f"Backend '{name}' sent no whole event for {self._idle:g}s during the stream"
            ) from exc
        except ResponseTooLarge as exc:
            raise UpstreamProtocolError(
                name, f"Backend '{name}' sent more than [server] max_response_bytes: {exc}"
            ) from exc
        except (ProtocolError, EventTooLarge) as exc:
            raise UpstreamProtocolError(name, f"Backend '{name}' broke the stream: {exc}") from exc
        except OSError as exc:
            raise UpstreamUnavailable(
                name, f"Backend '{name}' broke off the stream: {exc}"
            ) from exc

    async def _read(self, splitter: Splitter) -> list[bytes] | None:
        resp = self._resp
        while (chunk := await resp.next_chunk()) is not None:
            events = splitter.feed(chunk)
            if events:
                self._started = True
                return events
        return None

    async def aclose(self) -> None:
        # An unfinished answer is abandoned by closing its connection: that is what tells the
        # backend to stop generating. A finished one gives its connection back to the pool, once
        # the few bytes that may still end the HTTP response are in.
        self.owner = None  # no cycle left for the garbage collector
        if self._finished:
            self._resp.release(drain=True)
        else:
            self._resp.close()
