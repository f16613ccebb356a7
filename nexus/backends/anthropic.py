"""Anthropic's Messages API, spoken as OpenAI to clients.

Models and health come from ``GET /v1/models`` (free: never a billed call). Chat goes to
``POST /v1/messages``, translated both ways by ``dialects.anthropic``. The key goes as
``x-api-key``: no client ``Authorization`` header ever reaches Anthropic. Error answers in
Anthropic's envelope go on as OpenAI envelopes with the provider's status and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from ..dialects import anthropic as dialect
from ..errors import UpstreamProtocolError, UpstreamStatusError, UpstreamUnavailable
from ..registry import Backend, Model
from .base import (
    Call,
    Completion,
    HTTPAdapter,
    Inbound,
    Probe,
    StartedStream,
    encode_request,
    parse_json,
)
from .http1 import Response
from .sse import DONE, SSEStream

VERSION = "2023-06-01"
# Sent when the client sets no max_tokens (Anthropic requires one): the model's own largest
# max_tokens from the model list, as OpenAI's "no limit" means, but no more than the context
# leaves (Anthropic refuses a prompt plus max_tokens past the window); 4096 (every Claude model
# takes it, the oldest no more) when the list does not say.
DEFAULT_MAX_TOKENS = 4096
# The prompt estimate counts text only: tools, images and the estimate's own error get this
# much room, and the estimate a quarter more.
UNCOUNTED_PROMPT = 2048
FLOOR_MAX_TOKENS = 1024
# Current Claude models: a 200k window, images and tools (used when the list says nothing).
DEFAULT_CONTEXT = 200_000
_MAX_PAGES = 10  # a model list longer than 10 x 1000 entries is not a real one


class AnthropicAdapter(HTTPAdapter):
    def headers(self, backend: Backend, request_id: str | None = None) -> dict[str, str]:
        headers = {"anthropic-version": VERSION, "Content-Type": "application/json"}
        if backend.api_key:
            headers["x-api-key"] = backend.api_key
        if request_id:
            headers["X-Request-Id"] = request_id
        return headers

    async def probe(self, backend: Backend) -> Probe:
        models: list[Model] = []
        path = "/v1/models?limit=1000"
        for _ in range(_MAX_PAGES):
            data = await self.get_json(backend, path, self.headers(backend))
            entries = data.get("data") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise UpstreamProtocolError(
                    backend.name, f"Backend '{backend.name}' sent a model list without 'data'"
                )
            models.extend(_model(e) for e in entries if isinstance(e, dict) and _id(e))
            last = data.get("last_id")
            if not data.get("has_more") or not isinstance(last, str):
                break
            path = f"/v1/models?limit=1000&after_id={last}"
        return Probe(models)

    async def chat(self, backend: Backend, call: Call) -> Completion:
        if call.native is not None:
            return await self._native_chat(backend, call)
        payload = self._payload(backend, call, stream=False)
        body = await self.post_json(
            backend, "/v1/messages", payload, self._call_headers(backend, call)
        )
        message = parse_json(backend, body)
        if not isinstance(message, dict):
            raise UpstreamProtocolError(backend.name, f"Backend '{backend.name}' sent a non-object")
        completion = dialect.completion_from_message(message, call.requested_model)
        return Completion(orjson.dumps(completion), completion["usage"])

    async def open_stream(self, backend: Backend, call: Call) -> StartedStream:
        if call.native is not None:
            started = await self.open_events(
                backend,
                "/v1/messages",
                native_payload(call, stream=True),
                self._call_headers(backend, call),
                lambda resp: NativeStream(backend, resp, self.timeouts.stream_idle),
            )
            started.native = True
            return started
        payload = self._payload(backend, call, stream=True)
        usage, model = call.include_usage, call.requested_model
        idle = self.timeouts.stream_idle
        return await self.open_events(
            backend,
            "/v1/messages",
            payload,
            self._call_headers(backend, call),
            lambda resp: AnthropicStream(backend, resp, idle, model, usage),
        )

    async def _native_chat(self, backend: Backend, call: Call) -> Completion:
        """A Messages request sent as the client wrote it; the answer comes back as it is (its
        ``model`` the one the client asked for)."""
        body = await self.post_json(
            backend,
            "/v1/messages",
            native_payload(call, stream=False),
            self._call_headers(backend, call),
        )
        message = parse_json(backend, body)
        if not isinstance(message, dict):
            raise UpstreamProtocolError(backend.name, f"Backend '{backend.name}' sent a non-object")
        usage = message.get("usage")
        counted = dialect.usage(usage) if isinstance(usage, dict) else None
        requested = call.native.get("model") if call.native is not None else None
        if isinstance(requested, str) and message.get("model") != requested:
            message["model"] = requested
            body = orjson.dumps(message)
        return Completion(body, counted, native=True)

    async def count_tokens(
        self, backend: Backend, model: str, body: dict[str, Any], inbound: Inbound
    ) -> int:
        """Anthropic's own count of the client's count_tokens request, sent as it came (free,
        not a generation)."""
        headers = client_headers(self.headers(backend), inbound)
        request = encode_request({**body, "model": model})
        answer = await self.post_json(backend, "/v1/messages/count_tokens", request, headers)
        data = parse_json(backend, answer)
        count = data.get("input_tokens") if isinstance(data, dict) else None
        if type(count) is not int or count < 0:
            raise UpstreamProtocolError(backend.name, "Anthropic sent no input_tokens count")
        return count

    async def embeddings(self, backend: Backend, call: Call) -> Completion:
        message = f"Backend '{backend.name}' (Anthropic) serves no embeddings"
        envelope = dialect.error_event("not_found_error", message)
        raise UpstreamStatusError(backend.name, 404, orjson.dumps(envelope))

    def _payload(self, backend: Backend, call: Call, *, stream: bool) -> bytes:
        request = dialect.messages_request(call.body, call.model, default_max_tokens(backend, call))
        if stream:
            request["stream"] = True
        else:
            request.pop("stream", None)
        return encode_request(request)

    def status_error(self, backend: Backend, resp: Response, body: bytes) -> UpstreamStatusError:
        return openai_error(backend, super().status_error(backend, resp, body))

    def _call_headers(self, backend: Backend, call: Call) -> dict[str, str]:
        # Built from the backend's own key: call.headers may carry the client's Authorization.
        headers = self.headers(backend, call.headers.get("X-Request-Id"))
        if call.native is not None and call.inbound is not None:
            client_headers(headers, call.inbound)
        return headers


def client_headers(headers: dict[str, str], inbound: Inbound) -> dict[str, str]:
    """The client's ``anthropic-beta`` and ``anthropic-version``, with its native request."""
    if inbound.anthropic_beta:
        headers["anthropic-beta"] = inbound.anthropic_beta
    if inbound.anthropic_version:
        headers["anthropic-version"] = inbound.anthropic_version
    return headers


def native_payload(call: Call, *, stream: bool) -> bytes:
    """The client's Messages request for this backend: its own model name, the stream flag."""
    assert call.native is not None
    request = {**call.native, "model": call.model}
    if stream:
        request["stream"] = True
    else:
        request.pop("stream", None)
    return encode_request(request)


class NativeStream(SSEStream):
    """Anthropic's own events, passed on as they come; the usage they carry (``message_start``
    and ``message_delta``) is kept, in OpenAI's form, for the cost."""

    _native_usage: dict[str, Any] | None = None

    def passing(self, events: list[bytes]) -> list[bytes]:
        for event in events:
            if b'"usage"' in event:
                self._read_usage(event)
        return events

    def _read_usage(self, event: bytes) -> None:
        try:
            data = orjson.loads(event[event.index(b"data:") + 5 :])
        except (ValueError, orjson.JSONDecodeError):
            return
        if not isinstance(data, dict):
            return
        usage = data.get("usage")
        message = data.get("message")
        if usage is None and isinstance(message, dict):
            usage = message.get("usage")
        if not isinstance(usage, dict):
            return
        merged = {**(self._native_usage or {}), **{k: v for k, v in usage.items() if v is not None}}
        self._native_usage = merged
        self.keep_usage(dialect.usage(merged))


def _id(entry: dict[str, object]) -> bool:
    return isinstance(entry.get("id"), str)


def default_max_tokens(backend: Backend, call: Call) -> int:
    """``max_tokens`` for a client that set none: the model's largest answer that fits."""
    model = backend.models.get(call.model)
    if model is None or not model.max_output_tokens:
        return DEFAULT_MAX_TOKENS
    context = model.context_length or DEFAULT_CONTEXT
    room = context - call.prompt_tokens * 5 // 4 - UNCOUNTED_PROMPT
    return min(model.max_output_tokens, max(room, FLOOR_MAX_TOKENS))


def _model(entry: dict[str, object]) -> Model:
    model_id = str(entry["id"])
    reported = entry.get("max_input_tokens")
    context = reported if isinstance(reported, int) and reported > 0 else DEFAULT_CONTEXT
    caps = entry.get("capabilities")
    image = caps.get("image_input") if isinstance(caps, dict) else None
    vision = image.get("supported") is not False if isinstance(image, dict) else True
    most = entry.get("max_tokens")
    return Model(
        id=model_id,
        context_length=context,
        vision=vision,
        tools=True,
        json_mode=False,  # no JSON mode in Messages: untranslatable() names it
        embeddings=False,
        reported=True,  # known for the API, not guessed from the name
        max_output_tokens=most if type(most) is int and most > 0 else None,
    )


def openai_error(backend: Backend, exc: UpstreamStatusError) -> UpstreamStatusError:
    """The same failure with Anthropic's ``{"type":"error","error":{...}}`` made an OpenAI
    envelope (status and Retry-After kept; the body was already scrubbed of secrets)."""
    try:
        data = orjson.loads(exc.raw)
    except orjson.JSONDecodeError:
        return exc
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return exc
    envelope = dialect.error_event(str(error.get("type", "")), backend.redact(error["message"]))
    return UpstreamStatusError(
        backend.name, exc.upstream_status, orjson.dumps(envelope), exc.retry_after
    )


class AnthropicStream(SSEStream):
    """Anthropic's SSE as OpenAI ``chat.completion.chunk`` events, ending in ``[DONE]``."""

    def __init__(
        self, backend: Backend, resp: Response, idle: float, model: str, include_usage: bool
    ) -> None:
        super().__init__(backend, resp, idle)
        self._translator = dialect.StreamTranslator(model, include_usage=include_usage)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        translator = self._translator
        sent = False
        try:
            while (events := await self._next(translator)) is not None:
                if translator.error is not None and not sent:
                    self._fail(translator.error)
                sent = True
                for event in events:  # one by one: dispatch reads usage from a chunk alone
                    if event == DONE:
                        self._finished = translator.error is None  # before the yield
                        self._keep_usage()
                        yield event
                        return
                    yield event
            self._finished = True
            rest = translator.close()
            if translator.error is not None and not sent:
                self._fail(translator.error)
            self._keep_usage()
            for event in rest:
                yield event
        finally:
            await self.aclose()

    def _keep_usage(self) -> None:
        """The usage the translator knows, for dispatch (sent to the client only if it asked)."""
        usage = self._translator.usage
        if usage is not None:
            self.keep_usage(usage)

    def _fail(self, envelope: dict[str, object]) -> None:
        """An error before any chunk: a failure of this backend (the next one may serve)."""
        error = envelope.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        name = self._backend.name
        text = self._backend.redact(str(message or "no message"))
        raise UpstreamUnavailable(name, f"Backend '{name}' failed the stream: {text}")
