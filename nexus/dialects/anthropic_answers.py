"""Answers to Anthropic Messages clients from any backend: an OpenAI chat completion as a
``Message``, OpenAI SSE chunks as Anthropic's event sequence, Nexus's errors in Anthropic's
envelope. The requests' side is ``anthropic_inbound.py`` (which re-exports these names); the
inverse of ``anthropic.py``, sharing its tables. Pure: no I/O.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from .anthropic import BROKEN, ERROR_TYPES, tool_id
from .counts import count
from .events import MAX_EVENT_BYTES, EventSplitter, EventTooLarge

JSONDict = dict[str, Any]

CHARS_PER_TOKEN = 4  # as routing.requirements (a layer above: not imported from here)

# OpenAI finish_reason -> Anthropic stop_reason: the inverse of anthropic.FINISH_REASONS (where
# several Anthropic reasons share one OpenAI reason, the usual one is chosen).
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


# ---------------------------------------------------------------------------------------------
# Answers: OpenAI chat -> Messages


def message_response(completion: JSONDict, model: str) -> JSONDict:
    """The Anthropic ``Message`` for an OpenAI chat completion; ``model`` is the client's."""
    completion = completion if isinstance(completion, dict) else {}
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    choice = choice if isinstance(choice, dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content: list[JSONDict] = []
    reasoning = _reasoning_text(message)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _content_text(message.get("content")) or _content_text(message.get("refusal"))
    if text:
        content.append({"type": "text", "text": text, "citations": None})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict):
            content.append(_tool_use(call.get("id"), call.get("function")))
    if isinstance(message.get("function_call"), dict):  # the legacy single call
        content.append(_tool_use(None, message["function_call"]))
    has_tools = any(block["type"] == "tool_use" for block in content)
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason"), has_tools),
        "stop_sequence": None,
        "stop_details": None,
        "container": None,
        "usage": _usage(completion.get("usage")),
    }


def message_id(completion_id: Any = None) -> str:
    if isinstance(completion_id, str) and completion_id:
        return f"msg_{completion_id}"
    return f"msg_{uuid.uuid4().hex}"


def stop_reason(finish_reason: Any, has_tools: bool = False) -> str:
    """Anthropic's stop reason. Some servers (Ollama) say ``stop`` after a tool call; Anthropic
    clients look for ``tool_use``, so a finished answer with calls says that."""
    reason = STOP_REASONS.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else None
    if reason is None or (has_tools and reason == "end_turn"):
        return "tool_use" if has_tools else "end_turn"
    return reason


def _reasoning_text(message: JSONDict) -> str:
    for key in ("reasoning_content", "reasoning"):  # vLLM and llama.cpp; Ollama and OpenRouter
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts, as a few servers answer
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _tool_use(call_id: Any, function: Any) -> JSONDict:
    function = function if isinstance(function, dict) else {}
    name = function.get("name")
    return {
        "type": "tool_use",
        "id": _block_id(call_id),
        "name": name if isinstance(name, str) and name else "unknown",
        "input": tool_input(function.get("arguments")),
        "caller": {"type": "direct"},
    }


def _block_id(call_id: Any) -> str:
    """The call's id, in the characters Anthropic allows (mapped as the outbound side maps it)."""
    if isinstance(call_id, str) and call_id:
        return tool_id(call_id)
    return f"toolu_{uuid.uuid4().hex[:24]}"


def tool_input(arguments: Any) -> JSONDict:
    """Tool call arguments as a ``tool_use`` input: the JSON object, or the raw text kept under
    ``_raw_arguments`` when the model wrote something else (the client can show or reject it)."""
    if isinstance(arguments, dict):
        return arguments  # some servers send the object itself
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": arguments}


def _usage(usage: Any) -> JSONDict:
    """Anthropic's input tokens leave out cache reads and writes; OpenAI's prompt counts them."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = count(details.get("cached_tokens"))
    written = count(details.get("cache_write_tokens"))
    return {
        "input_tokens": max(0, count(usage.get("prompt_tokens")) - cached - written),
        "output_tokens": count(usage.get("completion_tokens")),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "cache_creation": None,
        "inference_geo": None,
        "output_tokens_details": None,
        "server_tool_use": None,
        "service_tier": None,
    }


# ---------------------------------------------------------------------------------------------
# Errors


# HTTP status -> Anthropic error type (docs.claude.com/en/api/errors). Nexus's 502 and 503 (no
# backend, all busy, backend down) are Anthropic's 529 overloaded: clients retry it with backoff.
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# An OpenAI error's code (anthropic.ERROR_TYPES inverted, plus Nexus's own) -> Anthropic type.
_CODE_TYPES = {code: kind for kind, (_, code) in ERROR_TYPES.items() if kind != BROKEN}
_CODE_TYPES.update(
    {
        "model_not_found": "not_found_error",
        "capability_mismatch": "invalid_request_error",
        "service_unavailable": "overloaded_error",
        "too_many_connections": "overloaded_error",
        "bad_gateway": "api_error",
        "internal_error": "api_error",
    }
)
_TYPE_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "rate_limit_error": "rate_limit_error",
    "service_unavailable": "overloaded_error",
}


def error_body(status: int, message: str, *, request_id: str | None = None) -> tuple[int, bytes]:
    """(status to send, Anthropic error envelope) for an error Nexus answers with ``status``."""
    if status in (502, 503):
        status = 529
    kind = _STATUS_TYPES.get(status)
    if kind is None:
        kind = "invalid_request_error" if 400 <= status < 500 else "api_error"
        status = status if 400 <= status < 500 else 500
    return status, orjson.dumps(_error(kind, message, request_id))


def error_type(error: Any) -> str:
    """The Anthropic error type for an OpenAI error object (``{"message","type","code"}``)."""
    if not isinstance(error, dict):
        return "api_error"
    code, kind = error.get("code"), error.get("type")
    if isinstance(code, str) and code in _CODE_TYPES:
        return _CODE_TYPES[code]
    return _TYPE_TYPES.get(kind, "api_error") if isinstance(kind, str) else "api_error"


def _error(kind: str, message: str, request_id: str | None) -> JSONDict:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


# ---------------------------------------------------------------------------------------------
# Streams: OpenAI chunks -> Messages SSE


def sse(kind: str, payload: JSONDict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


_REAL_USAGE = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
PING = sse("ping", {"type": "ping"})  # also for the handler's periodic keep-alive


@dataclass(slots=True)
class _Call:
    """One tool call of the answer, by its OpenAI index."""

    id: Any = None
    name: str = ""
    block: int | None = None  # its content block, once started (it needs the name)
    pending: list[str] = field(default_factory=list)  # arguments that came before the name


class MessagesStream:
    """OpenAI SSE events in (however grouped into items), Anthropic's event sequence out:
    ``message_start``, ``ping``, content blocks (thinking, text, tool_use) each started, fed and
    stopped in turn, ``message_delta`` with the stop reason and usage, ``message_stop``. An
    OpenAI error event, or an end without ``[DONE]``, ends it with an ``error`` event instead.

    OpenAI servers send each tool call's argument fragments together; a fragment for a call
    whose block already closed (calls interleaved) cannot be placed and is left out."""

    def __init__(self, model: str, input_tokens: int, *, request_id: str | None = None) -> None:
        self._model = model
        self._input_tokens = max(0, input_tokens)
        self._request_id = request_id
        self._splitter = EventSplitter()
        self._started = False
        self._done = False
        self._index = -1  # the last block's index
        self._open: str | None = None  # the open block: "thinking", "text" or "tool:<index>"
        self._calls: dict[int, _Call] = {}
        self._finish: Any = None
        self._chars = 0  # streamed characters: an output estimate when no usage comes
        self.usage: JSONDict | None = None  # the OpenAI usage, when the backend sent it
        self.error: JSONDict | None = None  # the Anthropic error event, when the stream failed

    def start(self, message_id: str | None = None) -> bytes:
        """``message_start`` and the first ``ping``, once (``feed`` sends them if not yet)."""
        if self._started:
            return b""
        self._started = True
        usage = _usage(None) | {"input_tokens": self._input_tokens}
        message: JSONDict = {
            "id": message_id or f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "stop_details": None,
            "container": None,
            "usage": usage,
        }
        return sse("message_start", {"type": "message_start", "message": message}) + PING

    def feed(self, item: bytes) -> bytes:
        if self._done:
            return b""
        out: list[bytes] = []
        try:
            events = self._splitter.feed(item)
        except EventTooLarge:
            self._fail(out, "api_error", f"The backend sent an event over {MAX_EVENT_BYTES} bytes")
            return b"".join(out)
        for raw in events:
            if self._done:
                break
            self._event(raw, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the upstream: an ``error`` event unless ``[DONE]`` came."""
        if self._done:
            return b""
        out: list[bytes] = []
        rest = self._splitter.tail()
        if rest:
            self._event(rest, out)
        if not self._done:
            self._fail(out, "api_error", "The backend's stream ended before it was complete")
        return b"".join(out)

    def _event(self, raw: bytes, out: list[bytes]) -> None:
        lines = [line for line in raw.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            return  # comments and keep-alives
        payload = b"\n".join(line[5:].removeprefix(b" ") for line in lines)
        if payload.strip() == b"[DONE]":
            self._close(out)
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            self._fail(out, "api_error", "The backend sent an event that is not a JSON object")
        elif event.get("error"):  # some servers put "error": null in good chunks
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            self._fail(out, error_type(error), str(message or "The backend failed"))
        else:
            self._chunk(event, out)

    def _chunk(self, chunk: JSONDict, out: list[bytes]) -> None:
        if not self._started:
            out.append(self.start(message_id(chunk.get("id"))))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return  # the usage chunk, or a choice-less keep-alive
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        reasoning = _reasoning_text(delta)
        if reasoning:
            self._delta(out, "thinking", {"type": "thinking_delta", "thinking": reasoning})
        text = delta.get("content")
        if isinstance(text, str) and text:
            self._delta(out, "text", {"type": "text_delta", "text": text})
        calls = delta.get("tool_calls")
        for position, call in enumerate(calls if isinstance(calls, list) else ()):
            if isinstance(call, dict):
                self._tool_delta(out, position, call)
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]

    def _delta(self, out: list[bytes], kind: str, delta: JSONDict) -> None:
        if self._open != kind:
            empty: JSONDict = {"type": "thinking", "thinking": "", "signature": ""}
            if kind == "text":
                empty = {"type": "text", "text": "", "citations": None}
            self._start_block(out, kind, empty)
        self._chars += len(delta.get("text") or delta.get("thinking") or "")
        self._send_delta(out, delta)

    def _tool_delta(self, out: list[bytes], position: int, call: JSONDict) -> None:
        index = call.get("index")
        index = index if type(index) is int else position
        state = self._calls.setdefault(index, _Call())
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        if state.block is None:
            state.id = call.get("id") or state.id
            name = function.get("name")
            state.name = name if isinstance(name, str) and name else state.name
            state.pending.append(arguments)
            if state.name:
                self._start_tool(out, index, state)
        elif self._open == f"tool:{index}" and arguments:
            self._chars += len(arguments)
            self._send_delta(out, {"type": "input_json_delta", "partial_json": arguments})

    def _start_tool(self, out: list[bytes], index: int, state: _Call) -> None:
        block = {
            "type": "tool_use",
            "id": _block_id(state.id),
            "name": state.name or "unknown",
            "input": {},
            "caller": {"type": "direct"},
        }
        self._start_block(out, f"tool:{index}", block)
        state.block = self._index
        arguments = "".join(state.pending)
        state.pending.clear()
        if arguments:
            self._chars += len(arguments)
            self._send_delta(out, {"type": "input_json_delta", "partial_json": arguments})

    def _start_block(self, out: list[bytes], key: str, block: JSONDict) -> None:
        self._stop_block(out)
        self._index += 1
        self._open = key
        start = {"type": "content_block_start", "index": self._index, "content_block": block}
        out.append(sse("content_block_start", start))

    def _send_delta(self, out: list[bytes], delta: JSONDict) -> None:
        event = {"type": "content_block_delta", "index": self._index, "delta": delta}
        out.append(sse("content_block_delta", event))

    def _stop_block(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(
                sse("content_block_stop", {"type": "content_block_stop", "index": self._index})
            )
            self._open = None

    def _close(self, out: list[bytes]) -> None:
        if not self._started:
            out.append(self.start())
        for index, state in self._calls.items():
            if state.block is None:  # a call that never got its name
                self._start_tool(out, index, state)
        self._stop_block(out)
        usage: JSONDict = {
            "input_tokens": None,
            "output_tokens": self._chars // CHARS_PER_TOKEN,
            "cache_creation_input_tokens": None,
            "cache_read_input_tokens": None,
            "output_tokens_details": None,
            "server_tool_use": None,
        }
        if self.usage is not None:
            real = _usage(self.usage)
            for key in _REAL_USAGE:
                usage[key] = real[key]
        delta = {
            "stop_reason": stop_reason(self._finish, bool(self._calls)),
            "stop_sequence": None,
            "stop_details": None,
            "container": None,
        }
        out.append(sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        self._done = True

    def _fail(self, out: list[bytes], kind: str, message: str) -> None:
        self._done = True
        self.error = _error(kind, message, self._request_id)
        out.append(sse("error", self.error))
