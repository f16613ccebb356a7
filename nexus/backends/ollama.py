"""Ollama's native API, spoken as OpenAI to clients.

Models come from ``/api/tags`` with context length and capabilities from ``/api/show`` (cached per
model digest, so a health cycle costs one call once the models are known). Chat goes to
``/api/chat`` (NDJSON when streaming, translated to OpenAI chunks); embeddings to ``/api/embed``.
"""

from __future__ import annotations

import base64
import functools
import os
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from ..dialects.events import ChunkWriter, sse_event
from ..errors import InvalidRequest, JSONDict, UpstreamProtocolError
from ..registry import Backend, Model
from .base import (
    Call,
    Completion,
    HTTPAdapter,
    Probe,
    StartedStream,
    encode_request,
    gather_limited,
    parse_json,
)
from .capabilities import guess_model
from .http1 import Response
from .sse import DONE, LineSplitter, SSEStream

_FINISH = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}
_OPTION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
}
_PASS_KEYS = ("keep_alive", "think", "tools")


class OllamaAdapter(HTTPAdapter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._show_cache: dict[tuple[str, str, str], Model] = {}

    async def probe(self, backend: Backend) -> Probe:
        data = await self.get_json(backend, "/api/tags", {})
        entries = data.get("models") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise UpstreamProtocolError(
                backend.name, f"Backend '{backend.name}' sent /api/tags without 'models'"
            )
        named = [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]
        calls = [
            functools.partial(self._describe, backend, e["name"], str(e.get("digest", "")))
            for e in named
        ]
        return Probe(await gather_limited(calls, limit=4))

    async def _describe(self, backend: Backend, name: str, digest: str) -> Model:
        key = (backend.url, name, digest)
        cached = self._show_cache.get(key)
        if cached is not None:
            return cached
        try:
            show = await self.post_probe(backend, "/api/show", {"model": name}, {})
        except Exception:  # a model Ollama cannot describe is still listed, with guessed traits
            return guess_model(name, "ollama")
        model = model_from_show(name, show if isinstance(show, dict) else {})
        self._show_cache[key] = model
        return model

    async def chat(self, backend: Backend, call: Call) -> Completion:
        payload = encode_request(chat_request(call.body, call.model, stream=False))
        body = await self.post_json(backend, "/api/chat", payload, _JSON)
        data = parse_json(backend, body)
        if not isinstance(data, dict) or "error" in data:
            raise UpstreamProtocolError(backend.name, f"Ollama error: {_error_text(backend, data)}")
        completion = chat_response(data, call.model)
        return Completion(orjson.dumps(completion), completion["usage"])

    async def open_stream(self, backend: Backend, call: Call) -> StartedStream:
        payload = encode_request(chat_request(call.body, call.model, stream=True))
        usage = call.include_usage
        idle = self.timeouts.stream_idle
        return await self.open_events(
            backend,
            "/api/chat",
            payload,
            _JSON,
            lambda resp: OllamaStream(backend, resp, idle, call.model, usage),
        )

    async def embeddings(self, backend: Backend, call: Call) -> Completion:
        request: JSONDict = {"model": call.model, "input": call.body.get("input")}
        if "dimensions" in call.body:
            request["dimensions"] = call.body["dimensions"]
        body = await self.post_json(backend, "/api/embed", encode_request(request), _JSON)
        data = parse_json(backend, body)
        vectors = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(vectors, list):
            raise UpstreamProtocolError(backend.name, "Ollama /api/embed sent no 'embeddings'")
        as_base64 = call.body.get("encoding_format") == "base64"
        tokens = int(data.get("prompt_eval_count") or 0)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        result = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, as_base64)}
                for i, v in enumerate(vectors)
            ],
            "model": call.model,
            "usage": usage,
        }
        return Completion(orjson.dumps(result), usage)


_JSON = {"Content-Type": "application/json"}


def model_from_show(name: str, show: JSONDict) -> Model:
    caps = show.get("capabilities")
    guess = guess_model(name, "ollama")
    context = None
    info = show.get("model_info")
    if isinstance(info, dict):
        for key, value in info.items():
            if key.endswith(".context_length") and isinstance(value, int):
                context = value
                break
    if not isinstance(caps, list):
        return Model(
            id=name,
            context_length=context or guess.context_length,
            vision=guess.vision,
            tools=guess.tools,
            json_mode=not guess.embeddings,  # every Ollama chat model honours `format`
            embeddings=guess.embeddings,
        )
    return Model(
        id=name,
        context_length=context or guess.context_length,
        vision="vision" in caps,
        tools="tools" in caps,
        json_mode="completion" in caps,
        embeddings="embedding" in caps,
        reported=True,
    )


# --- translation ---------------------------------------------------------------------------


def chat_request(body: JSONDict, model: str, *, stream: bool) -> JSONDict:
    """An OpenAI chat request as an Ollama /api/chat request."""
    request: JSONDict = {"model": model, "messages": _messages(body["messages"]), "stream": stream}
    options: JSONDict = {}
    for key, option in _OPTION_KEYS.items():
        if body.get(key) is not None:
            options[option] = body[key]
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    if isinstance(body.get("options"), dict):
        options.update(body["options"])
    if options:
        request["options"] = options
    for key in _PASS_KEYS:
        if key in body:
            request[key] = body[key]
    fmt = _format(body.get("response_format"))
    if fmt is not None:
        request["format"] = fmt
    return request


def _format(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else "json"
    return None


def _messages(messages: list[Any]) -> list[JSONDict]:
    names: dict[str, str] = {}
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidRequest("each message must be an object", param="messages")
        item: JSONDict = {"role": message.get("role", "user")}
        text, images = _content(message.get("content"))
        item["content"] = text
        if images:
            item["images"] = images
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            item["tool_calls"] = [_tool_call_out(call, names) for call in calls]
        if message.get("role") == "tool" and message.get("tool_call_id") in names:
            item["tool_name"] = names[message["tool_call_id"]]
        out.append(item)
    return out


def _content(content: Any) -> tuple[str, list[str]]:
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise InvalidRequest(
            "message content must be a string or a list of parts", param="messages"
        )
    texts, images = [], []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            images.append(_image(part.get("image_url")))
    return "\n".join(texts), images


def _image(image_url: Any) -> str:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if isinstance(url, str) and url.startswith("data:") and "," in url:
        return url.split(",", 1)[1]
    raise InvalidRequest(
        "Ollama backends take images as data: URLs (base64), not remote links", param="messages"
    )


def _tool_call_out(call: Any, names: dict[str, str]) -> JSONDict:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments) if arguments else {}
        except orjson.JSONDecodeError:
            arguments = {"_raw": arguments}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        names[call["id"]] = str(function.get("name", ""))
    return {"function": {"name": function.get("name"), "arguments": arguments or {}}}


def _tool_calls_in(message: JSONDict, *, first_index: int | None) -> list[JSONDict]:
    """OpenAI tool calls; in a stream (``first_index`` given) each carries its index in the
    whole answer, which clients use to tell calls apart."""
    calls = []
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments", {})
        item: JSONDict = {
            "id": f"call_{os.urandom(6).hex()}",
            "type": "function",
            "function": {
                "name": function.get("name"),
                "arguments": arguments
                if isinstance(arguments, str)
                else orjson.dumps(arguments).decode(),
            },
        }
        if first_index is not None:
            item = {"index": first_index + i, **item}
        calls.append(item)
    return calls


def _finish(data: JSONDict, has_tools: bool) -> str:
    if has_tools:
        return "tool_calls"
    return _FINISH.get(str(data.get("done_reason") or "stop"), "stop")


def _usage(data: JSONDict) -> JSONDict:
    prompt = int(data.get("prompt_eval_count") or 0)
    completion = int(data.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_response(data: JSONDict, model: str) -> JSONDict:
    message = data.get("message") if isinstance(data.get("message"), dict) else {}
    assert isinstance(message, dict)
    calls = _tool_calls_in(message, first_index=None)
    out_message: JSONDict = {
        "role": "assistant",
        "content": message.get("content", "") if not calls or message.get("content") else None,
        "refusal": None,
    }
    if calls:
        out_message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{os.urandom(12).hex()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": out_message,
                "logprobs": None,
                "finish_reason": _finish(data, bool(calls)),
            }
        ],
        "usage": _usage(data),
    }


class OllamaStream(SSEStream):
    """Ollama's NDJSON stream as OpenAI ``chat.completion.chunk`` events, ending in ``[DONE]``."""

    def __init__(
        self,
        backend: Backend,
        resp: Response,
        idle_timeout: float,
        model: str,
        include_usage: bool,
    ) -> None:
        super().__init__(backend, resp, idle_timeout)
        self._include_usage = include_usage
        self._chunks = ChunkWriter(f"chatcmpl-{os.urandom(12).hex()}", int(time.time()), model)
        self._first = True
        self._done = False
        self._tool_calls = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        lines = LineSplitter()
        try:
            while (batch := await self._next(lines)) is not None:
                for line in batch:
                    events = self._translate(line)
                    self._finished = self._done  # before the yields: the reader stops at [DONE]
                    for event in events:
                        yield event
                    if self._done:
                        return
            self._finished = True
            tail = lines.tail()
            if tail is not None:
                for event in self._translate(tail):
                    yield event
            if not self._done:
                name = self._backend.name
                raise UpstreamProtocolError(name, f"Backend '{name}' ended the stream early")
        finally:
            await self.aclose()

    def _translate(self, line: bytes) -> list[bytes]:
        data = parse_json(self._backend, line)
        if not isinstance(data, dict) or "error" in data:
            error = _error_text(self._backend, data)
            raise UpstreamProtocolError(self._backend.name, f"Ollama error: {error}")
        message = data.get("message") if isinstance(data.get("message"), dict) else {}
        assert isinstance(message, dict)
        delta: JSONDict = {"role": "assistant"} if self._first else {}
        if message.get("content") or self._first:
            delta["content"] = message.get("content", "")
        self._first = False
        calls = _tool_calls_in(message, first_index=self._tool_calls)
        if calls:
            delta["tool_calls"] = calls
            self._tool_calls += len(calls)  # Ollama sends each call in a line of its own
        events = []
        if delta:
            events.append(self._event([_choice(delta, None)]))
        if data.get("done"):
            self._done = True
            events.append(self._event([_choice({}, _finish(data, self._tool_calls > 0))]))
            usage = _usage(data)
            self.keep_usage(usage)
            if self._include_usage:
                events.append(self._event([], usage=usage))
            events.append(DONE)
        return events

    def _event(self, choices: list[JSONDict], usage: JSONDict | None = None) -> bytes:
        chunk = self._chunks.envelope(choices)
        if usage is not None:
            chunk["usage"] = usage
        return sse_event(chunk)


def _choice(delta: JSONDict, finish: str | None) -> JSONDict:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _error_text(backend: Backend, data: Any) -> str:
    if isinstance(data, dict) and "error" in data:
        return backend.redact(str(data["error"]))
    return "unexpected answer"


def _encode(vector: list[float], as_base64: bool) -> list[float] | str:
    if not as_base64:
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
