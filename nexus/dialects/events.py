"""Wire events, shared by the translators here and the adapters above: cutting an upstream's
bytes into whole SSE events or NDJSON lines (bounded: ``MAX_EVENT_BYTES``), and writing OpenAI
``chat.completion.chunk`` events. One splitter and one chunk writer for every dialect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1024 * 1024
JSONDict = dict[str, Any]


def sse_event(payload: JSONDict) -> bytes:
    """One SSE event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass(slots=True)
class ChunkWriter:
    """OpenAI ``chat.completion.chunk`` events of one stream: the id, time and model they share.
    With ``include_usage`` every chunk carries ``usage`` (null until the last), as OpenAI's do."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def envelope(self, choices: list[JSONDict], usage: JSONDict | None = None) -> JSONDict:
        chunk: JSONDict = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def chunk(self, delta: JSONDict, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse_event(self.envelope([choice]))

    def usage_chunk(self, usage: JSONDict) -> bytes:
        """The last chunk of a stream whose client asked for usage: no choices, the totals."""
        return sse_event(self.envelope([], usage))


class EventTooLarge(Exception):
    """An event (or NDJSON line) longer than the limit: the upstream is not to be trusted."""


def event_too_large(limit: int) -> EventTooLarge:
    return EventTooLarge(f"an event is longer than {limit} bytes")


class EventSplitter:
    """Cuts bytes, however they were read, into SSE events that each end in a blank line.

    Line ends may be CRLF, LF or a lone CR (the SSE spec allows all three); they become LF, also
    when a CRLF's two bytes arrive in different reads. Nothing else is re-encoded.
    """

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()  # grown in place: a drip of tiny reads stays linear
        self._after_cr = False  # the last read ended in CR: an LF opening the next one is its pair
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        if self._after_cr and data[0] == 10:
            data = data[1:]
        self._after_cr = False
        if b"\r" in data:
            self._after_cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer: bytes | bytearray = data  # the usual case: nothing waiting, no copy
        if self._buffer:
            seen = len(self._buffer)
            self._buffer += data
            if self._buffer.find(b"\n\n", max(0, seen - 1)) < 0:  # nothing ended yet
                if len(self._buffer) > self._limit:
                    raise event_too_large(self._limit)
                return []
            buffer = bytes(self._buffer)
        events = []
        start, size = 0, len(buffer)
        while True:
            while start < size and buffer[start] == 10:  # blank lines between events
                start += 1
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            if end + 2 - start > self._limit:
                raise event_too_large(self._limit)
            events.append(bytes(buffer[start : end + 2]))
            start = end + 2
        self._buffer = bytearray(buffer[start:])
        if len(self._buffer) > self._limit:
            raise event_too_large(self._limit)
        return events

    def tail(self) -> bytes | None:
        """What is left when the stream ends, as a last event (the upstream omitted the blank
        line after it); None when nothing is."""
        rest = bytes(self._buffer).strip()
        self._buffer = bytearray()
        return rest + b"\n\n" if rest else None


class LineSplitter:
    """Cuts bytes into non-blank lines (NDJSON), without their line ends."""

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data
        *lines, self._buffer = buffer.split(b"\n")
        if len(buffer) > self._limit and max(map(len, (*lines, self._buffer))) > self._limit:
            raise event_too_large(self._limit)
        return [line for line in lines if line.strip()]

    def tail(self) -> bytes | None:
        rest, self._buffer = self._buffer.strip(), b""
        return rest or None
