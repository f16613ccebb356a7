"""The OpenAI-compatible endpoints: chat completions, embeddings, models. Thin raw-ASGI handlers.

A body is parsed once and stays a plain dict; only ``model``, ``messages``, ``stream`` and
``input`` are checked. What the backend receives is the client's own bytes unless the model name
had to change.
"""

from __future__ import annotations

from typing import Any, cast

from starlette.types import Receive, Scope, Send

from ..config import MODEL_NAME_MAX
from ..errors import InvalidRequest, JSONDict
from ..gateway import Gateway
from ..routing.access import Access
from ..routing.aliases import resolve
from .auth import key_of
from .disconnect import DisconnectGuard
from .http import client_headers, dumps, parse_object, read_body, send_json
from .middleware import REQUEST_ID_KEY, trace_of
from .sse import send_stream

MAX_EMBEDDING_INPUTS = 2048
MAX_MODEL_CHARS = MODEL_NAME_MAX


def gateway_of(scope: Scope) -> Gateway:
    return cast(Gateway, scope["app"].state.gateway)


class ChatCompletions:
    """``POST /v1/chat/completions``, streaming and not."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(scope, receive)
        body = parse_object(raw)
        check_chat(body)
        gateway = gateway_of(scope)
        dispatcher = gateway.dispatcher
        headers = client_headers(scope)
        request_id: str = scope[REQUEST_ID_KEY]
        trace = trace_of(scope)
        if gateway.settings.logging.enable_content_logging:
            trace.content = content_preview(body["messages"])
        async with DisconnectGuard(receive, send) as guard:
            if body.get("stream") is True:
                result = await dispatcher.stream(body, raw, headers, request_id, trace)
                await send_stream(guard.send, result)
                return
            completion, served = await dispatcher.complete(
                "chat", body, raw, headers, request_id, trace
            )
            await send_json(guard.send, 200, completion.body, served.headers())


class Embeddings:
    """``POST /v1/embeddings``: a string or a list of inputs; the backend's usage is returned."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(scope, receive)
        body = parse_object(raw)
        check_embeddings(body)
        dispatcher = gateway_of(scope).dispatcher
        trace = trace_of(scope)
        async with DisconnectGuard(receive, send) as guard:
            completion, served = await dispatcher.complete(
                "embeddings", body, raw, client_headers(scope), scope[REQUEST_ID_KEY], trace
            )
            await send_json(guard.send, 200, completion.body, served.headers())


class Models:
    """``GET /v1/models``: every model on a healthy backend, once, best backend as owner; asked
    with a client key, only the models that key may use."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, dumps(model_list(gateway_of(scope), key_of(scope))))


def model_list(gateway: Gateway, access: Access | None = None) -> JSONDict:
    """Each model once; ``pricing`` is its owner's (the backend it goes to first) when known.
    With ``access`` (a client key), only what the key may use, judged as the router judges a
    request for that name: the model it resolves to through the aliases must match the key's
    globs, and a ``max_zone = "restricted"`` key sees restricted-zone backends only."""
    created = int(gateway.started_at)
    meter = gateway.meter
    rows: dict[str, JSONDict] = {}
    aliases = gateway.settings.routing.aliases
    backends = sorted(
        (b for b in gateway.registry if b.healthy), key=lambda b: (b.priority, b.name)
    )
    if access is not None and access.restricted:  # such a key never reaches an open zone
        backends = [b for b in backends if b.zone == "restricted"]
    for backend in backends:
        for model in backend.models.values():
            row = rows.get(model.id)
            if row is None:
                if access is not None and not access.allows(resolve(model.id, aliases)):
                    continue
                rows[model.id] = {
                    "id": model.id,
                    "object": "model",
                    "created": created,
                    "owned_by": backend.name,
                    "context_length": model.context_length,
                    "capabilities": model.capabilities(),
                    "backends": [backend.name],
                }
                price = meter.price(backend, model.id, quiet=True) if meter is not None else None
                if price is not None:
                    rows[model.id]["pricing"] = price.public()
                continue
            row["backends"].append(backend.name)
            _merge(row, model.context_length, model.capabilities())
    return {"object": "list", "data": [rows[key] for key in sorted(rows)]}


def _merge(row: JSONDict, context: int | None, capabilities: dict[str, bool]) -> None:
    if context is not None and (row["context_length"] or 0) < context:
        row["context_length"] = context
    for key, value in capabilities.items():
        row["capabilities"][key] = row["capabilities"][key] or value


CONTENT_PREVIEW_CHARS = 500


def content_preview(messages: list[Any]) -> str:
    """The last message's text, cut to ``CONTENT_PREVIEW_CHARS`` (content logging only)."""
    content = messages[-1].get("content") if messages else None
    if isinstance(content, list):
        content = " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    text = content if isinstance(content, str) else ""
    return text[:CONTENT_PREVIEW_CHARS] + ("..." if len(text) > CONTENT_PREVIEW_CHARS else "")


def check_chat(body: JSONDict) -> None:
    _check_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        what = "missing" if messages is None else f"a {_kind(messages)}"
        raise InvalidRequest(
            f"'messages' must be a list of messages; it is {what}", param="messages"
        )
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{index}] must be an object", param=f"messages[{index}]")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")


def check_embeddings(body: JSONDict) -> None:
    _check_model(body)
    value = body.get("input")
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise InvalidRequest(
            "'input' must be a string or a non-empty list of strings or token arrays", param="input"
        )
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"'input' has {len(value)} items; at most {MAX_EMBEDDING_INPUTS} are allowed",
            param="input",
        )
    if not all(isinstance(item, str | int | list) for item in value):
        raise InvalidRequest("'input' items must be strings or token arrays", param="input")


def _check_model(body: JSONDict) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        what = "missing" if model is None else f"a {_kind(model)}"
        raise InvalidRequest(f"'model' must be a non-empty string; it is {what}", param="model")
    if len(model) > MAX_MODEL_CHARS:  # the name goes to history and logs: keep it bounded
        raise InvalidRequest(
            f"'model' is {len(model)} characters long; at most {MAX_MODEL_CHARS} are allowed",
            param="model",
        )


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )
