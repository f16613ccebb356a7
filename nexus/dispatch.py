"""The one path to a backend: walk the plan, call the adapter, fail over, keep counts straight.

Connection errors, timeouts before the first byte, 5xx and 429 move on to the next step of the
plan, up to ``max_retries`` more attempts; any other upstream 4xx goes back to the client as it
came. Once a stream has started there is no failover: a failure ends it with an error event and
``[DONE]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import orjson

from .backends import Adapter, Adapters, Call, Completion, EventStream
from .backends.sse import DONE, is_done
from .config import RoutingSettings
from .errors import (
    JSONDict,
    NexusError,
    ServiceUnavailable,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from .health import HealthChecker
from .registry import Registry
from .routing.planner import Plan, Step, plan_request

log = logging.getLogger("nexus.dispatch")

Kind = Literal["chat", "embeddings"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Served:
    """Which backend answered and why: becomes the ``X-Nexus-*`` response headers."""

    step: Step
    route_reason: str
    attempts: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        backend = self.step.backend
        headers = [
            (b"x-nexus-backend", backend.name.encode()),
            (b"x-nexus-backend-type", backend.location.encode()),
            (b"x-nexus-route-reason", self.route_reason.encode()),
            (b"x-nexus-privacy-zone", backend.zone.encode()),
        ]
        if self.step.fallback is not None:
            headers.append((b"x-nexus-fallback-model", self.step.fallback.encode()))
        return headers


@dataclass(slots=True)
class StreamResult:
    served: Served
    events: AsyncGenerator[bytes, None]


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        adapters: Adapters,
        health: HealthChecker,
        routing: RoutingSettings,
    ) -> None:
        self.registry = registry
        self.adapters = adapters
        self.health = health
        self.routing = routing

    def plan(self, model: str) -> Plan:
        return plan_request(self.registry, self.routing, model)

    async def complete(
        self, kind: Kind, body: JSONDict, raw: bytes, client: Mapping[str, str], request_id: str
    ) -> tuple[Completion, Served]:
        """A whole (non-streaming) answer from the first step of the plan that gives one."""

        async def attempt(adapter: Adapter, step: Step, call: Call) -> Completion:
            try:
                if kind == "chat":
                    return await adapter.chat(step.backend, call)
                return await adapter.embeddings(step.backend, call)
            finally:
                step.backend.in_flight -= 1

        return await self._walk(body, raw, client, request_id, attempt)

    async def stream(
        self, body: JSONDict, raw: bytes, client: Mapping[str, str], request_id: str
    ) -> StreamResult:
        """Open a stream on the first step that answers; failover ends at the first event.
        The backend's in-flight slot is held until the relay ends."""

        async def attempt(adapter: Adapter, step: Step, call: Call) -> EventStream:
            try:
                return await adapter.open_stream(step.backend, call)
            except BaseException:
                step.backend.in_flight -= 1
                raise

        upstream, served = await self._walk(body, raw, client, request_id, attempt)
        return StreamResult(served, self._relay(upstream, served.step, request_id))

    async def _walk(
        self,
        body: JSONDict,
        raw: bytes,
        client: Mapping[str, str],
        request_id: str,
        attempt: Callable[[Adapter, Step, Call], Awaitable[T]],
    ) -> tuple[T, Served]:
        """Try the plan's steps in order until one answers; ``attempt`` owns the in-flight slot
        taken here (it releases it when the answer is complete, or at once when it fails)."""
        plan = self.plan(body["model"])
        last: UpstreamError | None = None
        for index, step in enumerate(plan.steps[: self.routing.max_retries + 1]):
            adapter = self.adapters.for_type(step.backend.type)
            if adapter is None:
                continue
            call = Call(body, raw, step.model, upstream_headers(step, client, request_id))
            step.backend.in_flight += 1
            step.backend.total_requests += 1
            try:
                result = await attempt(adapter, step, call)
            except UpstreamError as exc:
                self._failed(step, exc, request_id)
                if not exc.retryable:
                    raise
                last = exc
                continue
            return result, Served(step, plan.route_reason(index), index + 1)
        raise last or ServiceUnavailable(f"No backend could serve model '{plan.requested}'")

    async def _relay(
        self, upstream: EventStream, step: Step, request_id: str
    ) -> AsyncGenerator[bytes, None]:
        """Upstream events one for one; always ends with ``[DONE]``; releases the slot on exit."""
        done = False
        try:
            async for event in upstream:
                yield event
                if is_done(event):
                    done = True
                    break
        except UpstreamError as exc:
            self._failed(step, exc, request_id, started=True)
            yield error_event(exc)
        finally:
            step.backend.in_flight -= 1
            await upstream.aclose()
        if not done:
            yield DONE

    def _failed(
        self, step: Step, exc: UpstreamError, request_id: str, *, started: bool = False
    ) -> None:
        backend = step.backend
        # Down for sure: it refused the connection or let the request time out. A connection
        # dropped on reuse (the backend closed an idle keep-alive) only moves to the next one.
        if isinstance(exc, UpstreamConnectError | UpstreamTimeout) and not started:
            self.health.mark_down(backend, exc.message)
        if not exc.retryable and not started:  # the client's own mistake, reported by the backend
            log.info("request %s: backend %s refused it: %s", request_id, backend.name, exc)
            return
        when = "mid-stream" if started else "trying the next backend"
        log.warning("request %s: backend %s failed (%s): %s", request_id, backend.name, when, exc)


def upstream_headers(step: Step, client: Mapping[str, str], request_id: str) -> dict[str, str]:
    """Content type, the request id, and auth: a configured key always wins over the client's."""
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    key = step.backend.api_key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    elif "authorization" in client:
        headers["Authorization"] = client["authorization"]
    return headers


def error_event(exc: NexusError) -> bytes:
    """A mid-stream failure as one SSE event carrying an OpenAI error envelope."""
    return b"data: " + orjson.dumps(exc.envelope()) + b"\n\n"


def new_request_id() -> str:
    return os.urandom(16).hex()
