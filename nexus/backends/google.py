"""Google Gemini (``generativelanguage.googleapis.com``), spoken as OpenAI to clients.

The key goes in the ``x-goog-api-key`` header, never in the URL (URLs end up in proxy and access
logs), and the client's own Authorization is never forwarded to Google. Models come from
``GET /v1beta/models`` (paged); no probe ever calls a generation endpoint. Translation lives in
``dialects/gemini.py``; this module does the I/O and maps Google's error envelope to OpenAI's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from ..dialects.gemini import (
    StreamTranslator,
    Untranslatable,
    completion_from_response,
    embed_request,
    embeddings_from_response,
    generate_request,
)
from ..errors import InvalidRequest, JSONDict, UpstreamProtocolError, UpstreamStatusError
from ..registry import Backend, Model
from .base import Call, Completion, HTTPAdapter, Probe, StartedStream, encode_request, parse_json
from .http1 import Response
from .sse import SSEStream, is_done, writes

MAX_PAGES = 20  # a model list longer than 20 pages of 1000 is not a model list
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class GoogleAdapter(HTTPAdapter):
    def headers(self, backend: Backend) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if backend.api_key:
            headers["x-goog-api-key"] = backend.api_key
        return headers

    def status_error(self, backend: Backend, resp: Response, body: bytes) -> UpstreamStatusError:
        return openai_status_error(backend, super().status_error(backend, resp, body))

    async def probe(self, backend: Backend) -> Probe:
        models: list[Model] = []
        token: str | None = None
        headers = self.headers(backend)
        for _ in range(MAX_PAGES):
            path = "/v1beta/models?pageSize=1000"
            if token:
                path += "&pageToken=" + quote(token, safe="")
            data = await self.get_json(backend, path, headers)
            entries = data.get("models") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise UpstreamProtocolError(
                    backend.name, f"Backend '{backend.name}' sent a model list without 'models'"
                )
            models.extend(m for m in map(model_from_entry, entries) if m is not None)
            token = data.get("nextPageToken")
            if not isinstance(token, str) or not token:
                break
        return Probe(models)

    async def chat(self, backend: Backend, call: Call) -> Completion:
        _check_kind(backend, call, embeddings=False)
        payload = _generate_payload(call.with_reasoning_effort().body)  # a thinking budget
        body = await self.post_json(
            backend, _model_path(call.model, "generateContent"), payload, self.headers(backend)
        )
        data = parse_json(backend, body)
        if not isinstance(data, dict):
            raise UpstreamProtocolError(backend.name, f"Backend '{backend.name}' sent a non-object")
        completion = completion_from_response(data, call.requested_model)
        return Completion(orjson.dumps(completion), completion.get("usage"))

    async def open_stream(self, backend: Backend, call: Call) -> StartedStream:
        _check_kind(backend, call, embeddings=False)
        payload = _generate_payload(call.with_reasoning_effort().body)  # a thinking budget
        usage, model = call.include_usage, call.requested_model
        idle = self.timeouts.stream_idle
        return await self.open_events(
            backend,
            _model_path(call.model, "streamGenerateContent") + "?alt=sse",
            payload,
            self.headers(backend),
            lambda resp: GeminiStream(backend, resp, idle, model, usage),
        )

    async def embeddings(self, backend: Backend, call: Call) -> Completion:
        _check_kind(backend, call, embeddings=True)
        inputs = call.body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise InvalidRequest(
                "Gemini embeddings take 'input' as a string or a list of strings", param="input"
            )
        payload = encode_request(embed_request(inputs, call.model))
        body = await self.post_json(
            backend, _model_path(call.model, "batchEmbedContents"), payload, self.headers(backend)
        )
        data = parse_json(backend, body)
        if not isinstance(data, dict) or not isinstance(data.get("embeddings"), list):
            raise UpstreamProtocolError(
                backend.name, f"Backend '{backend.name}' sent an answer without 'embeddings'"
            )
        result = embeddings_from_response(data, call.requested_model)
        return Completion(orjson.dumps(result), result["usage"])


def _generate_payload(body: JSONDict) -> bytes:
    # The planner's capability stage already left this backend out for a body Gemini cannot
    # honour (dialects.gemini.untranslatable); what is left to fail here is refused, not cut.
    try:
        return encode_request(generate_request(body))
    except Untranslatable as exc:
        raise InvalidRequest(f"This request cannot be sent to a Gemini backend: {exc}") from None


def _check_kind(backend: Backend, call: Call, *, embeddings: bool) -> None:
    """Chat goes only to models Google lists with generateContent, embeddings only to those it
    lists with embedContent: the other way round is the client's mistake, said before calling."""
    model = backend.models.get(call.model)
    name = call.requested_model
    if model is None:
        return
    if embeddings and not model.embeddings:
        why = f"Model '{name}' is a Gemini chat model: use /v1/chat/completions"
    elif not embeddings and not model.tools:  # every model listed with generateContent has tools
        why = f"Model '{name}' is a Gemini embedding model: use /v1/embeddings"
    else:
        return
    raise InvalidRequest(why, param="model")


def _model_path(model: str, method: str) -> str:
    return f"/v1beta/models/{quote(model.removeprefix('models/'), safe='')}:{method}"


def model_from_entry(entry: Any) -> Model | None:
    """A served model for a ``models.list`` entry; None for one that neither chats nor embeds."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return None
    methods = entry.get("supportedGenerationMethods")
    methods = methods if isinstance(methods, list) else []
    limit = entry.get("inputTokenLimit")
    context = limit if isinstance(limit, int) and limit > 0 else None
    model_id = entry["name"].removeprefix("models/")
    embeds = "embedContent" in methods or "batchEmbedContents" in methods
    output = entry.get("outputTokenLimit")  # the most one answer may be: a call's worst case
    if "generateContent" in methods:
        # Gemini chat models take images, tools and JSON schemas alike.
        return Model(
            model_id,
            context,
            vision=True,
            tools=True,
            json_mode=True,
            embeddings=embeds,
            reported=True,
            max_output_tokens=output if type(output) is int and output > 0 else None,
        )
    if embeds:
        return Model(model_id, context, embeddings=True, reported=True)
    return None


def openai_status_error(backend: Backend, exc: UpstreamStatusError) -> UpstreamStatusError:
    try:
        data = orjson.loads(exc.raw)
    except orjson.JSONDecodeError:
        return exc
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or "type" in error:
        return exc
    status = error.get("status")
    envelope = {
        "error": {
            "message": str(error.get("message") or f"Google answered {exc.upstream_status}"),
            "type": _ERROR_TYPES.get(exc.upstream_status, "invalid_request_error"),
            "param": None,
            "code": status.lower() if isinstance(status, str) else None,
        }
    }
    return UpstreamStatusError(
        backend.name, exc.upstream_status, orjson.dumps(envelope), exc.retry_after
    )


class GeminiStream(SSEStream):
    """Gemini's SSE (whole ``GenerateContentResponse`` objects, no ``[DONE]``) as OpenAI
    ``chat.completion.chunk`` events, always ending in ``[DONE]``."""

    def __init__(
        self,
        backend: Backend,
        resp: Response,
        idle_timeout: float,
        model: str,
        include_usage: bool,
    ) -> None:
        super().__init__(backend, resp, idle_timeout)
        self._translator = StreamTranslator(model, include_usage=include_usage)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        translator = self._translator
        try:
            while (events := await self._next(translator)) is not None:
                for item in writes(events):
                    yield item
                    if is_done(item):  # an error event from Gemini: its answer is over
                        return
            self._finished = True  # the body was read to its end: the connection is reusable
            if not self._started:  # an empty 200: this backend failed, the next may serve
                name = self._backend.name
                raise UpstreamProtocolError(name, f"Backend '{name}' sent an empty stream")
            rest = translator.close()
            if translator.usage is not None:
                self.keep_usage(translator.usage)
            for item in writes(rest):
                yield item
        finally:
            await self.aclose()
