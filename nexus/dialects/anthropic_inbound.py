"""Anthropic Messages in front of any backend: what a client sends to ``POST /v1/messages``
becomes an OpenAI chat body (Nexus's internal form); ``count_tokens`` is estimated from it. The
answers' side (``message_response``, ``MessagesStream``, ``error_body``) lives in
``anthropic_answers.py`` and is re-exported here, so handlers import one module. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson

from ..errors import InvalidRequest
from .anthropic import IMAGE_TYPES
from .anthropic_answers import (
    CHARS_PER_TOKEN,
    PING,
    STOP_REASONS,
    MessagesStream,
    error_body,
    error_type,
    message_response,
    stop_reason,
    tool_input,
)

__all__ = [
    "CHARS_PER_TOKEN",
    "IMAGE_TOKENS",
    "PING",
    "STOP_REASONS",
    "InboundChat",
    "MessagesStream",
    "chat_request",
    "error_body",
    "error_type",
    "estimate_input_tokens",
    "message_response",
    "stop_reason",
    "tool_input",
]

JSONDict = dict[str, Any]

# Anthropic bills an image at (width x height) / 750 tokens and scales images down to about 1.15
# megapixels first, so one image costs at most ~1,600 tokens: the estimate assumes the worst case
# rather than decoding the image to learn its size.
IMAGE_TOKENS = 1600

# Blocks that only Anthropic's servers produce or read (thinking signed for Claude, results of
# server tools): another backend cannot use them, so they are left out of the history.
_ANTHROPIC_ONLY_BLOCKS = frozenset(
    {
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "container_upload",
    }
)
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
_NO_IMAGE = "(the tool's output is attached in the next message)"


def _invalid(path: str, message: str) -> NoReturn:
    """A 400 naming the field as Anthropic does (``messages.0.content.1.source: ...``)."""
    raise InvalidRequest(f"{path}: {message}", param=path.split(".", 1)[0])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Requests: Messages -> OpenAI chat


@dataclass(frozen=True, slots=True)
class InboundChat:
    body: JSONDict  # the OpenAI chat body
    dropped_tools: list[str] = field(default_factory=list)  # server tools left out, by name


def chat_request(body: Any) -> InboundChat:
    """The OpenAI chat body for Messages ``body``; ``InvalidRequest`` names a malformed field."""
    return _chat(body, count_only=False)


def _chat(body: Any, *, count_only: bool) -> InboundChat:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        _invalid("model", "a non-empty string is required")
    out: JSONDict = {"model": model, "messages": _messages(body)}
    max_tokens = body.get("max_tokens")
    if not count_only or max_tokens is not None:
        if type(max_tokens) is not int or max_tokens < 1:
            _invalid("max_tokens", "an integer of at least 1 is required")
        out["max_tokens"] = max_tokens
    _sampling(body, out)
    dropped = _tools(body, out)
    _reasoning(body, out)
    return InboundChat(out, dropped)


def _sampling(body: JSONDict, out: JSONDict) -> None:
    for key in ("temperature", "top_p", "top_k"):
        value = body.get(key)
        if value is not None:
            if not _is_number(value):
                _invalid(key, "must be a number")
            out[key] = value
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            _invalid("stop_sequences", "must be a list of strings")
        if stop:
            out["stop"] = stop
    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            _invalid("stream", "must be a boolean")
        out["stream"] = stream
        if stream:
            out["stream_options"] = {"include_usage": True}  # the usage message_delta reports
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            _invalid("metadata", "must be an object")
        user = metadata.get("user_id")
        if user is not None and not isinstance(user, str):
            _invalid("metadata.user_id", "must be a string")
        if user:
            out["user"] = user


def _reasoning(body: JSONDict, out: JSONDict) -> None:
    """``thinking`` as ``reasoning_effort``; ``output_config.format`` as ``response_format``
    (structured output changes the answer, so it is honoured, not ignored)."""
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        _invalid("output_config", "must be an object")
    config = config or {}
    fmt = config.get("format")
    if fmt is not None:
        if not (
            isinstance(fmt, dict)
            and fmt.get("type") == "json_schema"
            and isinstance(fmt.get("schema"), dict)
        ):
            _invalid("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
        schema = {"name": "output", "schema": fmt["schema"]}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    thinking = body.get("thinking")
    if thinking is None:
        return
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if type(budget) is not int or budget < 0:
            _invalid("thinking.budget_tokens", "must be a non-negative integer")
        out["reasoning_effort"] = "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    elif kind == "adaptive":
        effort = config.get("effort")
        out["reasoning_effort"] = (
            _EFFORTS.get(effort, "medium") if isinstance(effort, str) else "medium"
        )
    elif kind != "disabled":
        _invalid("thinking.type", "must be 'enabled', 'adaptive' or 'disabled'")


# --- tools -------------------------------------------------------------------------------------


def _tools(body: JSONDict, out: JSONDict) -> list[str]:
    """Custom tools become functions; server tools (any other ``type``: web search, bash, text
    editor, computer, code execution...) run at Anthropic or use schemas only Claude knows, so
    they are left out and named."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        _invalid("tools", "must be a list")
    functions: list[JSONDict] = []
    dropped: list[str] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            _invalid(f"tools.{i}", "must be an object")
        kind = tool.get("type")
        if kind is None or kind == "custom":
            functions.append(_function(tool, f"tools.{i}"))
        elif isinstance(kind, str):
            name = tool.get("name")
            dropped.append(name if isinstance(name, str) and name else kind)
        else:
            _invalid(f"tools.{i}.type", "must be a string")
    if functions:
        out["tools"] = functions
    _tool_choice(body.get("tool_choice"), functions, dropped, out)
    return dropped


def _function(tool: JSONDict, path: str) -> JSONDict:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        _invalid(f"{path}.name", "a non-empty string is required")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        _invalid(f"{path}.input_schema", "a JSON schema object is required")
    function: JSONDict = {"name": name}
    description = tool.get("description")
    if isinstance(description, str) and description:
        function["description"] = description
    function["parameters"] = schema
    return {"type": "function", "function": function}


def _tool_choice(choice: Any, functions: list[JSONDict], dropped: list[str], out: JSONDict) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict):
        _invalid("tool_choice", "must be an object")
    kind = choice.get("type")
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        _invalid("tool_choice.disable_parallel_tool_use", "must be a boolean")
    mapped: str | JSONDict
    if kind in ("auto", "none", "any"):
        mapped = "required" if kind == "any" else kind
    elif kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            _invalid("tool_choice.name", "a non-empty string is required")
        if all(f["function"]["name"] != name for f in functions):
            if name in dropped:
                # A server tool: an Anthropic backend gets the request as it came and runs it;
                # others answer without it (X-Nexus-Dropped-Tools names it).
                return
            _invalid("tool_choice.name", f"no tool {name!r} in `tools`")
        mapped = {"type": "function", "function": {"name": name}}
    else:
        _invalid("tool_choice.type", "must be 'auto', 'any', 'tool' or 'none'")
    if not functions:
        if kind == "any" and not dropped:
            _invalid("tool_choice", "'any' needs a tool in `tools`")
        # OpenAI refuses a tool_choice without tools; with only server tools (dropped), only an
        # Anthropic backend, sent the request as it came, can honour the choice.
        return
    out["tool_choice"] = mapped
    if parallel and kind != "none":
        out["parallel_tool_calls"] = False


# --- messages ----------------------------------------------------------------------------------


def _messages(body: JSONDict) -> list[JSONDict]:
    out: list[JSONDict] = []
    _add_system(out, _system_text(body.get("system"), "system"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        _invalid("messages", "a non-empty list of messages is required")
    for i, message in enumerate(messages):
        path = f"messages.{i}"
        if not isinstance(message, dict):
            _invalid(path, "must be an object")
        role, content = message.get("role"), message.get("content")
        if role == "user":
            _user(out, content, path)
        elif role == "assistant":
            _assistant(out, content, path)
        elif role == "system":  # Claude Code sends these: a system message in place
            _add_system(out, _system_text(content, f"{path}.content"))
        else:
            _invalid(f"{path}.role", "must be 'user', 'assistant' or 'system'")
    return out


def _system_text(value: Any, path: str) -> str:
    """A string, or text blocks joined (their ``cache_control`` means nothing elsewhere)."""
    if value is None or isinstance(value, str):
        return value or ""
    return "\n\n".join(_text(block, f"{path}.{i}") for i, block in enumerate(_blocks(value, path)))


def _add_system(out: list[JSONDict], text: str) -> None:
    """Adjacent system texts become one message: many chat templates accept only one."""
    if not text:
        return
    if out and out[-1]["role"] == "system":
        out[-1]["content"] += "\n\n" + text
    else:
        out.append({"role": "system", "content": text})


def _blocks(content: Any, path: str) -> list[JSONDict]:
    if not isinstance(content, list):
        _invalid(path, "must be a string or a list of content blocks")
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            _invalid(f"{path}.{i}", "a content block must be an object with a string `type`")
    return content


def _text(block: JSONDict, path: str) -> str:
    if block["type"] != "text":
        _invalid(f"{path}.type", f"expected a text block, not {block['type']!r}")
    text = block.get("text")
    if not isinstance(text, str):
        _invalid(f"{path}.text", "must be a string")
    return text


def _text_part(block: JSONDict, path: str) -> JSONDict:
    return {"type": "text", "text": _text(block, path)}


def _user(out: list[JSONDict], content: Any, path: str) -> None:
    """Tool results first, as ``tool`` messages right after the assistant turn that called them;
    then one user message with the results' images and the rest of the content."""
    if isinstance(content, str):
        out.append({"role": "user", "content": content})
        return
    path = f"{path}.content"
    parts: list[JSONDict] = []
    rest: list[tuple[int, JSONDict]] = []
    for i, block in enumerate(_blocks(content, path)):
        if block["type"] == "tool_result":
            message, attached = _tool_result(block, f"{path}.{i}")
            out.append(message)
            parts.extend(attached)
        else:
            rest.append((i, block))
    for i, block in rest:
        kind, where = block["type"], f"{path}.{i}"
        if kind == "mid_conv_system":
            _flush_user(out, parts)
            parts = []
            _add_system(out, _system_text(block.get("content"), f"{where}.content"))
        elif kind not in _ANTHROPIC_ONLY_BLOCKS:
            parts.extend(_user_parts(block, where))
    _flush_user(out, parts)


def _flush_user(out: list[JSONDict], parts: list[JSONDict]) -> None:
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})


def _user_parts(block: JSONDict, path: str) -> list[JSONDict]:
    kind = block["type"]
    if kind == "text":
        return [_text_part(block, path)]
    if kind == "image":
        return [_image(block, path)]
    if kind == "document":
        return _document(block, path)
    if kind == "search_result":
        return [{"type": "text", "text": _search_result(block, path)}]
    _invalid(f"{path}.type", f"a {kind!r} block cannot be sent in a user message here")


def _image(block: JSONDict, path: str) -> JSONDict:
    source = block.get("source")
    if not isinstance(source, dict):
        _invalid(f"{path}.source", "must be an object")
    kind, url = source.get("type"), source.get("url")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or media not in IMAGE_TYPES:
            _invalid(f"{path}.source.media_type", f"must be one of {sorted(IMAGE_TYPES)}")
        if not isinstance(data, str):
            _invalid(f"{path}.source.data", "must be a base64 string")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        if not isinstance(url, str) or not url:
            _invalid(f"{path}.source.url", "a non-empty string is required")
    else:
        _invalid(f"{path}.source.type", f"{kind!r} images cannot be sent to this backend")
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: JSONDict, path: str) -> list[JSONDict]:
    source = block.get("source")
    if not isinstance(source, dict):
        _invalid(f"{path}.source", "must be an object")
    kind, data = source.get("type"), source.get("data")
    if kind == "base64":
        if source.get("media_type") != "application/pdf" or not isinstance(data, str):
            _invalid(f"{path}.source", "a base64 document must be an application/pdf string")
        title = block.get("title")
        name = title if isinstance(title, str) and title else "document.pdf"
        file = {"filename": name, "file_data": f"data:application/pdf;base64,{data}"}
        return [{"type": "file", "file": file}]
    if kind == "text":
        if not isinstance(data, str):
            _invalid(f"{path}.source.data", "must be a string")
        return [{"type": "text", "text": data}] if data else []
    if kind == "content":
        content = source.get("content")
        if isinstance(content, str):
            return [{"type": "text", "text": content}] if content else []
        where = f"{path}.source.content"
        blocks = enumerate(_blocks(content, where))
        return [
            _image(b, f"{where}.{i}") if b["type"] == "image" else _text_part(b, f"{where}.{i}")
            for i, b in blocks
        ]
    _invalid(
        f"{path}.source.type",
        f"{kind!r} documents cannot be sent to this backend (send a PDF as base64, or the text)",
    )


def _search_result(block: JSONDict, path: str) -> str:
    title, source, content = block.get("title"), block.get("source"), block.get("content")
    head = " ".join(x for x in (title, source) if isinstance(x, str) and x)
    where = f"{path}.content"
    texts = [_text(b, f"{where}.{i}") for i, b in enumerate(_blocks(content, where))]
    return "\n\n".join(x for x in (head, *texts) if x)


def _tool_result(block: JSONDict, path: str) -> tuple[JSONDict, list[JSONDict]]:
    """The ``tool`` message, and what only a user message can carry (images, PDFs)."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        _invalid(f"{path}.tool_use_id", "a non-empty string is required")
    content = block.get("content")
    texts: list[str] = []
    attached: list[JSONDict] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        where = f"{path}.content"
        for i, item in enumerate(_blocks(content, where)):
            if item["type"] == "tool_reference":  # the tool itself is already in `tools`
                name = item.get("tool_name")
                texts.append(f"Tool {name} is available." if isinstance(name, str) else "")
                continue
            for part in _user_parts(item, f"{where}.{i}"):
                if part["type"] == "text":
                    texts.append(part["text"])
                else:
                    attached.append(part)
    text = "\n\n".join(t for t in texts if t) or (_NO_IMAGE if attached else "")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        _invalid(f"{path}.is_error", "must be a boolean")
    if is_error:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": call_id, "content": text}, attached


def _assistant(out: list[JSONDict], content: Any, path: str) -> None:
    if isinstance(content, str):
        out.append({"role": "assistant", "content": content})
        return
    path = f"{path}.content"
    texts: list[str] = []
    calls: list[JSONDict] = []
    for i, block in enumerate(_blocks(content, path)):
        kind, where = block["type"], f"{path}.{i}"
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "tool_use":
            calls.append(_tool_call(block, where))
        elif kind not in _ANTHROPIC_ONLY_BLOCKS:
            _invalid(f"{where}.type", f"a {kind!r} block cannot be sent in an assistant message")
    text = "\n\n".join(t for t in texts if t)
    if not text and not calls:
        return  # only thinking: nothing another backend can read
    message: JSONDict = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    out.append(message)


def _tool_call(block: JSONDict, path: str) -> JSONDict:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not call_id:
        _invalid(f"{path}.id", "a non-empty string is required")
    if not isinstance(name, str) or not name:
        _invalid(f"{path}.name", "a non-empty string is required")
    if not isinstance(arguments, dict):
        _invalid(f"{path}.input", "must be an object")
    try:
        encoded = orjson.dumps(arguments).decode()
    except (orjson.JSONEncodeError, TypeError):
        _invalid(f"{path}.input", "is not JSON-serialisable")
    function = {"name": name, "arguments": encoded}
    return {"id": call_id, "type": "function", "function": function}


# ---------------------------------------------------------------------------------------------
# count_tokens


def estimate_input_tokens(body: Any) -> int:
    """An estimate for ``count_tokens`` on a backend that cannot count: characters of what
    would be sent (system, messages, tool calls, tool definitions as JSON) per
    ``CHARS_PER_TOKEN``, images at ``IMAGE_TOKENS`` each, a PDF by its decoded size. Validates
    ``body`` as ``chat_request`` does (``max_tokens`` is optional here)."""
    chat = _chat(body, count_only=True).body
    chars = images = 0
    for message in chat["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        for part in content if isinstance(content, list) else ():
            if part["type"] == "text":
                chars += len(part["text"])
            elif part["type"] == "image_url":
                images += 1
            else:
                chars += len(part["file"]["file_data"]) * 3 // 4
        for call in message.get("tool_calls") or ():
            chars += len(call["function"]["name"]) + len(call["function"]["arguments"])
    for tool in chat.get("tools") or ():
        chars += len(orjson.dumps(tool["function"]))
    return chars // CHARS_PER_TOKEN + images * IMAGE_TOKENS
