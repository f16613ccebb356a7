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

import aiohttp
import orjson
from yarl import URL

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
class Completion:
    body: bytes
    usage: JSONDict | None = None


class EventStream(Protocol):
    """An open upstream stream: OpenAI SSE events (each ``data: ...\\n\\n``) in upstream order."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Adapter(Protocol):
    async def list_models(self, backend: Backend) -> list[Model]: ...

    async def chat(self, backend: Backend, call: Call) -> Completion: ...

    async def open_stream(self, backend: Backend, call: Call) -> EventStream: ...

    async def embeddings(self, backend: Backend, call: Call) -> Completion: ...


class HTTPAdapter:
    """Shared plumbing: the pooled session, timeouts and the mapping of transport errors."""

    def __init__(self, session: aiohttp.ClientSession, timeouts: Timeouts) -> None:
        self.session = session
        self.timeouts = timeouts
        self._request_timeout = aiohttp.ClientTimeout(
            total=timeouts.request, sock_connect=timeouts.connect
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.stream_idle
        )
        self._probe_timeout = aiohttp.ClientTimeout(total=timeouts.probe)
        self._urls: dict[tuple[str, str], URL] = {}

    def url(self, backend: Backend, path: str) -> URL:
        """The parsed URL of ``path`` on ``backend``, parsed once (yarl parsing costs per call)."""
        key = (backend.url, path)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) > 4096:  # backends come and go; never grow without bound
                self._urls.clear()
            url = self._urls[key] = URL(backend.url + path)
        return url

    async def post_json(
        self, backend: Backend, path: str, payload: bytes, headers: Mapping[str, str]
    ) -> bytes:
        """POST and return the body of a 2xx answer; anything else raises an UpstreamError."""
        async with (
            upstream_errors(backend, self.timeouts.request),
            self.session.post(
                self.url(backend, path),
                data=payload,
                headers=headers,
                timeout=self._request_timeout,
            ) as resp,
        ):
            body = await resp.read()
            if resp.status >= 400:
                raise status_error(backend, resp, body)
            return body

    async def open_post(
        self, backend: Backend, path: str, payload: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """POST and return the open response once its headers arrived with a 2xx status."""
        async with upstream_errors(backend, self.timeouts.request):
            resp = await asyncio.wait_for(
                self.session.post(
                    self.url(backend, path),
                    data=payload,
                    headers=headers,
                    timeout=self._stream_timeout,
                ),
                self.timeouts.request,
            )
            if resp.status >= 400:
                try:
                    body = await resp.read()
                finally:
                    resp.release()
                raise status_error(backend, resp, body)
            return resp

    async def get_json(self, backend: Backend, path: str, headers: Mapping[str, str]) -> Any:
        async with (
            upstream_errors(backend, self.timeouts.probe),
            self.session.get(
                self.url(backend, path), headers=headers, timeout=self._probe_timeout
            ) as resp,
        ):
            body = await resp.read()
            if resp.status >= 400:
                raise status_error(backend, resp, body)
        return parse_json(backend, body)

    async def post_probe(
        self, backend: Backend, path: str, payload: JSONDict, headers: Mapping[str, str]
    ) -> Any:
        async with (
            upstream_errors(backend, self.timeouts.probe),
            self.session.post(
                self.url(backend, path),
                data=orjson.dumps(payload),
                headers={**headers, "Content-Type": "application/json"},
                timeout=self._probe_timeout,
            ) as resp,
        ):
            body = await resp.read()
            if resp.status >= 400:
                raise status_error(backend, resp, body)
        return parse_json(backend, body)


@asynccontextmanager
async def upstream_errors(backend: Backend, limit: float) -> AsyncIterator[None]:
    """The one place transport failures become Nexus errors."""
    try:
        yield
    except UpstreamError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout(
            backend.name, f"Backend '{backend.name}' did not answer within {limit:g}s"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamConnectError(
            backend.name, f"Backend '{backend.name}' is unreachable: {exc.strerror or exc}"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(
            backend.name, f"Backend '{backend.name}' failed: {type(exc).__name__}: {exc}"
        ) from exc


def status_error(
    backend: Backend, resp: aiohttp.ClientResponse, body: bytes
) -> UpstreamStatusError:
    return UpstreamStatusError(backend.name, resp.status, body, resp.headers.get("Retry-After"))


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
