"""The Anthropic Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) in front of
every backend, for clients such as Claude Code.

A request is translated to the internal chat form (``dialects/anthropic_inbound``) and goes
through the same planner, dispatcher, failover and telemetry as ``/v1/chat/completions``; the
answer comes back in Anthropic's shape, streams event for event, errors in Anthropic's envelope.
An Anthropic backend is sent the client's own request and its answer is passed back as it came:
never translated twice (``thinking``, ``cache_control`` and the rest reach it untouched).
The client's key may come as ``x-api-key`` or ``Authorization: Bearer``; any
``anthropic-version`` and ``anthropic-beta`` are accepted.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from starlette.types import Receive, Scope, Send

from ..dialects import anthropic_inbound as inbound
from ..dispatch import Inbound
from ..errors import JSONDict, NexusError
from .disconnect import DisconnectGuard
from .http import client_headers, parse_object, read_body, send_json
from .middleware import REQUEST_ID_KEY, trace_of
from .openai import gateway_of
from .sse import send_stream, translated, with_pings

PING = b'event: ping\ndata: {"type": "ping"}\n\n'
PING_INTERVAL = 10.0  # seconds of silence after which a ping keeps the connection alive


MAX_REASONS = 5  # backends whose exclusion an error message spells out
MAX_DROPPED_HEADER = 1024  # characters of X-Nexus-Dropped-Tools; a longer list ends in "..."


def dropped_header(names: list[str]) -> list[tuple[bytes, bytes]]:
    """``X-Nexus-Dropped-Tools``: the hosted tools the serving backend cannot run."""
    if not names:
        return []
    value = ", ".join(names).encode("ascii", "replace")
    if len(value) > MAX_DROPPED_HEADER:
        value = value[: MAX_DROPPED_HEADER - 3].rsplit(b", ", 1)[0] + b", ..."
    return [(b"x-nexus-dropped-tools", value)]


def anthropic_extras(headers: dict[str, str], native: JSONDict, effort: str | None) -> Inbound:
    """What an Anthropic backend is sent besides the client's own request: its beta features
    and API version (plain printable values only; anything else is not passed on)."""

    def passable(name: str) -> str | None:
        value = headers.get(name)
        ok = value is not None and value.isascii() and value.isprintable() and len(value) <= 1024
        return value if ok else None

    return Inbound(
        native=native,
        reasoning_effort=effort,
        anthropic_beta=passable("anthropic-beta"),
        anthropic_version=passable("anthropic-version"),
    )


def take_effort(body: JSONDict) -> str | None:
    """The reasoning effort the client asked for, out of the chat form: only backends that take
    it are sent it (Gemini, OpenAI), so that the others are not refused for it."""
    effort = body.pop("reasoning_effort", None)
    return effort if isinstance(effort, str) else None


def keyed_headers(scope: Scope) -> dict[str, str]:
    """The client's headers, its ``x-api-key`` read as a bearer token when it sent no
    ``Authorization`` (for keyless backends the user added, as on the chat route)."""
    headers = client_headers(scope)
    key = headers.get("x-api-key")
    if key and "authorization" not in headers:
        headers["authorization"] = f"Bearer {key}"
    return headers


def render_error(exc: NexusError, request_id: str | None = None) -> tuple[int, bytes]:
    """An error in Anthropic's envelope, with its status (529 for overloaded). Why each backend
    was left out goes into the message itself: Anthropic's clients show only the message."""
    return inbound.error_body(exc.status_code, explained(exc), request_id=request_id)


def explained(exc: NexusError) -> str:
    context = getattr(exc, "context", None)
    excluded = context.get("excluded") if isinstance(context, dict) else None
    if not excluded:
        return exc.message
    reasons = [
        f"{e['backend']}: {e['reason']} ({e['suggested_action']})"
        for e in excluded[:MAX_REASONS]
        if isinstance(e, dict) and {"backend", "reason", "suggested_action"} <= e.keys()
    ]
    more = f"; and {len(excluded) - MAX_REASONS} more" if len(excluded) > MAX_REASONS else ""
    head = exc.message.removesuffix(" (see context)").rstrip(".")
    return f"{head}. {'; '.join(reasons)}{more}"


def stream_error(request_id: str) -> Callable[[NexusError], bytes]:
    """The last event of a stream Nexus itself has to cut, in Anthropic's form."""

    def event(exc: NexusError) -> bytes:
        _, body = render_error(exc, request_id)
        return b"event: error\ndata: " + body + b"\n\n"

    return event


class Messages:
    """``POST /v1/messages``, streaming and not."""

    render_error = staticmethod(render_error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        trace = trace_of(scope)
        trace.api = "messages"
        original = parse_object(await read_body(scope, receive))
        request = inbound.chat_request(original)
        body = request.body
        headers = keyed_headers(scope)
        extras = anthropic_extras(headers, original, take_effort(body))
        model = body["model"]
        dispatcher = gateway_of(scope).dispatcher
        request_id: str = scope[REQUEST_ID_KEY]
        dropped = dropped_header(request.dropped_tools)
        chat_raw = orjson.dumps(body)
        async with DisconnectGuard(receive, send) as guard:
            if body.get("stream") is True:
                result = await dispatcher.stream(body, chat_raw, headers, request_id, trace, extras)
                if result.native:  # an Anthropic backend's own events, as they came
                    events = with_pings(result.events, PING, PING_INTERVAL)
                else:
                    estimate = inbound.estimate_input_tokens(original)
                    stream = inbound.MessagesStream(model, estimate)
                    events = with_pings(translated(result.events, stream), PING, PING_INTERVAL)
                await send_stream(
                    guard.send,
                    result,
                    events,
                    extra_headers=[] if result.native else dropped,
                    failure=stream_error(request_id),
                )
                return
            completion, served = await dispatcher.complete(
                "chat", body, chat_raw, headers, request_id, trace, extras
            )
            answer = completion.body
            if completion.native:  # Anthropic ran the request as it came: nothing was dropped
                dropped = []
            else:
                answer = orjson.dumps(inbound.message_response(orjson.loads(answer), model))
            await send_json(guard.send, 200, answer, [*served.headers(), *dropped])


class CountTokens:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``, an estimate for backends
    that cannot count (Anthropic's own count when the model's best backend is Anthropic)."""

    render_error = staticmethod(render_error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        trace = trace_of(scope)
        trace.api = "messages"
        trace.kind = "count_tokens"
        body = parse_object(await read_body(scope, receive))
        extras = anthropic_extras(keyed_headers(scope), body, None)
        dispatcher = gateway_of(scope).dispatcher
        count = await dispatcher.count_tokens(body, extras, trace.client_key)
        await send_json(send, 200, orjson.dumps({"input_tokens": count}))
