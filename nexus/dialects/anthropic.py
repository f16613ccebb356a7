"""OpenAI chat <-> Anthropic Messages (API version 2023-06-01), both directions and the stream.

Pure: no I/O. ``untranslatable`` names what a Messages backend cannot honour (the capability stage
excludes the backend); ``messages_request`` translates everything else; ``completion_from_message``
and ``StreamTranslator`` turn answers and SSE streams back into OpenAI chat completions and chunks.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson

from ..errors import InvalidRequest
from .counts import count
from .events import DONE, MAX_EVENT_BYTES, ChunkWriter, EventSplitter, EventTooLarge, sse_event

JSONDict = dict[str, Any]

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_BAD_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type -> (OpenAI type, code).
ERROR_TYPES = {
    "invalid_request_error": ("invalid_request_error", "invalid_request_error"),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "permission_error": ("permission_error", "forbidden"),
    "billing_error": ("permission_error", "billing_error"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "payload_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "timeout_error": ("server_error", "gateway_timeout"),
    "api_error": ("server_error", "api_error"),
    "overloaded_error": ("server_error", "overloaded"),
}
BROKEN = "nexus_protocol_error"  # Nexus's own kind: a stream cut short or not SSE/JSON
ERROR_TYPES[BROKEN] = ("server_error", "bad_gateway")

# OpenAI fields with no Messages equivalent that change the answer, when set to a non-default value.
_NO_EQUIVALENT = {
    "audio": "audio output",
    "prediction": "predicted outputs",
    "web_search_options": "web_search_options",
    "functions": "legacy `functions` (use `tools`)",
    "function_call": "legacy `function_call` (use `tool_choice`)",
    "reasoning_effort": "reasoning_effort",
    "verbosity": "verbosity",
}


# ---------------------------------------------------------------------------------------------
# Requests: OpenAI chat -> Messages


def untranslatable(body: JSONDict) -> str | None:
    """Why ``body`` cannot be sent to a Messages backend without changing the answer, or None."""
    n = body.get("n")
    if n is not None and n != 1:
        return "n > 1 (Anthropic returns one choice)"
    if body.get("logprobs") or body.get("top_logprobs"):
        return "logprobs (Anthropic does not return token probabilities)"
    for key, name in _NO_EQUIVALENT.items():
        if body.get(key) is not None:
            return f"{name} (no Anthropic equivalent)"
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key):
            return f"{key} (no Anthropic equivalent)"
    if body.get("logit_bias"):
        return "logit_bias (no Anthropic equivalent)"
    if "audio" in (body.get("modalities") or ()):
        return "audio output"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        return f"response_format {fmt.get('type')} (no JSON mode in Anthropic Messages)"
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and temperature > 1:
        return "temperature above 1 (Anthropic accepts 0 to 1)"
    return _untranslatable_tools(body) or _untranslatable_parts(body.get("messages"))


def _untranslatable_tools(body: JSONDict) -> str | None:
    for tool in body.get("tools") or ():
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            return "a tool that is not a function"
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") != "function":
        return f"tool_choice {choice.get('type')!r}"
    return None


def _untranslatable_parts(messages: Any) -> str | None:
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue  # a malformed body: messages_request answers it with a 400
        if message.get("role") not in _ROLES:
            return f"message role {message.get('role')!r}"
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image_url"):
                return f"content part {kind!r} (Anthropic takes text and images)"
            if kind == "image_url" and message.get("role", "user") != "user":
                return "an image outside a user message"
            if kind == "image_url":
                reason = _image_problem(_image_url(part))
                if reason:
                    return reason
    return None


def _image_url(part: JSONDict) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    return url if isinstance(url, str) else ""


def _image_problem(url: str) -> str | None:
    if url.startswith(("http://", "https://")):
        return None
    match = _DATA_URL.match(url)
    if match is None:
        return "an image that is neither an http(s) URL nor a base64 data URL"
    if match.group(1) not in IMAGE_TYPES:
        return f"image type {match.group(1)} (Anthropic takes jpeg, png, gif and webp)"
    return None


def messages_request(body: JSONDict, model: str, default_max_tokens: int) -> JSONDict:
    """The Messages body for OpenAI chat ``body``. Call ``untranslatable`` first; this raises
    ``InvalidRequest`` for a client's mistake (e.g. tool arguments that are not a JSON object)."""
    try:
        return _messages_request(body, model, default_max_tokens)
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequest(
            f"The request is not a well-formed chat request ({type(exc).__name__}: {exc})",
            param="messages",
        ) from exc


def _messages_request(body: JSONDict, model: str, default_max_tokens: int) -> JSONDict:
    system, turns = _turns(body.get("messages") or [])
    out: JSONDict = {"model": model, "messages": turns}
    if system:
        out["system"] = system
    out["max_tokens"] = _max_tokens(body, default_max_tokens)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for key in ("temperature", "top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    _add_tools(body, out)
    return out


def _max_tokens(body: JSONDict, default: int) -> int:
    """The client's limit (``max_completion_tokens`` first, as OpenAI reads them), else the
    model's default: Anthropic requires one."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(f"'{key}' must be a non-negative integer", param=key)
        return value
    return default


def _add_tools(body: JSONDict, out: JSONDict) -> None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools:
        out["tools"] = [_tool(tool["function"]) for tool in tools]
    mapped: JSONDict | None = None
    if choice == "none":
        mapped = {"type": "none"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif choice == "auto":
        mapped = {"type": "auto"}
    elif isinstance(choice, dict):
        mapped = {"type": "tool", "name": choice["function"]["name"]}
    if body.get("parallel_tool_calls") is False and tools:
        mapped = mapped or {"type": "auto"}
        if mapped["type"] != "none":
            mapped["disable_parallel_tool_use"] = True
    if mapped is not None and tools:
        out["tool_choice"] = mapped


def _tool(function: JSONDict) -> JSONDict:
    tool: JSONDict = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        tool["description"] = function["description"]
    if function.get("strict") is not None:
        tool["strict"] = function["strict"]
    return tool


def _turns(messages: list[JSONDict]) -> tuple[list[JSONDict], list[JSONDict]]:
    """(system text blocks, alternating turns); consecutive same-role turns merged."""
    system: list[JSONDict] = []
    turns: list[JSONDict] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content")))
            continue
        if role == "assistant":
            blocks = _text_blocks(message.get("content"))
            blocks.extend(_tool_use(call) for call in message.get("tool_calls") or ())
        elif role == "tool":
            role, blocks = "user", [_tool_result(message)]
        else:
            role, blocks = "user", _user_blocks(message.get("content"))
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # a lone text block reads better, and caches the same, as a string
        content = turn["content"]
        if len(content) == 1 and content[0]["type"] == "text":
            turn["content"] = content[0]["text"]
    return system, turns


def _text_blocks(content: Any) -> list[JSONDict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return [
        {"type": "text", "text": part["text"]}
        for part in content or ()
        if part.get("type") == "text" and part.get("text")
    ]


def _user_blocks(content: Any) -> list[JSONDict]:
    if not isinstance(content, list):
        return _text_blocks(content)
    blocks: list[JSONDict] = []
    for part in content:
        if part.get("type") == "image_url":
            blocks.append({"type": "image", "source": _image_source(_image_url(part))})
        else:
            blocks.extend(_text_blocks([part]))
    return blocks


def _image_source(url: str) -> JSONDict:
    match = _DATA_URL.match(url)
    if match is None:
        return {"type": "url", "url": url}
    return {"type": "base64", "media_type": match.group(1), "data": match.group(2)}


def tool_id(call_id: str) -> str:
    """Anthropic ids allow only ``[a-zA-Z0-9_-]``; others are mapped the same way everywhere."""
    return _BAD_ID_CHARS.sub("_", call_id) if _BAD_ID_CHARS.search(call_id) else call_id


def _tool_use(call: JSONDict) -> JSONDict:
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequest(
            f"The arguments of tool call {call.get('id')!r} ({function.get('name')}) are not a "
            "JSON object; Anthropic needs tool input as an object.",
            param="messages",
        )
    return {
        "type": "tool_use",
        "id": tool_id(str(call.get("id", ""))),
        "name": function.get("name", ""),
        "input": parsed,
    }


def _tool_result(message: JSONDict) -> JSONDict:
    content = message.get("content")
    block: JSONDict = {"type": "tool_result", "tool_use_id": tool_id(message["tool_call_id"])}
    block["content"] = content if isinstance(content, str) else _text_blocks(content)
    return block


# ---------------------------------------------------------------------------------------------
# Answers: Messages -> OpenAI chat


def completion_from_message(
    message: JSONDict, model: str, *, created: int | None = None
) -> JSONDict:
    """The OpenAI ``chat.completion`` for an Anthropic ``Message``."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[JSONDict] = []
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thoughts.append(block.get("thinking", ""))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": block["name"], "arguments": arguments}
            calls.append({"id": block["id"], "type": "function", "function": function})
    reply: JSONDict = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        reply["tool_calls"] = calls
    if thoughts:
        reply["reasoning_content"] = "".join(thoughts)
    choice = {
        "index": 0,
        "message": reply,
        "finish_reason": finish_reason(message.get("stop_reason")),
        "logprobs": None,
    }
    return {
        "id": message.get("id") or "chatcmpl-anthropic",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [choice],
        "usage": usage(message.get("usage") or {}),
    }


def finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def usage(anthropic: JSONDict) -> JSONDict:
    """OpenAI usage: cache reads and writes are prompt tokens too; reads are the cached ones."""
    cached = count(anthropic.get("cache_read_input_tokens"))
    written = count(anthropic.get("cache_creation_input_tokens"))
    prompt = count(anthropic.get("input_tokens")) + cached + written
    completion = count(anthropic.get("output_tokens"))
    details = {"cached_tokens": cached}
    if written > 0:  # priced at their own rate; not an OpenAI field, which the schema allows
        details["cache_write_tokens"] = written
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


def error_event(kind: str, message: str) -> JSONDict:
    """The OpenAI error envelope for an Anthropic error of type ``kind``."""
    type_, code = ERROR_TYPES.get(kind, ("server_error", kind or "upstream_error"))
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# ---------------------------------------------------------------------------------------------
# Streams: Messages SSE -> OpenAI chunks


class StreamTranslator:
    """Anthropic SSE bytes in (however they were read), OpenAI ``chat.completion.chunk`` events
    out, always ending in ``[DONE]``: an upstream ``error`` event, broken JSON or a stream cut
    before ``message_stop`` end it with an OpenAI error event first (kept in ``error``)."""

    def __init__(self, model: str, *, include_usage: bool = False, created: int | None = None):
        created = int(time.time()) if created is None else created
        self._chunks = ChunkWriter("chatcmpl-anthropic", created, model, include_usage)
        self._splitter = EventSplitter()
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._usage: JSONDict = {}
        self._done = False
        self.error: JSONDict | None = None  # the envelope sent when the stream failed
        self.usage: JSONDict | None = None  # the answer's OpenAI usage, once message_delta is in

    def feed(self, data: bytes) -> list[bytes]:
        if self._done:
            return []
        try:
            events = self._splitter.feed(data)
        except EventTooLarge:
            return self._fail(BROKEN, f"Anthropic sent an event over {MAX_EVENT_BYTES} bytes")
        out: list[bytes] = []
        for event in events:
            if self._done:
                break
            out.extend(self._event(event))
        return out

    def close(self) -> list[bytes]:
        """The end of the upstream body: what is left, and an error when it was cut short."""
        if self._done:
            return []
        rest = self._splitter.tail()
        out = self._event(rest) if rest else []
        if not self._done:
            out.extend(self._fail(BROKEN, "Anthropic's stream ended before message_stop"))
        return out

    def _event(self, raw: bytes) -> list[bytes]:
        lines = [line for line in raw.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            return []  # comments, or an `event:` line alone
        payload = b"\n".join(line[5:].removeprefix(b" ") for line in lines)
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            return self._fail(BROKEN, "Anthropic sent an event that is not a JSON object")
        return self._translate(event)

    def _translate(self, event: JSONDict) -> list[bytes]:
        kind = event.get("type")
        if kind == "content_block_delta":
            return self._delta(event)
        if kind == "message_start":
            message = event.get("message") or {}
            self._chunks.id = message.get("id") or self._chunks.id
            self._usage = dict(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "message_delta":
            return self._message_delta(event)
        if kind == "message_stop":
            self._done = True
            return [DONE]
        if kind == "error":
            error = event.get("error") or {}
            return self._fail(str(error.get("type", "")), str(error.get("message", "")))
        return []  # ping, content_block_stop, and event types newer than this code

    def _block_start(self, event: JSONDict) -> list[bytes]:
        block = event.get("content_block") or {}
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []
        index = self._tools[event.get("index", -1)] = len(self._tools)
        function = {"name": block.get("name", ""), "arguments": ""}
        call = {"index": index, "id": block.get("id", ""), "type": "function"}
        return [self._chunk({"tool_calls": [{**call, "function": function}]})]

    def _delta(self, event: JSONDict) -> list[bytes]:
        delta = event.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [self._chunk({"reasoning_content": delta["thinking"]})]
        if kind == "input_json_delta" and delta.get("partial_json"):
            index = self._tools.get(event.get("index", -1))
            if index is not None:
                call = {"index": index, "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [call]})]
        return []

    def _message_delta(self, event: JSONDict) -> list[bytes]:
        self._usage.update(event.get("usage") or {})  # cumulative counts: the latest win
        reason = finish_reason((event.get("delta") or {}).get("stop_reason"))
        out = [self._chunk({}, reason)]
        self.usage = usage(self._usage)
        if self._chunks.include_usage:
            out.append(self._chunks.usage_chunk(self.usage))
        return out

    def _chunk(self, delta: JSONDict, finish: str | None = None) -> bytes:
        return self._chunks.chunk(delta, finish)

    def _fail(self, kind: str, message: str) -> list[bytes]:
        self._done = True
        self.error = error_event(kind, message)
        return [sse_event(self.error), DONE]
