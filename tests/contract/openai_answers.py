"""Every answer a client reads from Nexus, checked against OpenAI's published schema.

``Answers`` is an httpx transport that copies each response body as the client reads it, so the
check sees the exact bytes (every SSE event of a stream included) rather than the ``openai``
SDK's lenient parse of them. ``CheckedClients`` hands out SDK and plain httpx clients built on
it; the test's fixture calls ``check()`` when the test ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import orjson
from openai.types.chat import ChatCompletionChunk

from tests.harness import data_events

from . import openapi

# The schema of a successful answer, by path; any error status must be an ErrorResponse.
_SCHEMAS = {
    "/v1/chat/completions": "CreateChatCompletionResponse",
    "/v1/embeddings": "CreateEmbeddingResponse",
    "/v1/models": "ListModelsResponse",
}


@dataclass
class Answer:
    """One response as the client read it."""

    path: str
    status: int
    headers: httpx2.Headers
    raw: bytearray = field(default_factory=bytearray)

    def body(self) -> bytes:
        """The body with any content-encoding undone, as the client saw it."""
        response = httpx2.Response(self.status, headers=self.headers, stream=Body(self.raw))
        return response.read()

    def check(self) -> int:
        """Validate this answer; returns how many JSON documents it held."""
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            return self._check_stream()
        document = orjson.loads(self.body())
        if self.status >= 400:
            openapi.validate("ErrorResponse", document)
        elif self.path in _SCHEMAS:
            openapi.validate(_SCHEMAS[self.path], document)
        else:
            raise AssertionError(f"no OpenAI schema known for an answer on {self.path}")
        return 1

    def _check_stream(self) -> int:
        events = data_events(self.body().decode())
        assert events and events[-1] == "[DONE]", f"stream on {self.path} ends without [DONE]"
        assert "[DONE]" not in events[:-1], "data after [DONE]"
        for payload in events[:-1]:
            chunk = orjson.loads(payload)
            if "error" in chunk:
                openapi.validate("ErrorResponse", chunk)
            else:
                openapi.validate("CreateChatCompletionStreamResponse", chunk)
        return len(events) - 1


class Body(httpx2.SyncByteStream):
    """Bytes kept earlier, read again as a response body."""

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = bytes(data)

    def __iter__(self) -> Iterator[bytes]:
        yield self._data


class Tee(httpx2.SyncByteStream):
    """The upstream body, passed on piece by piece and kept in ``sink``."""

    def __init__(self, inner: httpx2.SyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._inner:
            self._sink.extend(piece)
            yield piece

    def close(self) -> None:
        self._inner.close()


class Answers(httpx2.BaseTransport):
    """A real HTTP transport that keeps every answer for ``check``."""

    def __init__(self) -> None:
        self._inner = httpx2.HTTPTransport()
        self.seen: list[Answer] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self._inner.handle_request(request)
        answer = Answer(request.url.path, response.status_code, response.headers)
        self.seen.append(answer)
        stream = response.stream
        assert isinstance(stream, httpx2.SyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=Tee(stream, answer.raw),
            extensions=response.extensions,
            request=request,
        )

    def close(self) -> None:
        self._inner.close()


class CheckedClients:
    """Clients for a test whose every answer is validated by ``check``."""

    def __init__(self) -> None:
        self._answers: list[Answers] = []
        self._closers: list[Any] = []

    def _transport(self) -> Answers:
        answers = Answers()
        self._answers.append(answers)
        return answers

    def sdk(self, base_url: str, api_key: str = "not-needed") -> openai.OpenAI:
        """The official SDK on Nexus at ``base_url`` (``/v1`` is added)."""
        http = httpx2.Client(transport=self._transport(), timeout=30)
        sdk = openai.OpenAI(
            base_url=base_url + "/v1", api_key=api_key, max_retries=0, http_client=http
        )
        self._closers.append(sdk)
        return sdk

    def http(self) -> httpx2.Client:
        """A plain client, for raw SSE the SDK would hide (``[DONE]``, error events)."""
        http = httpx2.Client(transport=self._transport(), timeout=30)
        self._closers.append(http)
        return http

    def check(self) -> int:
        """Close every client and validate every answer read; returns the documents checked."""
        for closer in self._closers:
            closer.close()
        return sum(answer.check() for answers in self._answers for answer in answers.seen)


def streamed_tool_calls(chunks: Iterable[ChatCompletionChunk]) -> list[dict[str, Any]]:
    """A stream's tool calls put together as a client does. The first fragment of a call must
    bring its index, id and name; later ones only its index and more arguments."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                function = delta.function
                assert function is not None, delta
                if delta.index not in calls:
                    assert delta.id and function.name, f"a first fragment without id/name: {delta}"
                    calls[delta.index] = {
                        "id": delta.id,
                        "type": "function",
                        "function": {"name": function.name, "arguments": ""},
                    }
                else:
                    later = {"index": delta.index, "function": {"arguments": function.arguments}}
                    assert delta.model_dump(exclude_unset=True) == later
                calls[delta.index]["function"]["arguments"] += function.arguments or ""
    return [calls[index] for index in sorted(calls)]
