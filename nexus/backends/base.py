"""The adapter seam: one small interface per backend dialect, and upstream errors mapped once.

An adapter translates between the OpenAI wire format (what clients speak to Nexus) and its
backend's dialect. It never decides where a request goes; ``dispatch`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import orjson

from ..errors import (
    ConnectionLimitReached,
    InvalidRequest,
    JSONDict,
    NexusError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..redact import scrub_bytes
from ..registry import Backend, Model
from .http1 import (
    ConnectFailed,
    HTTP1Client,
    PoolExhausted,
    ProtocolError,
    Response,
    ResponseTooLarge,
)
from .sse import MAX_EVENT_BYTES, SSEStream, opens_chunks

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    request: float = 300.0  # a whole non-stream call, or a stream's response headers
    stream_idle: float = 120.0  # the longest silence between two stream events
    probe: float = 5.0


@dataclass(frozen=True, slots=True)
class Inbound:
    """What a request in another API (Anthropic Messages, OpenAI Responses) carries beside the
    chat form every backend is sent."""

    native: JSONDict | None = None  # the client's own Anthropic Messages request
    reasoning_effort: str | None = None  # low | medium | high: only where the backend takes it
    # The client's ``anthropic-beta`` and ``anthropic-version`` headers: its native request is
    # written for them (``context_management`` needs its beta at Anthropic).
    anthropic_beta: str | None = None
    anthropic_version: str | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler hands an adapter: the body as data and as the client's bytes."""

    body: JSONDict
    raw: bytes  # the client's bytes, used as-is when nothing had to change
    model: str  # the backend's own name for the model
    headers: Mapping[str, str]  # upstream headers decided by dispatch (auth, request id)
    prompt_tokens: int = 0  # the router's estimate of the prompt (text only)
    inbound: Inbound | None = None  # what a request in another API carries beside its chat form

    @property
    def native(self) -> JSONDict | None:
        """The client's own request when it spoke a provider's API (Anthropic Messages): a
        backend of that provider is sent it as it came, never translated twice."""
        return self.inbound.native if self.inbound is not None else None

    def with_reasoning_effort(self) -> Call:
        """This call with the client's reasoning effort in its body, for a backend that takes
        it (the chat form leaves it out, so that backends without it are not refused)."""
        effort = self.inbound.reasoning_effort if self.inbound is not None else None
        if effort is None or "reasoning_effort" in self.body:
            return self
        body = {**self.body, "model": self.model, "reasoning_effort": effort}
        return replace(self, body=body, raw=encode_request(body))

    @property
    def requested_model(self) -> str:
        """The model as the client named it: what a translated answer reports."""
        requested = self.body.get("model")
        return requested if isinstance(requested, str) else self.model

    @property
    def include_usage(self) -> bool:
        """The client asked for a usage chunk at the end of its stream."""
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    def payload(self) -> bytes:
        """The bytes to send: the client's own unless the model name had to change."""
        if self.body.get("model") == self.model:
            return self.raw
        return encode_request({**self.body, "model": self.model})


def encode_request(data: Any) -> bytes:
    """A request body built from the client's JSON. orjson reads 1024 levels of nesting but
    writes only 254: a body nested deeper than that is the client's mistake (400), not a 500."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise InvalidRequest(
            "Request body is nested too deeply: at most 254 levels of arrays and objects"
        ) from None


@dataclass(frozen=True, slots=True)
class Probe:
    """What a health probe learnt: the models, and how many requests the server takes at once
    when it says (llama.cpp's slots)."""

    models: list[Model]
    slots: int | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    body: bytes
    usage: JSONDict | None = None  # OpenAI's form, whatever the body's
    native: bool = False  # the body is in the client's own API (``Call.native`` was sent)


class EventStream(Protocol):
    """An open upstream stream: OpenAI SSE events (each ``data: ...\\n\\n``) in upstream order."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class StartedStream:
    """A stream whose first event is in hand: the point where dispatch commits to a backend.

    ``rest`` yields the events after ``first``; ``aclose`` ends both (an unfinished answer is
    abandoned, which tells the backend to stop).
    """

    first: bytes
    rest: AsyncIterator[bytes]
    stream: EventStream
    # The stream's usage as the adapter read it (whether or not the client gets a usage
    # chunk too): set once the stream has ended. Dispatch reads it for the cost.
    usage: dict[str, Any] | None = None
    native: bool = False  # events in the client's own API (``Call.native`` was sent)

    async def aclose(self) -> None:
        try:
            if isinstance(self.rest, AsyncGenerator):
                await self.rest.aclose()
        finally:
            await self.stream.aclose()


class Adapter(Protocol):
    async def probe(self, backend: Backend) -> Probe: ...

    async def chat(self, backend: Backend, call: Call) -> Completion: ...

    async def open_stream(self, backend: Backend, call: Call) -> StartedStream:
        """Return once the first event is in; any failure before it raises an UpstreamError."""
        ...

    async def embeddings(self, backend: Backend, call: Call) -> Completion: ...


class HTTPAdapter:
    """Shared plumbing: the pooled upstream client, timeouts and the mapping of failures."""

    def __init__(self, client: HTTP1Client, timeouts: Timeouts) -> None:
        self.client = client
        self.timeouts = timeouts

    def status_error(self, backend: Backend, resp: Response, body: bytes) -> UpstreamStatusError:
        """An error answer as an UpstreamStatusError; a dialect whose error body is not OpenAI's
        envelope turns it into one here, the one place every call's errors pass."""
        return status_error(backend, resp, body)

    async def post_json(
        self, backend: Backend, path: str, payload: bytes, headers: Mapping[str, str]
    ) -> bytes:
        """POST and return the body of a 2xx answer; anything else raises an UpstreamError."""
        return await self._call(backend, "POST", path, payload, headers, self.timeouts.request)

    async def open_events(
        self,
        backend: Backend,
        path: str,
        payload: bytes,
        headers: Mapping[str, str],
        wrap: Callable[[Response], EventStream],
    ) -> StartedStream:
        """POST and return the stream once its first event is in, all within the request timeout.

        A 200 followed by silence, a drop or an empty body is a failure of this backend like a
        refused connection: nothing went to the client yet, so the next backend may be tried.
        One timeout and one error mapping cover the whole start (they cost on every stream).
        """
        limit = self.timeouts.request
        stream: EventStream | None = None
        rest: AsyncIterator[bytes] | None = None
        try:
            with UpstreamErrors(backend, limit):
                async with asyncio.timeout(limit):
                    resp = await self.client.request("POST", backend.url + path, headers, payload)
                    if resp.status >= 400:
                        raise self.status_error(backend, resp, await resp.read())
                    if not answered(resp.status):
                        resp.close()
                        raise no_answer(backend, resp.status)
                    stream = wrap(resp)
                    rest = aiter(stream)
                    first = await _first_chunk(backend, rest)
        except BaseException:
            if stream is not None and rest is not None:
                await StartedStream(b"", rest, stream).aclose()
            raise
        started = StartedStream(first, rest, stream)
        if isinstance(stream, SSEStream):  # the usage it reads lands here, for dispatch
            stream.bind(started)
        return started

    async def get_json(self, backend: Backend, path: str, headers: Mapping[str, str]) -> Any:
        body = await self._call(backend, "GET", path, b"", headers, self.timeouts.probe)
        return parse_json(backend, body)

    async def post_probe(
        self, backend: Backend, path: str, payload: JSONDict, headers: Mapping[str, str]
    ) -> Any:
        headers = {**headers, "Content-Type": "application/json"}
        body = await self._call(
            backend, "POST", path, orjson.dumps(payload), headers, self.timeouts.probe
        )
        return parse_json(backend, body)

    async def _call(
        self,
        backend: Backend,
        method: str,
        path: str,
        payload: bytes,
        headers: Mapping[str, str],
        limit: float,
    ) -> bytes:
        with UpstreamErrors(backend, limit):
            async with asyncio.timeout(limit):
                resp = await self.client.request(method, backend.url + path, headers, payload)
                body = await resp.read()
        if resp.status >= 400:
            raise self.status_error(backend, resp, body)
        if not answered(resp.status):
            raise no_answer(backend, resp.status)
        return body


class UpstreamErrors:
    """The one place transport failures become Nexus errors: ``with UpstreamErrors(...)`` around
    an upstream call (outside its timeout, so that a timeout arrives as TimeoutError). A plain
    class, not a generator-based context manager: it is entered on every upstream call."""

    __slots__ = ("backend", "limit")

    def __init__(self, backend: Backend, limit: float) -> None:
        self.backend = backend
        self.limit = limit

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None or isinstance(exc, UpstreamError) or not isinstance(exc, Exception):
            return
        mapped = transport_error(self.backend.name, self.limit, exc)
        if mapped is not None:
            raise mapped from exc


def transport_error(name: str, limit: float, exc: Exception) -> NexusError | None:
    """The Nexus error for a transport failure talking to backend ``name`` (None: not one)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(name, f"Backend '{name}' did not answer within {limit:g}s")
    if isinstance(exc, ConnectFailed):
        return UpstreamConnectError(name, f"Backend '{name}' is unreachable: {exc}")
    if isinstance(exc, PoolExhausted):
        return ConnectionLimitReached(
            f"Nexus could not reach backend '{name}': {exc} ([server] max_concurrent_requests). "
            "Retry shortly, or raise the limit."
        )
    if isinstance(exc, ResponseTooLarge):
        return UpstreamProtocolError(
            name, f"Backend '{name}' sent more than [server] max_response_bytes: {exc}"
        )
    if isinstance(exc, ProtocolError):
        return UpstreamProtocolError(name, f"Backend '{name}' answered badly: {exc}")
    if isinstance(exc, OSError):
        return UpstreamUnavailable(name, f"Backend '{name}' failed: {type(exc).__name__}: {exc}")
    return None


async def _first_chunk(backend: Backend, rest: AsyncIterator[bytes]) -> bytes:
    """The stream's first chunk, with any comments before it: what commits the request to this
    backend. A body that is not SSE of OpenAI chunks (a JSON object, junk) fails here, while the
    next backend may still be tried."""
    name = backend.name
    items: list[bytes] = []
    size = 0
    while (item := await anext(rest, None)) is not None:
        items.append(item)
        size += len(item)
        opens = opens_chunks(item)
        if opens:
            return items[0] if len(items) == 1 else b"".join(items)
        if opens is False:
            shown = scrub_bytes(item[:120], backend.secrets).decode("utf-8", "replace")
            raise UpstreamProtocolError(
                name,
                f"Backend '{name}' answered a stream with something other than SSE chat "
                f"chunks: {shown!r}",
            )
        if size > MAX_EVENT_BYTES:
            raise UpstreamProtocolError(name, f"Backend '{name}' sent no chunk, only comments")
    raise UpstreamProtocolError(name, f"Backend '{name}' ended the stream before its first event")


def status_error(backend: Backend, resp: Response, body: bytes) -> UpstreamStatusError:
    # A backend may echo the key it was sent ("invalid key sk-..."): that never goes further.
    body = scrub_bytes(body, backend.secrets)
    return UpstreamStatusError(backend.name, resp.status, body, resp.headers.get("retry-after"))


def answered(status: int) -> bool:
    """A final 2xx with content: 1xx, 3xx (Nexus follows no redirects) and 204/205 answer
    nothing, and count as the backend's failure."""
    return 200 <= status < 300 and status != 204 and status != 205


def no_answer(backend: Backend, status: int) -> UpstreamProtocolError:
    name = backend.name
    if 300 <= status < 400:
        why = "redirected the request; Nexus follows no redirects: set the backend's final URL"
    elif status < 200:
        why = "switched protocols instead of answering"
    else:
        why = "answered with no content"
    return UpstreamProtocolError(name, f"Backend '{name}' {why} (status {status})")


def parse_json(backend: Backend, body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(
            backend.name, f"Backend '{backend.name}' sent invalid JSON: {exc}"
        ) from exc


async def gather_limited(calls: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run ``calls`` concurrently, at most ``limit`` at a time, keeping their order."""
    semaphore = asyncio.Semaphore(limit)

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await call()

    return list(await asyncio.gather(*(run(call) for call in calls)))
