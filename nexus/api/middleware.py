"""The outermost ASGI layer: the guard, the request id, and a short path to the hot endpoints.

The guard (``guard.py``: Host, Origin, Content-Type) sees every HTTP and WebSocket request first,
hot routes included; a refused request gets its envelope (a WebSocket, a 403) and goes no further.

Every answer carries ``X-Request-Id`` (the client's when it sent a sane one, else a new one). The
POST endpoints that carry inference traffic are called directly from here, in front of the
Starlette app (its error middleware, router and exception middleware cost more than the handler's
own work); their errors are rendered by the same envelope code. Everything else goes to Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InternalError, MethodNotAllowed, NexusError, ServiceUnavailable
from ..keys.ring import ClientKey
from ..telemetry.outcomes import Outcome, Trace, outcome_of
from .auth import KEY_SCOPE, Auth
from .guard import Guard
from .http import RAW_HEAD, ClientGone, header_pairs, send_json

REQUEST_ID_KEY = "nexus.request_id"
TRACE_KEY = "nexus.trace"
# The inference routes whose key admission, with the shared store, dispatch makes (the others,
# count_tokens, are admitted before their handler runs).
DISPATCHED = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/messages", "/v1/responses"})
access_log = logging.getLogger("nexus.access")
log = logging.getLogger("nexus.api")
API_OF = {"/v1/messages": "messages", "/v1/responses": "responses"}
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")


class GatewayMiddleware:
    def __init__(
        self,
        app: Starlette,
        hot_routes: Mapping[str, ASGIApp],
        guard: Guard | None = None,
        auth: Auth | None = None,
    ) -> None:
        self.app = app
        self.hot_routes = dict(hot_routes)  # path -> handler, for POST
        self.guard = guard  # None only where this layer is tested alone
        self.auth = auth  # None unless [auth] enabled

    @property
    def state(self) -> State:
        return self.app.state

    @property
    def routes(self) -> list[BaseRoute]:
        return self.app.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope[REQUEST_ID_KEY] = request_id.decode()

        start: list[Message] = []
        key: ClientKey | None = None
        # a keyed request's x-ratelimit-* header lines; None: the shared store admits it at
        # dispatch, and they are on its trace
        rate: bytes | None = b""
        raw_head = RAW_HEAD in (scope.get("extensions") or ())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                lines = b"x-request-id: " + request_id + b"\r\n"
                lines += rate if rate is not None else trace_of(scope).rate
                if raw_head:  # the request id is safe (``_SAFE_ID`` or ours), the rest is ours
                    message[RAW_HEAD] = lines
                else:
                    message["headers"] = [*message.get("headers", ()), *header_pairs(lines)]
                start.append(message)
            await send(message)

        handler = self.hot_routes.get(scope["path"])
        # Another API's handler (Anthropic Messages) renders errors in that API's envelope.
        render = getattr(handler, "render_error", None) or _openai_error
        refusal = self._refusal(scope, handler)
        auth = self.auth
        limited: ClientKey | None = None  # a known key its limits refused
        if refusal is None and auth is not None and scope["path"] in auth.paths:
            refusal, key, limited, rate = _keyed(auth, scope)
        if refusal is not None:
            log.debug("refused %s %s: %s", scope["method"], scope["path"], refusal.message)
            status, body = render(refusal, scope[REQUEST_ID_KEY])
            await send_json(send_with_id, status, body, _encode(refusal.all_headers()))
            if limited is not None:
                self._record_refusal(scope, limited, refusal)
            return
        if handler is None:
            scope[KEY_SCOPE] = key
            await self.app(scope, receive, send_with_id)
            return
        await self._serve(handler, scope, receive, send_with_id, start, render, key, rate is None)

    async def _serve(
        self,
        handler: ASGIApp,
        scope: Scope,
        receive: Receive,
        send_with_id: Send,
        start: list[Message],
        render: Render,
        key: ClientKey | None,
        deferred: bool = False,
    ) -> None:
        """Run an inference handler; its errors in its envelope; its outcome recorded.
        ``deferred``: the key's admission is made in the shared store, at dispatch."""
        began = time.perf_counter()
        trace = scope[TRACE_KEY] = Trace()
        trace.client_key = key
        scope["app"] = self.app  # handlers reach the gateway through it, as under Starlette
        try:
            if deferred:
                trace.pending = key
                if scope["path"] not in DISPATCHED and self.auth is not None:
                    await self._admit_shared(trace)
            await handler(scope, receive, send_with_id)
        except ClientGone:
            trace.error_type = "client_gone"
        except asyncio.CancelledError:
            # Only the server cancels a request from outside (a client that left is handled by
            # the handler's own guard): the shutdown wait ran out. Said once, not as a traceback.
            log.info("POST %s cancelled: Nexus is shutting down", scope["path"])
            trace.error_type = "shutdown"
            if not start:
                ending = ServiceUnavailable("Nexus is shutting down; retry against a running Nexus")
                with contextlib.suppress(Exception):
                    await send_json(send_with_id, 503, ending.body())
        except NexusError as exc:
            trace.error_type = exc.error_type
            status, body = render(exc, scope[REQUEST_ID_KEY])
            await send_json(send_with_id, status, body, _encode(exc.all_headers()))
        except Exception:  # a bug: say so in the log, answer with an envelope if still possible
            log.exception("unexpected error on POST %s", scope["path"])
            trace.error_type = "internal_error"
            if not start:
                error = InternalError("Internal error in Nexus; the log has the details")
                await send_json(send_with_id, 500, error.body())
        finally:
            if key is not None:  # its usage is counted from its outcome (KeyRing.count)
                if not deferred:
                    key.window.in_flight -= 1
                elif self.auth is not None and self.auth.shared is not None:
                    self.auth.shared.finished(key, trace)
        seconds = time.perf_counter() - began
        status = start[0]["status"] if start else 499
        outcome = outcome_of(trace, scope[REQUEST_ID_KEY], status, seconds * 1000)
        gateway = getattr(scope["app"].state, "gateway", None)
        if gateway is not None:
            gateway.telemetry.record(outcome)
        if access_log.isEnabledFor(logging.INFO):
            _log_request(scope["path"], outcome, trace.content)

    async def _admit_shared(self, trace: Trace) -> None:
        """A route that does not dispatch (count_tokens): the key's admission, here."""
        assert self.auth is not None and self.auth.shared is not None
        await self.auth.shared.admit(trace, None, None, cloud=False)

    def _record_refusal(self, scope: Scope, key: ClientKey, refusal: NexusError) -> None:
        """A keyed request its limits refused still counts in the key's history and metrics."""
        trace = Trace(api=API_OF.get(scope["path"], "chat"), client_key=key, admitted=False)
        trace.error_type = refusal.error_type
        outcome = outcome_of(trace, scope[REQUEST_ID_KEY], refusal.status_code, 0.0)
        gateway = getattr(self.app.state, "gateway", None)
        if gateway is not None:
            gateway.telemetry.record(outcome)

    def _refusal(self, scope: Scope, handler: ASGIApp | None = None) -> NexusError | None:
        """The guard's refusal; else, on an inference route, any method but POST (answered here,
        in that route's own envelope)."""
        refusal = None if self.guard is None else self.guard.check(scope)
        if refusal is None and handler is not None and scope["method"] != "POST":
            refusal = MethodNotAllowed(f"Method {scope['method']} is not allowed here", "POST")
        return refusal

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """WebSockets pass the guard first; lifespan goes straight through."""
        if scope["type"] == "websocket":
            refusal = self._refusal(scope)
            if refusal is not None:
                await _refuse_websocket(scope, receive, send, refusal)
                return
        await self.app(scope, receive, send)


Keyed = tuple[NexusError | None, ClientKey | None, ClientKey | None, bytes | None]


def _keyed(auth: Auth, scope: Scope) -> Keyed:
    """The request's key, admitted on an inference route, with its rate-limit headers; else
    why not (its headers in it), and the key when it is a known one that its limits refused."""
    try:
        key = auth.identify(scope)
    except NexusError as exc:
        return exc, None, None, b""
    if scope["path"] not in auth.inference:
        return None, key, None, auth.head(key)
    try:
        return None, key, None, auth.admit(key)
    except NexusError as exc:
        return exc, None, key, b""


Render = Callable[[NexusError, str], tuple[int, bytes]]


def _openai_error(exc: NexusError, request_id: str) -> tuple[int, bytes]:
    return exc.status_code, exc.body()  # the request id is in the X-Request-Id header


def _request_id(scope: Scope) -> bytes:
    """The client's ``X-Request-Id`` when it is sane, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _SAFE_ID.match(value):
                return bytes(value)
            break
    return os.urandom(16).hex().encode()


def _log_request(path: str, o: Outcome, content: str | None) -> None:
    """One line per inference request; status 499 means the client left before the answer.
    Message content appears only when content logging is on (``content`` is None otherwise)."""
    tokens = f"{o.prompt_tokens or 0}+{o.completion_tokens or 0}"
    extra: dict[str, object] = {} if content is None else {"content": content}
    cost = ""
    if o.cost_usd is not None:  # priced: what it cost, as X-Nexus-Cost-Estimated says it
        cost = f" cost=${o.cost_usd:.6f}"
        extra["cost_usd"] = round(o.cost_usd, 8)
    if o.key is not None:
        cost += f" key={o.key}"
        extra["key"] = o.key
    access_log.info(
        "POST %s %d %.1fms model=%s backend=%s route=%s tries=%d tokens=%s%s request_id=%s%s",
        path,
        o.status,
        o.duration_ms,
        o.model or "-",
        o.backend or "-",
        o.route_reason or "-",
        o.attempts,
        tokens,
        cost,
        o.request_id,
        "" if content is None else f" content={content!r}",
        extra={
            **extra,
            "request_id": o.request_id,
            "status": o.status,
            "duration_ms": round(o.duration_ms, 3),
            "model": o.model,
            "backend": o.backend,
            "route_reason": o.route_reason,
            "attempts": o.attempts,
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": o.completion_tokens,
            "stream": o.stream,
            "error_type": o.error_type,
        },
    )


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send, error: NexusError) -> None:
    """Close before accepting: the handshake is answered 403. (An envelope body would need the
    denial-response extension, whose use uvicorn logs as an error; no page could read it.)"""
    log.debug("refused WebSocket %s: %s", scope["path"], error.message)
    await send({"type": "websocket.close", "code": 1008})


def trace_of(scope: Scope) -> Trace:
    trace: Trace = scope.get(TRACE_KEY) or Trace()
    return trace


def _encode(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
