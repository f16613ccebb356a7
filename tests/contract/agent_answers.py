"""Every answer an agent-protocol client reads from Nexus (``/v1/messages``, ``count_tokens``,
``/v1/responses``), checked against the provider's published schema, event by event.

As ``openai_answers.py`` does for chat: a real httpx transport keeps the exact bytes each client
read (and each request body it sent), so the check sees what went over the wire rather than
the SDK's lenient parse of it. ``check()`` runs when the test ends.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2
import openai
import orjson

from . import anthropic_spec, openapi
from .openai_answers import Body, Tee

# A stream's last event, by API, when it ends well.
_ANTHROPIC_LAST = "message_stop"
_RESPONSES_ENDINGS = frozenset({"response.completed", "response.incomplete", "response.failed"})


@dataclass
class Exchange:
    """One request a client sent and the response it read."""

    path: str
    sent: bytes
    status: int
    headers: httpx2.Headers
    raw: bytearray = field(default_factory=bytearray)
    cut: bool = False  # the client closed the stream early on purpose: no ending to check

    @property
    def request(self) -> Any:
        return orjson.loads(self.sent) if self.sent else None

    def body(self) -> bytes:
        """The body with any content-encoding undone, as the client saw it."""
        stream = Body(self.raw)
        return httpx2.Response(self.status, headers=self.headers, stream=stream).read()

    @property
    def streamed(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")

    def events(self) -> list[tuple[str | None, Any]]:
        """An SSE body's events as (``event:`` name, parsed ``data:``)."""
        out: list[tuple[str | None, Any]] = []
        for block in self.body().decode().replace("\r\n", "\n").split("\n\n"):
            name: str | None = None
            data: list[str] = []
            for line in block.split("\n"):
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
            if data:
                out.append((name, orjson.loads("\n".join(data))))
        return out

    def check(self) -> int:
        """Validate this exchange; returns how many documents it held."""
        if self.path.startswith("/v1/messages"):
            return check_anthropic(self)
        if self.path.startswith("/v1/responses"):
            return check_responses(self)
        return 0  # admin reads (/v1/history, /metrics): not an API answer


def check_anthropic(exchange: Exchange) -> int:
    if exchange.streamed:
        events = exchange.events()
        check_anthropic_events(events, complete=not exchange.cut)
        return len(events)
    document = orjson.loads(exchange.body())
    if exchange.status >= 400:
        anthropic_spec.validate("ErrorResponse", document)
    elif exchange.path.endswith("/count_tokens"):
        anthropic_spec.validate("CountMessageTokensResponse", document)
    else:
        anthropic_spec.validate("Message", document)
    return 1


def check_anthropic_events(events: list[tuple[str | None, Any]], *, complete: bool = True) -> None:
    """Each event against the spec, its ``event:`` name its type, and in Anthropic's order:
    ``message_start``, blocks started, fed and stopped by index, ``message_delta``,
    ``message_stop`` (or an ``error`` event that ends it)."""
    assert events, "an empty stream"
    kinds = [data.get("type") for _, data in events]
    assert kinds[0] == "message_start", kinds
    open_block: int | None = None
    next_index = 0
    for position, (name, data) in enumerate(events):
        kind = data.get("type")
        assert name == kind, f"event {name!r} carries a {kind!r}"
        if kind == "ping":
            assert data == {"type": "ping"}
            continue
        if kind == "error":
            anthropic_spec.validate("ErrorResponse", data)
            assert position == len(events) - 1, "events after an error"
            return
        anthropic_spec.validate("MessageStreamEvent", data)
        if kind == "content_block_start":
            assert open_block is None and data["index"] == next_index, kinds
            open_block = data["index"]
            next_index += 1
        elif kind == "content_block_delta":
            assert data["index"] == open_block, kinds
        elif kind == "content_block_stop":
            assert data["index"] == open_block, kinds
            open_block = None
        elif kind == "message_delta":
            assert open_block is None, kinds
    if not complete:
        return
    assert kinds[-1] == _ANTHROPIC_LAST, kinds
    assert kinds.count("message_delta") == 1 and kinds[-2] == "message_delta", kinds


@functools.cache
def responses_event_schemas() -> dict[str, str]:
    """Responses' event type -> the schema of that event, from the spec's union."""
    schemas = openapi.load_spec()["components"]["schemas"]
    out: dict[str, str] = {}
    for ref in schemas["ResponseStreamEvent"]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[1]
        for kind in schemas[name]["properties"]["type"].get("enum", ()):
            out[kind] = name
    return out


def check_responses(exchange: Exchange) -> int:
    if exchange.streamed:
        events = exchange.events()
        check_responses_events(events, complete=not exchange.cut)
        return len(events)
    document = orjson.loads(exchange.body())
    if exchange.status >= 400:
        openapi.validate("ErrorResponse", document)
    else:
        openapi.validate("Response", document)
    return 1


def check_responses_events(events: list[tuple[str | None, Any]], *, complete: bool = True) -> None:
    """Each event against its schema, its ``event:`` name its type, ``sequence_number``
    increasing, ``response.created`` first and a terminal event last."""
    assert events, "an empty stream"
    schemas = responses_event_schemas()
    numbers = []
    for name, data in events:
        kind = data.get("type")
        assert name in (None, kind), f"event {name!r} carries a {kind!r}"
        assert kind in schemas, f"not a Responses event type: {kind!r}"
        openapi.validate(schemas[kind], data)
        numbers.append(data["sequence_number"])
    assert numbers == sorted(set(numbers)), f"sequence numbers not increasing: {numbers}"
    kinds = [data["type"] for _, data in events]
    assert kinds[0] == "response.created", kinds
    if not complete:
        return
    assert kinds[-1] in _RESPONSES_ENDINGS or kinds[-1] == "error", kinds
    assert sum(kind in _RESPONSES_ENDINGS for kind in kinds) <= 1, kinds


class Recording(httpx2.BaseTransport):
    """A real HTTP transport that keeps every exchange."""

    def __init__(self, seen: list[Exchange]) -> None:
        self._inner = httpx2.HTTPTransport()
        self.seen = seen

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        sent = request.read()
        response = self._inner.handle_request(request)
        exchange = Exchange(request.url.path, sent, response.status_code, response.headers)
        self.seen.append(exchange)
        stream = response.stream
        assert isinstance(stream, httpx2.SyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=Tee(stream, exchange.raw),
            extensions=response.extensions,
            request=request,
        )

    def close(self) -> None:
        self._inner.close()


class AgentClients:
    """The official SDKs (and plain httpx) on Nexus, every exchange kept for ``check``."""

    def __init__(self) -> None:
        self.seen: list[Exchange] = []
        self._closers: list[Any] = []

    def anthropic(
        self, base_url: str, api_key: str | None = "k", auth_token: str | None = None
    ) -> anthropic.Anthropic:
        """The SDK with its key as ``x-api-key``, or as ``Authorization: Bearer`` when
        ``auth_token`` is given instead."""
        http = anthropic.DefaultHttpxClient(trust_env=False, transport=Recording(self.seen))
        client = anthropic.Anthropic(
            base_url=base_url,
            api_key=api_key,
            auth_token=auth_token,
            max_retries=0,
            http_client=http,
        )
        self._closers.append(client)
        return client

    def openai(self, base_url: str, api_key: str = "k") -> openai.OpenAI:
        http = httpx2.Client(transport=Recording(self.seen), timeout=30, trust_env=False)
        client = openai.OpenAI(
            base_url=base_url + "/v1", api_key=api_key, max_retries=0, http_client=http
        )
        self._closers.append(client)
        return client

    def http(self) -> httpx2.Client:
        client = httpx2.Client(transport=Recording(self.seen), timeout=30, trust_env=False)
        self._closers.append(client)
        return client

    def on(self, path: str) -> list[Exchange]:
        return [e for e in self.seen if e.path == path]

    def check(self) -> int:
        """Close every client and validate every exchange; returns the documents checked."""
        for closer in self._closers:
            closer.close()
        return sum(exchange.check() for exchange in self.seen)
