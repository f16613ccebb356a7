"""The adapter seam: one small interface per backend dialect, and upstream errors mapped once.

An adapter translates between the OpenAI wire format (what clients speak to Nexus) and its
backend's dialect. It never decides where a request goes; ``dispatch`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson

from ..errors import (
    JSONDict,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..registry import Backend, Model
from .http1 import ConnectFailed, HTTP1Client, ProtocolError, Response

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    request: float = 300.0  # a whole non-stream call, or a stream's response headers
    stream_idle: float = 120.0  # the longest silence between two stream events
    probe: float = 5.0


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler hands an adapter: the body as data and as the client's bytes."""

    body: JSONDict
    raw: bytes  # the client's bytes, used as-is when nothing had to change
    model: str  # the backend's own name for the model
    headers: Mapping[str, str]  # upstream headers decided by dispatch (auth, request id)

    def payload(self) -> bytes:
        """The bytes to send: the client's own unless the model name had to change."""
        if self.body.get("model") == self.model:
            return self.raw
        return orjson.dumps({**self.body, "model": self.model})


@dataclass(frozen=True, slots=True)
class Probe:
    """What a health probe learnt: the models, and how many requests the server takes at once
    when it says (llama.cpp's slots)."""

    models: list[Model]
    slots: int | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    body: bytes
    usage: JSONDict | None = None


class EventStream(Protocol):
    """An open upstream stream: OpenAI SSE events (each ``data: ...\\n\\n``) in upstream order."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Adapter(Protocol):
    async def probe(self, backend: Backend) -> Probe: ...

    async def chat(self, backend: Backend, call: Call) -> Completion: ...

    async def open_stream(self, backend: Backend, call: Call) -> EventStream: ...

    async def embeddings(self, backend: Backend, call: Call) -> Completion: ...


class HTTPAdapter:
    """Shared plumbing: the pooled upstream client, timeouts and the mapping of failures."""

    def __init__(self, client: HTTP1Client, timeouts: Timeouts) -> None:
        self.client = client
        self.timeouts = timeouts

    async def post_json(
        self, backend: Backend, path: str, payload: bytes, headers: Mapping[str, str]
    ) -> bytes:
        """POST and return the body of a 2xx answer; anything else raises an UpstreamError."""
        return await self._call(backend, "POST", path, payload, headers, self.timeouts.request)

    async def open_post(
        self, backend: Backend, path: str, payload: bytes, headers: Mapping[str, str]
    ) -> Response:
        """POST and return the open response once its headers arrived with a 2xx status."""
        limit = self.timeouts.request
        async with upstream_errors(backend, limit), asyncio.timeout(limit):
            resp = await self.client.request("POST", backend.url + path, headers, payload)
            if resp.status >= 400:
                raise status_error(backend, resp, await resp.read())
            return resp

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
        async with upstream_errors(backend, limit), asyncio.timeout(limit):
            resp = await self.client.request(method, backend.url + path, headers, payload)
            body = await resp.read()
        if resp.status >= 400:
            raise status_error(backend, resp, body)
        return body


@asynccontextmanager
async def upstream_errors(backend: Backend, limit: float) -> AsyncIterator[None]:
    """The one place transport failures become Nexus errors."""
    name = backend.name
    try:
        yield
    except UpstreamError:
        raise
    except TimeoutError as exc:
        raise UpstreamTimeout(name, f"Backend '{name}' did not answer within {limit:g}s") from exc
    except ConnectFailed as exc:
        raise UpstreamConnectError(name, f"Backend '{name}' is unreachable: {exc}") from exc
    except ProtocolError as exc:
        raise UpstreamProtocolError(name, f"Backend '{name}' answered badly: {exc}") from exc
    except OSError as exc:
        raise UpstreamUnavailable(
            name, f"Backend '{name}' failed: {type(exc).__name__}: {exc}"
        ) from exc


def status_error(backend: Backend, resp: Response, body: bytes) -> UpstreamStatusError:
    return UpstreamStatusError(backend.name, resp.status, body, resp.headers.get("retry-after"))


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
