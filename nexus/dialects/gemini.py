"""OpenAI chat <-> Google Gemini (``generateContent``, ``streamGenerateContent?alt=sse``,
``batchEmbedContents``). Pure: no I/O, so the outbound adapter and tests share one mapping.

Callers ask ``untranslatable(body)`` first: a request whose answer Gemini cannot give faithfully
(``n > 1``, logprobs, remote images...) goes to another backend instead of losing a field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from nexus.dialects.gemini_schema import Untranslatable, gemini_schema
from nexus.errors import InvalidRequest

from .counts import count
from .events import DONE, MAX_EVENT_BYTES, ChunkWriter, EventSplitter, EventTooLarge, sse_event

JSONDict = dict[str, Any]

__all__ = [
    "StreamTranslator",
    "Untranslatable",
    "completion_from_response",
    "embed_request",
    "embeddings_from_response",
    "gemini_schema",
    "generate_request",
    "untranslatable",
]


# --- OpenAI request -> Gemini request -------------------------------------------------------

_FILTER_REASONS = frozenset(
    {
        "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
    }
)  # fmt: skip
_NO_EQUIVALENT = ("logit_bias", "audio", "prediction", "web_search_options", "functions")
# reasoning_effort as a thinking budget (Google's own OpenAI-compatible mapping; budgets are
# accepted by both the 2.5 and the 3 generations, thinking levels only by the latter).
_EFFORT = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}


def untranslatable(body: JSONDict) -> str | None:
    """Why ``body`` has no faithful Gemini form, or None when it has one."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return "n > 1 (several choices) is not supported by the Gemini translation"
    if body.get("logprobs") or body.get("top_logprobs"):
        return "logprobs are not supported by the Gemini translation"
    for key in _NO_EQUIVALENT:
        if body.get(key) is not None:
            return f"{key!r} has no Gemini equivalent"
    if body.get("parallel_tool_calls") is False:
        return "parallel_tool_calls=false has no Gemini equivalent"
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in _EFFORT:
        return f"reasoning_effort {effort!r} has no Gemini equivalent"
    try:
        generate_request(body)
    except Untranslatable as exc:
        return str(exc)
    except InvalidRequest:
        return None  # the client's mistake, reported as a 400 when the request is built
    return None


def generate_request(body: JSONDict) -> JSONDict:
    """The ``generateContent`` body for an OpenAI chat body.

    Raises ``InvalidRequest`` for malformed input (tool arguments that are not JSON, unknown
    tool_call ids) and ``Untranslatable`` for input Gemini cannot receive (remote image URLs,
    unresolvable ``$ref``). Fields reported by ``untranslatable`` are left out.
    """
    system: list[JSONDict] = []
    contents: list[JSONDict] = []
    call_names: dict[str, str] = {}
    for message in body.get("messages") or []:
        role = _object(message, "messages").get("role")
        if role in ("system", "developer"):
            system.extend(_content_parts(message.get("content")))
            continue
        if role == "assistant":
            parts = _content_parts(message.get("content"))
            for call in message.get("tool_calls") or []:
                parts.append(_function_call_part(_object(call, "messages"), call_names))
            _append(contents, "model", parts)
        elif role == "tool":
            _append(contents, "user", [_function_response_part(message, call_names)])
        elif role == "user":
            _append(contents, "user", _content_parts(message.get("content")))
        else:
            raise Untranslatable(f"message role {role!r} has no Gemini equivalent")
    request: JSONDict = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    tools = body.get("tools")
    if tools:
        declarations = [_declaration(_object(t, "tools")) for t in tools]
        request["tools"] = [{"functionDeclarations": declarations}]
    tool_config = _tool_config(body.get("tool_choice"))
    if tool_config:
        request["toolConfig"] = {"functionCallingConfig": tool_config}
    config = _generation_config(body)
    if config:
        request["generationConfig"] = config
    return request


def _object(value: Any, param: str) -> JSONDict:
    if not isinstance(value, dict):
        raise InvalidRequest(f"expected an object in {param!r}, got {value!r:.40}", param=param)
    return value


def _append(contents: list[JSONDict], role: str, parts: list[JSONDict]) -> None:
    """Consecutive turns of one role merged: Gemini wants user and model to alternate."""
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _content_parts(content: Any) -> list[JSONDict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(
            "message content must be a string or a list of parts", param="messages"
        )
    parts: list[JSONDict] = []
    for part in content:
        kind = _object(part, "messages").get("type")
        if kind == "text":
            parts.append({"text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url", "") if isinstance(image, dict) else image
            parts.append(_inline(str(url), "image"))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            mime = f"audio/{audio.get('format', 'wav')}"
            parts.append({"inlineData": {"mimeType": mime, "data": audio.get("data", "")}})
        elif kind == "file" and isinstance((part.get("file") or {}).get("file_data"), str):
            parts.append(_inline(part["file"]["file_data"], "file"))
        elif kind == "refusal":
            parts.append({"text": part.get("refusal", "")})
        else:
            raise Untranslatable(f"content part {kind!r} has no Gemini equivalent")
    return parts


def _inline(url: str, what: str) -> JSONDict:
    """A ``data:`` URL as inline data; anything else would need a download (I/O)."""
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise Untranslatable(f"{what} URLs other than base64 data: URLs cannot be sent to Gemini")
    return {"inlineData": {"mimeType": head[5:-7] or "application/octet-stream", "data": data}}


def _function_call_part(call: JSONDict, names: dict[str, str]) -> JSONDict:
    function = call.get("function") or {}
    name = function.get("name", "")
    text = function.get("arguments") or "{}"
    try:
        args = orjson.loads(text)
    except orjson.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise InvalidRequest(
            f"tool call {name!r} has arguments that are not a JSON object", param="messages"
        )
    call_id = call.get("id")
    if isinstance(call_id, str):
        names[call_id] = name
    part: JSONDict = {"functionCall": {"name": name, "args": args}}
    if isinstance(call_id, str):
        part["functionCall"]["id"] = call_id
    signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
    if isinstance(signature, str):  # Gemini 3 wants its signature back with the call
        part["thoughtSignature"] = signature
    return part


def _function_response_part(message: JSONDict, names: dict[str, str]) -> JSONDict:
    call_id = message.get("tool_call_id")
    if call_id not in names:
        raise InvalidRequest(
            f"tool message refers to unknown tool_call_id {call_id!r}", param="messages"
        )
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    response: Any = None
    if isinstance(content, str):
        try:
            response = orjson.loads(content)
        except orjson.JSONDecodeError:
            response = None
    if not isinstance(response, dict):
        response = {"result": content}
    return {"functionResponse": {"id": call_id, "name": names[call_id], "response": response}}


def _declaration(tool: JSONDict) -> JSONDict:
    if tool.get("type", "function") != "function":
        raise Untranslatable(f"tool type {tool.get('type')!r} has no Gemini equivalent")
    function = tool.get("function") or {}
    declaration: JSONDict = {"name": function.get("name", "")}
    if function.get("description"):
        declaration["description"] = function["description"]
    parameters = function.get("parameters")
    if isinstance(parameters, dict) and parameters.get("properties"):
        declaration["parameters"] = gemini_schema(parameters)
    return declaration


def _tool_config(choice: Any) -> JSONDict | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"mode": "AUTO"}
    if choice == "none":
        return {"mode": "NONE"}
    if choice == "required":
        return {"mode": "ANY"}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return {"mode": "ANY", "allowedFunctionNames": [name]}
    raise Untranslatable(f"tool_choice {choice!r} has no Gemini equivalent")


def _generation_config(body: JSONDict) -> JSONDict:
    config: JSONDict = {}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    limit = body.get("max_completion_tokens")
    if limit is None:  # present but null: the other one still counts
        limit = body.get("max_tokens")
    if limit is not None:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("n") == 1:
        config["candidateCount"] = 1
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    elif response_format.get("type") == "json_schema":
        config["responseMimeType"] = "application/json"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            config["responseSchema"] = gemini_schema(schema)
    effort = body.get("reasoning_effort")
    if effort in _EFFORT:
        config["thinkingConfig"] = {"thinkingBudget": _EFFORT[effort]}
    return config


# --- Gemini response -> OpenAI completion ---------------------------------------------------


def _finish_reason(reason: str | None, called: bool) -> str | None:
    if reason is None:
        return None
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _FILTER_REASONS:
        return "content_filter"
    return "tool_calls" if called else "stop"


def _tool_call(call: JSONDict, signature: Any) -> JSONDict:
    call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
    out: JSONDict = {
        "id": call_id,
        "type": "function",
        "function": {
            "name": call.get("name", ""),
            "arguments": orjson.dumps(call.get("args") or {}).decode(),
        },
    }
    if isinstance(signature, str):
        out["extra_content"] = {"google": {"thought_signature": signature}}
    return out


def _read_parts(parts: list[JSONDict]) -> tuple[str | None, str | None, list[JSONDict]]:
    """(content, reasoning, tool_calls) of one candidate's parts."""
    text: list[str] = []
    thoughts: list[str] = []
    calls: list[JSONDict] = []
    for part in parts:
        if "functionCall" in part:
            calls.append(_tool_call(part["functionCall"], part.get("thoughtSignature")))
        elif isinstance(part.get("text"), str):
            (thoughts if part.get("thought") else text).append(part["text"])
    return ("".join(text) if text else None), ("".join(thoughts) if thoughts else None), calls


def _usage(meta: JSONDict) -> JSONDict:
    prompt = count(meta.get("promptTokenCount"))
    thoughts = count(meta.get("thoughtsTokenCount"))
    completion = count(meta.get("candidatesTokenCount")) + thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": count(meta.get("totalTokenCount")) or prompt + completion,
        "prompt_tokens_details": {"cached_tokens": count(meta.get("cachedContentTokenCount"))},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def _completion_id(data: JSONDict) -> str:
    response_id = data.get("responseId")
    return f"chatcmpl-{response_id}" if response_id else f"chatcmpl-{uuid.uuid4().hex}"


def completion_from_response(data: JSONDict, model: str) -> JSONDict:
    """An OpenAI ``chat.completion`` for a ``generateContent`` response."""
    choices: list[JSONDict] = []
    for position, candidate in enumerate(data.get("candidates") or []):
        parts = (candidate.get("content") or {}).get("parts") or []
        content, reasoning, calls = _read_parts(parts)
        message: JSONDict = {"role": "assistant", "content": content, "refusal": None}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        reason = _finish_reason(candidate.get("finishReason") or "STOP", bool(calls))
        index = candidate.get("index", position)
        choices.append(
            {"index": index, "message": message, "finish_reason": reason, "logprobs": None}
        )
    if not choices:  # the prompt itself was blocked
        message = {"role": "assistant", "content": "", "refusal": None}
        reason = (
            "content_filter" if (data.get("promptFeedback") or {}).get("blockReason") else "stop"
        )
        choices.append({"index": 0, "message": message, "finish_reason": reason, "logprobs": None})
    completion: JSONDict = {
        "id": _completion_id(data),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if isinstance(data.get("usageMetadata"), dict):
        completion["usage"] = _usage(data["usageMetadata"])
    return completion


# --- Gemini SSE -> OpenAI SSE ---------------------------------------------------------------


class StreamTranslator:
    """Bytes of ``streamGenerateContent?alt=sse`` in, OpenAI ``chat.completion.chunk`` events
    out. Each Gemini event is a whole ``GenerateContentResponse``; reads may split or bundle
    events, with LF, CRLF or CR line ends."""

    def __init__(
        self, model: str, *, include_usage: bool = False, created: int | None = None
    ) -> None:
        created = int(time.time()) if created is None else created
        self._chunks = ChunkWriter(f"chatcmpl-{uuid.uuid4().hex}", created, model, include_usage)
        self._named = False  # the id becomes Gemini's responseId once an event brings it
        self._splitter = EventSplitter()
        self._started = False
        self._calls = 0
        self._finished = False
        self._closed = False
        self._usage: JSONDict | None = None

    @property
    def usage(self) -> JSONDict | None:
        """The answer's OpenAI usage so far (Gemini sends cumulative counts; the last wins)."""
        return self._usage

    def feed(self, data: bytes) -> list[bytes]:
        if self._closed:
            return []
        try:
            events = self._splitter.feed(data)
        except EventTooLarge:
            return self._error({"message": f"Gemini sent an event over {MAX_EVENT_BYTES} bytes"})
        out: list[bytes] = []
        for event in events:
            out.extend(self._event(event))
            if self._closed:
                break
        return out

    def close(self) -> list[bytes]:
        """The end of the upstream stream: trailing event, finish, usage, ``[DONE]``."""
        if self._closed:
            return []
        rest = self._splitter.tail()
        out = self._event(rest) if rest else []
        if self._closed:
            return out
        if not self._finished:
            out.append(self._chunk({}, "tool_calls" if self._calls else "stop"))
        if self._chunks.include_usage and self._usage is not None:
            out.append(self._chunks.usage_chunk(self._usage))
        out.append(DONE)
        self._closed = True
        return out

    def _event(self, raw: bytes) -> list[bytes]:
        lines = [line for line in raw.split(b"\n") if line.startswith(b"data:")]
        payload = b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in lines)
        if not payload.strip() or payload.strip() == b"[DONE]":
            return []
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = {"error": {"message": "Gemini sent an event that is not JSON"}}
        if not isinstance(data, dict):
            data = {"error": {"message": "Gemini sent an event that is not a JSON object"}}
        if "error" in data:
            return self._error(data["error"])
        if not self._named:
            self._chunks.id, self._named = _completion_id(data), True
        if isinstance(data.get("usageMetadata"), dict):
            self._usage = _usage(data["usageMetadata"])
        out = [] if self._started else [self._chunk({"role": "assistant", "content": ""}, None)]
        self._started = True
        candidates = data.get("candidates") or []
        if not candidates and (data.get("promptFeedback") or {}).get("blockReason"):
            out.append(self._chunk({}, "content_filter"))
            self._finished = True
        for candidate in candidates[:1]:
            out.extend(self._candidate(candidate))
        return out

    def _candidate(self, candidate: JSONDict) -> list[bytes]:
        out: list[bytes] = []
        for part in (candidate.get("content") or {}).get("parts") or []:
            if "functionCall" in part:
                call = _tool_call(part["functionCall"], part.get("thoughtSignature"))
                call["index"] = self._calls
                self._calls += 1
                out.append(self._chunk({"tool_calls": [call]}, None))
            elif isinstance(part.get("text"), str) and part["text"]:
                key = "reasoning_content" if part.get("thought") else "content"
                out.append(self._chunk({key: part["text"]}, None))
        reason = _finish_reason(candidate.get("finishReason"), self._calls > 0)
        if reason is not None and not self._finished:
            out.append(self._chunk({}, reason))
            self._finished = True
        return out

    def _error(self, error: Any) -> list[bytes]:
        error = error if isinstance(error, dict) else {"message": str(error)}
        body = {
            "error": {
                "message": str(error.get("message", "upstream error")),
                "type": "upstream_error",
                "param": None,
                "code": str(error.get("status") or error.get("code") or "upstream_error"),
            }
        }
        self._closed = True
        return [sse_event(body), DONE]

    def _chunk(self, delta: JSONDict, finish: str | None) -> bytes:
        return self._chunks.chunk(delta, finish)


# --- embeddings -------------------------------------------------------------------------------


def embed_request(inputs: list[str], model: str) -> JSONDict:
    """The ``batchEmbedContents`` body: one request per input, in order."""
    name = model if model.startswith("models/") else f"models/{model}"
    return {"requests": [{"model": name, "content": {"parts": [{"text": t}]}} for t in inputs]}


def embeddings_from_response(data: JSONDict, model: str) -> JSONDict:
    """An OpenAI embeddings list for a ``batchEmbedContents`` response (order kept)."""
    items = [
        {"object": "embedding", "index": i, "embedding": e.get("values") or []}
        for i, e in enumerate(data.get("embeddings") or [])
    ]
    tokens = int((data.get("usageMetadata") or {}).get("promptTokenCount") or 0)
    return {
        "object": "list",
        "data": items,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
