"""OpenAI Responses API (stateless) <-> OpenAI chat, Nexus's internal form. Pure: no I/O.

``chat_request`` turns a ``POST /v1/responses`` body (plus the resolved history of a
``previous_response_id``) into a chat body; ``response_object`` and ``ResponsesStream`` turn chat
answers and SSE chunks back into a ``Response`` and its typed events; ``output_items`` gives what a
stored response adds to the next turn's history.

Only function tools reach a backend. The others (hosted ones such as ``web_search``, and
``custom`` grammar tools) are left out and named in ``InboundChat.dropped_tools``. A ``namespace``
tool's functions are flattened to ``<namespace>__<name>`` (no ``__`` added when the namespace
already ends in ``__``, as Codex's ``mcp__server__`` ones do): chat names allow only
``[a-zA-Z0-9_-]``, and the spec scopes a namespaced call by a separate ``namespace`` field, which
answers carry again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import InvalidRequest
from .events import EventSplitter, EventTooLarge

JSONDict = dict[str, Any]

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})
_IMAGE_DETAILS = frozenset({"auto", "low", "high"})
_TOOL_CHOICE_MODES = frozenset({"auto", "none", "required"})
# ResponseErrorCode: the only codes a Response's ``error`` may carry.
_ERROR_CODES = frozenset(
    {
        "server_error", "rate_limit_exceeded", "invalid_prompt", "vector_store_timeout",
        "invalid_image", "invalid_image_format", "invalid_base64_image", "invalid_image_url",
        "image_too_large", "image_too_small", "image_parse_error",
        "image_content_policy_violation", "invalid_image_mode", "image_file_too_large",
        "unsupported_image_media_type", "empty_image_file", "failed_to_download_image",
        "image_file_not_found",
    }
)  # fmt: skip
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


@dataclass(frozen=True, slots=True)
class InboundChat:
    """A Responses request as Nexus routes it: the chat ``body``, the hosted tools left out (by
    type, or by name for ``custom`` tools) and the request's input as items, for the store."""

    body: JSONDict
    dropped_tools: list[str] = field(default_factory=list)
    input_items: list[JSONDict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Requests: Responses -> chat


def chat_request(body: Any, history: list[JSONDict] | None = None) -> InboundChat:
    """The chat body for a Responses ``body``; ``history`` (the earlier input and output items of
    ``previous_response_id``) goes before this request's input. Raises ``InvalidRequest``."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    if body.get("background"):
        raise InvalidRequest("background responses are not supported by Nexus", param="background")
    for key in ("conversation", "prompt"):
        if body.get(key) is not None:
            raise InvalidRequest(
                f"'{key}' needs OpenAI's server-side state, which Nexus does not keep; "
                "send the input (or use previous_response_id)",
                param=key,
            )
    tools, names, dropped = _tools(body.get("tools"))
    items = _input_items(body.get("input"))
    # Reasoning passed back is dropped: its encrypted content means nothing to other backends.
    stored = [item for item in items if item.get("type") != "reasoning"]
    if not stored and not history:
        raise InvalidRequest("'input' is required", param="input")

    messages: list[JSONDict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    _append_items(messages, history or [], names, "previous_response_id")
    _append_items(messages, items, names, "input")
    out: JSONDict = {"model": model, "messages": _merge_leading_system(messages)}

    if tools:
        out["tools"] = tools
    _tool_choice(out, body.get("tool_choice"), names, dropped)
    _options(out, body)
    _text_format(out, body.get("text"))
    _reasoning(out, body.get("reasoning"))
    # store, previous_response_id, include, prompt_cache_key, metadata, truncation, service_tier,
    # top_logprobs, max_tool_calls, text.verbosity, reasoning.summary: accepted, not sent.
    return InboundChat(out, dropped, stored)


def _options(out: JSONDict, body: JSONDict) -> None:
    """The plain options: checked, renamed where chat names them differently."""
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise InvalidRequest(
                "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls"
            )
        if "tools" in out:  # OpenAI refuses it without tools
            out["parallel_tool_calls"] = parallel
    limit = body.get("max_output_tokens")
    if limit is not None:
        if not _is_int(limit) or limit < 1:
            raise InvalidRequest(
                "'max_output_tokens' must be a positive integer", param="max_output_tokens"
            )
        out["max_tokens"] = limit
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if not _is_number(value):
                raise InvalidRequest(f"'{key}' must be a number", param=key)
            out[key] = value
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    _identity(out, body)


def _identity(out: JSONDict, body: JSONDict) -> None:
    user = body.get("safety_identifier") or body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise InvalidRequest("'user' must be a string", param="user")
        out["user"] = user
    if not isinstance(body.get("metadata") or {}, dict):
        raise InvalidRequest("'metadata' must be an object", param="metadata")
    if not isinstance(body.get("include") or [], list):
        raise InvalidRequest("'include' must be an array", param="include")


def _member(value: Any, allowed: frozenset[str]) -> bool:
    """``value in allowed`` for any JSON value (a list or object is not hashable)."""
    return isinstance(value, str) and value in allowed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flat_name(namespace: str | None, name: str) -> str:
    """The chat name of a function, scoped by its namespace when it has one."""
    if not namespace:
        return name
    return f"{namespace}{name}" if namespace.endswith("__") else f"{namespace}__{name}"


def _tools(raw: Any) -> tuple[list[JSONDict], dict[str, tuple[str | None, str]], list[str]]:
    """Chat tools, chat name -> (namespace, name), and what was left out."""
    if raw is None:
        return [], {}, []
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    tools: list[JSONDict] = []
    names: dict[str, tuple[str | None, str]] = {}
    dropped: list[str] = []

    def add(tool: JSONDict, namespace: str | None, param: str) -> None:
        chat, name = _function_tool(tool, param)
        key = flat_name(namespace, name)
        if key in names:
            raise InvalidRequest(f"Two tools are named '{key}'", param=param)
        chat["function"]["name"] = key
        names[key] = (namespace, name)
        tools.append(chat)

    for i, tool in enumerate(raw):
        param = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or not isinstance(kind, str):
            raise InvalidRequest("Each tool must be an object with a 'type'", param=param)
        if kind == "function":
            add(tool, None, param)
        elif kind == "namespace":
            namespace = tool.get("name")
            inner = tool.get("tools")
            if not isinstance(namespace, str) or not namespace or not isinstance(inner, list):
                raise InvalidRequest("A namespace tool needs a 'name' and 'tools'", param=param)
            for j, member in enumerate(inner):
                member_param = f"{param}.tools[{j}]"
                if not isinstance(member, dict):
                    raise InvalidRequest("Each tool must be an object", param=member_param)
                if member.get("type", "function") == "function":
                    add(member, namespace, member_param)
                else:
                    dropped.append(_dropped_name(member, namespace))
        else:
            dropped.append(_dropped_name(tool, None))
    return tools, names, list(dict.fromkeys(dropped))


def _dropped_name(tool: JSONDict, namespace: str | None) -> str:
    """How a left-out tool is named: safe for a header (ASCII word characters, 64 at most)."""
    kind = tool.get("type")
    name = tool.get("name")
    if kind == "custom" and isinstance(name, str) and name:
        shown = flat_name(namespace, name)  # a client-run tool: its name says more than "custom"
    else:
        shown = str(kind)
    return _UNSAFE.sub("_", shown)[:64]


def _function_tool(tool: JSONDict, param: str) -> tuple[JSONDict, str]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("A function tool needs a 'name'", param=f"{param}.name")
    function: JSONDict = {"name": name}
    description = tool.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise InvalidRequest("'description' must be a string", param=f"{param}.description")
        function["description"] = description
    parameters = tool.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    elif not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be an object", param=f"{param}.parameters")
    function["parameters"] = parameters
    strict = tool.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise InvalidRequest("'strict' must be a boolean", param=f"{param}.strict")
        function["strict"] = strict
    return {"type": "function", "function": function}, name


def _tool_choice(
    out: JSONDict, choice: Any, names: dict[str, tuple[str | None, str]], dropped: list[str]
) -> None:
    if choice is None:
        return
    has_tools = "tools" in out
    if isinstance(choice, str) and choice in _TOOL_CHOICE_MODES:
        if choice == "required" and not has_tools:
            raise _no_function_tools(dropped)
        if has_tools:
            out["tool_choice"] = choice
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(kind, str):
        raise InvalidRequest(
            "'tool_choice' must be 'auto', 'none', 'required' or an object with a 'type'",
            param="tool_choice",
        )
    if kind == "function":
        out["tool_choice"] = {
            "type": "function",
            "function": {"name": _chosen(choice, names, dropped)},
        }
        return
    if kind == "allowed_tools":
        mode, allowed = choice.get("mode"), choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise InvalidRequest(
                "allowed_tools needs a 'mode' (auto or required) and 'tools'", param="tool_choice"
            )
        keep = {
            _chosen(tool, names, [])
            for tool in allowed
            if isinstance(tool, dict) and tool.get("type") == "function"
        }
        tools = [tool for tool in out.get("tools", ()) if tool["function"]["name"] in keep]
        if not tools:
            if mode == "required":
                raise _no_function_tools(dropped)
            out.pop("tools", None)
            return
        out["tools"] = tools
        out["tool_choice"] = mode
        return
    name = choice.get("name")
    shown = f"{kind} '{name}'" if isinstance(name, str) else kind
    raise InvalidRequest(
        f"tool_choice forces the tool {shown}, which Nexus does not run (it passes function "
        "tools only)",
        param="tool_choice",
    )


def _chosen(choice: JSONDict, names: dict[str, tuple[str | None, str]], dropped: list[str]) -> str:
    name = choice.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("A function tool_choice needs a 'name'", param="tool_choice")
    namespace = choice.get("namespace")
    key = flat_name(namespace if isinstance(namespace, str) else None, name)
    if key in names:
        return key
    if name in dropped:
        raise InvalidRequest(
            f"tool_choice names '{name}', a tool Nexus left out (it passes function tools only)",
            param="tool_choice",
        )
    raise InvalidRequest(
        f"tool_choice names '{name}', which is not in 'tools'", param="tool_choice"
    )


def _no_function_tools(dropped: list[str]) -> InvalidRequest:
    left = f" (left out: {', '.join(dropped)})" if dropped else ""
    return InvalidRequest(
        f"tool_choice 'required' needs a function tool, and the request has none{left}",
        param="tool_choice",
    )


def _text_format(out: JSONDict, text: Any) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object", param="text")
    fmt = text.get("format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        out["response_format"] = {"type": "json_object"}
        return
    if kind != "json_schema" or not isinstance(fmt, dict):
        raise InvalidRequest(
            "text.format.type must be 'text', 'json_object' or 'json_schema'", param="text.format"
        )
    name, schema, strict = fmt.get("name"), fmt.get("schema"), fmt.get("strict")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("text.format needs a 'name'", param="text.format.name")
    if not isinstance(schema, dict):
        raise InvalidRequest("text.format needs a 'schema' object", param="text.format.schema")
    spec: JSONDict = {"name": name, "schema": schema}
    description = fmt.get("description")
    if isinstance(description, str):
        spec["description"] = description
    if strict is not None:
        if not isinstance(strict, bool):
            raise InvalidRequest("'strict' must be a boolean", param="text.format.strict")
        spec["strict"] = strict
    out["response_format"] = {"type": "json_schema", "json_schema": spec}


def _reasoning(out: JSONDict, reasoning: Any) -> None:
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise InvalidRequest("'reasoning' must be an object", param="reasoning")
    effort = reasoning.get("effort")
    if effort is None:
        return
    if not _member(effort, _EFFORTS):
        raise InvalidRequest(
            f"reasoning.effort must be one of {', '.join(sorted(_EFFORTS))}",
            param="reasoning.effort",
        )
    out["reasoning_effort"] = effort


def _input_items(raw: Any) -> list[JSONDict]:
    """The request's input as items: a string is one user message; role-only items gain their
    ``"type": "message"``. The items are checked by ``_append_items``."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise InvalidRequest("'input' must be a string or an array of items", param="input")
    items = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidRequest("Each input item must be an object", param=f"input[{i}]")
        kind = item.get("type")
        items.append({**item, "type": "message"} if kind is None and "role" in item else item)
    return items


def _append_items(
    messages: list[JSONDict],
    items: list[JSONDict],
    names: dict[str, tuple[str | None, str]],
    where: str,
) -> None:
    for i, item in enumerate(items):
        param = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest("Each input item must be an object", param=param)
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            _function_call(messages, item, param)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(
                    "function_call_output needs a 'call_id'", param=f"{param}.call_id"
                )
            content = _tool_output(item.get("output"), f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference" or (kind is None and "id" in item):
            raise InvalidRequest(
                "item_reference needs OpenAI's server-side state, which Nexus does not keep; "
                "send the item itself",
                param=param,
            )
        else:
            shown = repr(kind)[:80] if kind is not None else "(none)"
            raise InvalidRequest(
                f"Input item type {shown} is not supported by Nexus (it takes messages, "
                "function_call, function_call_output and reasoning items)",
                param=f"{param}.type",
            )


def _message(item: JSONDict, param: str) -> JSONDict:
    role = item.get("role")
    role = _ROLES.get(role, "") if isinstance(role, str) else ""
    if not role:
        raise InvalidRequest(
            "A message's role must be user, assistant, system or developer", param=f"{param}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(
            "A message's content must be a string or an array of parts", param=f"{param}.content"
        )
    parts = [_part(part, f"{param}.content[{j}]") for j, part in enumerate(content)]
    texts = [part["text"] for part in parts if part["type"] == "text"]
    if role != "user" and len(texts) < len(parts):
        raise InvalidRequest(f"A {role} message may hold text only", param=f"{param}.content")
    if role == "system":
        return {"role": role, "content": "\n\n".join(texts)}
    if len(parts) == 1 and texts:
        return {"role": role, "content": texts[0]}
    return {"role": role, "content": parts}


def _part(part: Any, param: str) -> JSONDict:
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(part, dict) or not isinstance(kind, str):
        raise InvalidRequest("Each content part must be an object with a 'type'", param=param)
    if kind in ("input_text", "output_text", "text", "refusal"):
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise InvalidRequest("A text part needs its text", param=param)
        return {"type": "text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if part.get("file_id") is not None and url is None:
            raise InvalidRequest(
                "input_image by file_id is not supported (Nexus keeps no files); send image_url "
                "(an https or data: URL)",
                param=f"{param}.file_id",
            )
        if not isinstance(url, str) or not url:
            raise InvalidRequest("input_image needs an 'image_url'", param=f"{param}.image_url")
        image: JSONDict = {"url": url}
        if _member(part.get("detail"), _IMAGE_DETAILS):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        data = part.get("file_data")
        if not isinstance(data, str) or not data:
            raise InvalidRequest(
                "input_file needs 'file_data' (file_id and file_url are not supported: Nexus "
                "keeps and fetches no files)",
                param=param,
            )
        file: JSONDict = {"file_data": data}
        filename = part.get("filename")
        if isinstance(filename, str):
            file["filename"] = filename
        return {"type": "file", "file": file}
    raise InvalidRequest(f"Content part type {kind[:60]!r} is not supported", param=f"{param}.type")


def _function_call(messages: list[JSONDict], item: JSONDict, param: str) -> None:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    namespace = item.get("namespace")
    for key, value in (("call_id", call_id), ("name", name)):
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"function_call needs a '{key}'", param=f"{param}.{key}")
    if not isinstance(arguments, str):
        raise InvalidRequest(
            "function_call 'arguments' must be a string", param=f"{param}.arguments"
        )
    if namespace is not None and not isinstance(namespace, str):
        raise InvalidRequest("'namespace' must be a string", param=f"{param}.namespace")
    assert isinstance(name, str)
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": flat_name(namespace, name), "arguments": arguments},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":  # its text, or the calls before
        last.setdefault("tool_calls", []).append(call)
        return
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tool_output(output: Any, param: str) -> str:
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise InvalidRequest("'output' must be a string or an array of parts", param=param)
    texts = []
    for j, part in enumerate(output):
        converted = _part(part, f"{param}[{j}]")
        if converted["type"] != "text":
            raise InvalidRequest(
                "Only text is supported in a function_call_output (chat tool results are text)",
                param=f"{param}[{j}]",
            )
        texts.append(converted["text"])
    return "".join(texts)


def _merge_leading_system(messages: list[JSONDict]) -> list[JSONDict]:
    """One leading system message: ``instructions`` plus a leading developer item would otherwise
    be two, and many chat templates accept a system message only as the very first one."""
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    if n < 2:
        return messages
    text = "\n\n".join(str(m["content"]) for m in messages[:n])
    return [{"role": "system", "content": text}, *messages[n:]]


# ---------------------------------------------------------------------------------------------
# Answers: chat -> Responses


def response_error(error: Any) -> JSONDict:
    """A Response's ``error`` ({code, message}) from an OpenAI error object: the spec allows a
    short list of codes, so Nexus's own become ``server_error`` (or ``invalid_prompt`` for a
    client's mistake); the message keeps the detail."""
    if not isinstance(error, dict):
        text = error if isinstance(error, str) and error else "The request failed"
        return {"code": "server_error", "message": text}
    code, kind, message = error.get("code"), error.get("type"), error.get("message")
    if not _member(code, _ERROR_CODES):
        if code == "rate_limit_exceeded" or kind == "rate_limit_error":
            code = "rate_limit_exceeded"
        elif kind == "invalid_request_error":
            code = "invalid_prompt"
        else:
            code = "server_error"
    text = message if isinstance(message, str) and message else "The request failed"
    return {"code": code, "message": text}


def response_usage(usage: Any) -> JSONDict | None:
    """A chat ``usage`` as a Response's; None when the backend sent none."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = usage.get("total_tokens")
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    thought = (
        completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
    )
    return {
        "input_tokens": prompt,
        # cache_write_tokens: newer SDKs require it (Nexus's Anthropic translation fills it)
        "input_tokens_details": {
            "cached_tokens": _count(prompt_details.get("cached_tokens")),
            "cache_write_tokens": _count(prompt_details.get("cache_write_tokens")),
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": _count(thought)},
        "total_tokens": _count(total) if _is_int(total) else prompt + completion,
    }


def _count(value: Any) -> int:
    return value if _is_int(value) and value >= 0 else 0


def _request_names(request: JSONDict) -> dict[str, tuple[str | None, str]]:
    """Chat name -> (namespace, name) for the request's function tools (empty if malformed)."""
    try:
        return _tools(request.get("tools"))[1]
    except InvalidRequest:
        return {}


def _echo_tools(request: JSONDict) -> list[Any]:
    tools = request.get("tools")
    if not isinstance(tools, list):
        return []
    kinds = ("function", "namespace")
    echoed = [t for t in tools if isinstance(t, dict) and t.get("type") in kinds]
    # A function tool's ``strict`` is a required field of the Response's tools; OpenAI's
    # default, when the request leaves it out, is true.
    return [{"strict": True, **t} if t.get("type") == "function" else t for t in echoed]


def _envelope(
    request: JSONDict,
    response_id: str,
    created_at: int,
    status: str,
    output: list[JSONDict],
    usage: JSONDict | None = None,
    incomplete: str | None = None,
    error: JSONDict | None = None,
) -> JSONDict:
    """A full ``Response``: every field the spec requires, echoed from the request (null where
    the request left it out)."""
    reasoning = request.get("reasoning")
    text = request.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    echo_text: JSONDict = {"format": fmt if isinstance(fmt, dict) else {"type": "text"}}
    if isinstance(text, dict) and text.get("verbosity") in ("low", "medium", "high"):
        echo_text["verbosity"] = text["verbosity"]
    parallel = request.get("parallel_tool_calls")
    metadata = request.get("metadata")
    instructions = request.get("instructions")
    response: JSONDict = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": None,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": _echo_int(request.get("max_output_tokens")),
        "model": request.get("model") if isinstance(request.get("model"), str) else "",
        "output": output,
        "parallel_tool_calls": parallel if isinstance(parallel, bool) else True,
        "previous_response_id": _echo_str(request.get("previous_response_id")),
        "reasoning": {
            "effort": reasoning["effort"] if _member(reasoning.get("effort"), _EFFORTS) else None,
            "summary": _echo_str(reasoning.get("summary")),
        }
        if isinstance(reasoning, dict)
        else None,
        "store": request.get("store") if isinstance(request.get("store"), bool) else True,
        "temperature": _echo_number(request.get("temperature")),
        "text": echo_text,
        "tool_choice": _echo_tool_choice(request.get("tool_choice")),
        "tools": _echo_tools(request),
        "top_p": _echo_number(request.get("top_p")),
        "truncation": "auto" if request.get("truncation") == "auto" else "disabled",
        "metadata": metadata
        if isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        else {},
    }
    if isinstance(request.get("user"), str):  # a string or absent: the spec's field is not nullable
        response["user"] = request["user"]
    if usage is not None:
        response["usage"] = usage
    return response


def _echo_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _echo_int(value: Any) -> int | None:
    return value if _is_int(value) else None


def _echo_number(value: Any) -> float | int | None:
    return value if _is_number(value) else None


def _echo_tool_choice(choice: Any) -> Any:
    if isinstance(choice, str) and choice in _TOOL_CHOICE_MODES:
        return choice
    if isinstance(choice, dict) and isinstance(choice.get("type"), str):
        return choice
    return "auto"


def _suffix(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def _reasoning_item(item_id: str, text: str, status: str) -> JSONDict:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _text_part(text: str) -> JSONDict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, parts: list[JSONDict], status: str) -> JSONDict:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": parts,
    }


def _call_item(
    item_id: str,
    call_id: str,
    name: str,
    arguments: str,
    status: str,
    names: dict[str, tuple[str | None, str]],
) -> JSONDict:
    namespace, own = names.get(name, (None, name))
    item: JSONDict = {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": own,
        "arguments": arguments,
        "status": status,
    }
    if namespace:
        item["namespace"] = namespace
    return item


def response_object(
    completion: JSONDict | None,
    request: JSONDict,
    response_id: str,
    created_at: int,
    status: str = "completed",
    error: JSONDict | None = None,
) -> JSONDict:
    """The ``Response`` for a chat ``completion`` answering ``request`` (the Responses body), or,
    with no completion and ``status="failed"``, the failed response carrying ``error``."""
    if completion is None:
        failure = response_error(error) if error is not None or status == "failed" else None
        return _envelope(request, response_id, created_at, status, [], error=failure)
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    choice = choice if isinstance(choice, dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    finish = choice.get("finish_reason")
    incomplete = _INCOMPLETE.get(finish) if isinstance(finish, str) else None
    if status == "completed" and incomplete:
        status = "incomplete"
    base = _suffix(response_id)
    output: list[JSONDict] = []
    thought = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(thought, str) and thought:
        output.append(_reasoning_item(f"rs_{base}_0", thought, "completed"))
    parts = []
    content = message.get("content")
    if isinstance(content, str) and content:
        parts.append(_text_part(content))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    if parts:
        output.append(_message_item(f"msg_{base}_{len(output)}", parts, "completed"))
    names = _request_names(request)
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        item_id = f"fc_{base}_{len(output)}"
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{item_id}"
        name = function.get("name")
        arguments = function.get("arguments")
        output.append(
            _call_item(
                item_id,
                call_id,
                name if isinstance(name, str) else "",
                arguments if isinstance(arguments, str) else "",
                "completed",
                names,
            )
        )
    if status == "incomplete" and output:  # a cut answer cut its last item only
        output[-1]["status"] = "incomplete"
    usage = response_usage(completion.get("usage"))
    failure = response_error(error) if error is not None else None
    return _envelope(request, response_id, created_at, status, output, usage, incomplete, failure)


def output_items(response: JSONDict) -> list[JSONDict]:
    """What a stored response adds to the next turn's history: its message and function_call
    items (reasoning is dropped, as it is on input)."""
    output = response.get("output")
    return [
        dict(item)
        for item in (output if isinstance(output, list) else ())
        if isinstance(item, dict) and item.get("type") in ("message", "function_call")
    ]


# ---------------------------------------------------------------------------------------------
# Streams: chat chunks -> Responses events


@dataclass(slots=True)
class _Item:
    """One output item being streamed."""

    kind: str  # "reasoning", "message" or "function_call"
    id: str
    index: int  # its output_index
    texts: list[str] = field(default_factory=list)  # reasoning, or the open message part

    parts: list[JSONDict] = field(default_factory=list)  # a message's finished parts
    part: str | None = None  # the open message part: "output_text" or "refusal"
    call_id: str = ""
    name: str = ""
    fragments: list[str] = field(default_factory=list)  # a call's arguments
    done: JSONDict | None = None  # the item as output_item.done carried it

    # Pieces joined once at the end: a long answer's deltas are not copied over and over.
    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def arguments(self) -> str:
        return "".join(self.fragments)


class ResponsesStream:
    """Turns the OpenAI chat SSE events Nexus relays into Responses events, each with the next
    ``sequence_number``. ``final_response`` is the last response sent (completed, incomplete or
    failed), for the store."""

    def __init__(self, request: JSONDict, response_id: str, created_at: int) -> None:
        self._request = request
        self._id = response_id
        self._created_at = created_at
        self._base = _suffix(response_id)
        self._names = _request_names(request)
        self._seq = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None  # the reasoning or message item being written
        self._calls: dict[int, _Item] = {}  # chat tool-call index -> its item, open ones
        self._usage: JSONDict | None = None
        self._finish: str | None = None
        self._splitter = EventSplitter()
        self.final_response: JSONDict | None = None

    @property
    def ended(self) -> bool:
        return self.final_response is not None

    def _event(self, kind: str, payload: JSONDict) -> bytes:
        payload = {"type": kind, **payload, "sequence_number": self._seq}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def start(self) -> bytes:
        response = _envelope(self._request, self._id, self._created_at, "in_progress", [])
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def feed(self, item: bytes) -> bytes:
        if self.ended:
            return b""
        try:
            events = self._splitter.feed(item)
        except EventTooLarge as exc:
            return self._fail(
                {"code": "server_error", "message": f"The backend's stream broke: {exc}"}
            )
        out = bytearray()
        for event in events:
            out += self._handle(event)
            if self.ended:
                break
        return bytes(out)

    def finish(self) -> bytes:
        """The end of the upstream stream: a failure unless ``[DONE]`` came already."""
        if self.ended:
            return b""
        tail = self._splitter.tail()
        out = self._handle(tail) if tail else b""
        if self.ended:
            return out
        return out + self._fail(
            {"code": "server_error", "message": "The backend's stream ended before it finished"}
        )

    def _handle(self, event: bytes) -> bytes:
        data = b"\n".join(
            line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if not data:
            return b""  # a comment or keep-alive
        if data.strip() == b"[DONE]":
            return self._complete()
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._fail(
                {"code": "server_error", "message": "The backend sent an event that is not JSON"}
            )
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk:
            return self._fail(response_error(chunk["error"]))
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return b""
        delta = choice.get("delta")
        out = self._delta(delta) if isinstance(delta, dict) else b""
        if isinstance(choice.get("finish_reason"), str):  # after the delta it ends
            self._finish = choice["finish_reason"]
        return out

    def _delta(self, delta: JSONDict) -> bytes:
        out = bytearray()
        thought = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(thought, str) and thought:
            out += self._reasoning_delta(thought)
        for kind, key in (("output_text", "content"), ("refusal", "refusal")):
            text = delta.get(key)
            if isinstance(text, str) and text:
                out += self._message_delta(kind, text)
        calls = delta.get("tool_calls")
        for position, call in enumerate(calls if isinstance(calls, list) else ()):
            if isinstance(call, dict):
                out += self._call_delta(position, call)
        return bytes(out)

    # --- items -----------------------------------------------------------------------------

    def _add(self, item: _Item, shown: JSONDict) -> bytes:
        self._items.append(item)
        return self._event(
            "response.output_item.added", {"output_index": item.index, "item": shown}
        )

    def _reasoning_delta(self, text: str) -> bytes:
        out = b""
        item = self._open
        if item is None or item.kind != "reasoning":
            out += self._close_all()
            item = _Item("reasoning", f"rs_{self._base}_{len(self._items)}", len(self._items))
            self._open = item
            out += self._add(item, {**_reasoning_item(item.id, "", "in_progress"), "content": []})
            out += self._event(
                "response.content_part.added",
                self._at(item, 0, {"part": {"type": "reasoning_text", "text": ""}}),
            )
        item.texts.append(text)
        return out + self._event(
            "response.reasoning_text.delta", self._at(item, 0, {"delta": text})
        )

    def _message_delta(self, kind: str, text: str) -> bytes:
        out = b""
        item = self._open
        if item is None or item.kind != "message":
            out += self._close_all()
            item = _Item("message", f"msg_{self._base}_{len(self._items)}", len(self._items))
            self._open = item
            out += self._add(item, _message_item(item.id, [], "in_progress"))
        if item.part != kind:
            out += self._close_part(item)
            item.part = kind
            empty = _text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
            out += self._event(
                "response.content_part.added", self._at(item, len(item.parts), {"part": empty})
            )
        item.texts.append(text)
        extra: JSONDict = {"delta": text}
        if kind == "output_text":
            extra["logprobs"] = []
        name = "response.output_text.delta" if kind == "output_text" else "response.refusal.delta"
        return out + self._event(name, self._at(item, len(item.parts), extra))

    def _call_delta(self, position: int, call: JSONDict) -> bytes:
        given = call.get("index")
        index = given if isinstance(given, int) and not isinstance(given, bool) else position
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        out = b""
        item = self._calls.get(index)
        if item is None:
            if self._open is not None:
                out += self._close(self._open)
            item = _Item("function_call", f"fc_{self._base}_{len(self._items)}", len(self._items))
            self._calls[index] = item
            call_id = call.get("id")
            item.call_id = call_id if isinstance(call_id, str) and call_id else f"call_{item.id}"
            name = function.get("name")
            item.name = name if isinstance(name, str) else ""
            out += self._add(item, self._call_shown(item, "in_progress"))
        elif not item.name and isinstance(function.get("name"), str):
            item.name = function["name"]
        fragment = function.get("arguments")
        if isinstance(fragment, str) and fragment:
            item.fragments.append(fragment)
            out += self._event(
                "response.function_call_arguments.delta",
                {"item_id": item.id, "output_index": item.index, "delta": fragment},
            )
        return out

    def _call_shown(self, item: _Item, status: str) -> JSONDict:
        return _call_item(item.id, item.call_id, item.name, item.arguments, status, self._names)

    @staticmethod
    def _at(item: _Item, content_index: int, extra: JSONDict) -> JSONDict:
        return {
            "item_id": item.id,
            "output_index": item.index,
            "content_index": content_index,
            **extra,
        }

    def _close_part(self, item: _Item) -> bytes:
        if item.part is None:
            return b""
        index, text = len(item.parts), item.text
        if item.part == "output_text":
            part = _text_part(text)
            out = self._event(
                "response.output_text.done",
                self._at(item, index, {"text": text, "logprobs": []}),
            )
        else:
            part = {"type": "refusal", "refusal": text}
            out = self._event("response.refusal.done", self._at(item, index, {"refusal": text}))
        out += self._event("response.content_part.done", self._at(item, index, {"part": part}))
        item.parts.append(part)
        item.part, item.texts = None, []
        return out

    def _status(self, item: _Item) -> str:
        """A cut answer cut its last item only."""
        cut = self._finish in _INCOMPLETE and item is self._items[-1]
        return "incomplete" if cut else "completed"

    def _close(self, item: _Item) -> bytes:
        status = self._status(item)
        out = b""
        if item.kind == "reasoning":
            out += self._event(
                "response.reasoning_text.done", self._at(item, 0, {"text": item.text})
            )
            out += self._event(
                "response.content_part.done",
                self._at(item, 0, {"part": {"type": "reasoning_text", "text": item.text}}),
            )
            item.done = _reasoning_item(item.id, item.text, status)
        elif item.kind == "message":
            out += self._close_part(item)
            item.done = _message_item(item.id, item.parts, status)
        else:
            out += self._event(
                "response.function_call_arguments.done",
                {
                    "item_id": item.id,
                    "output_index": item.index,
                    "name": self._call_shown(item, status)["name"],
                    "arguments": item.arguments,
                },
            )
            item.done = self._call_shown(item, status)
            self._calls = {k: v for k, v in self._calls.items() if v is not item}
        if item is self._open:
            self._open = None
        return out + self._event(
            "response.output_item.done", {"output_index": item.index, "item": item.done}
        )

    def _close_all(self) -> bytes:
        out = b""
        for item in self._items:
            if item.done is None:
                out += self._close(item)
        return out

    # --- endings ---------------------------------------------------------------------------

    def _complete(self) -> bytes:
        out = self._close_all()
        incomplete = _INCOMPLETE.get(self._finish or "")
        status = "incomplete" if incomplete else "completed"
        response = _envelope(
            self._request,
            self._id,
            self._created_at,
            status,
            [item.done for item in self._items if item.done is not None],
            response_usage(self._usage),
            incomplete,
        )
        self.final_response = response
        kind = "response.incomplete" if incomplete else "response.completed"
        return out + self._event(kind, {"response": response})

    def fail(self, error: Any) -> bytes:
        """``response.failed`` for a failure Nexus met itself (the walk gave up, the upstream
        broke): ``error`` is an OpenAI error object; nothing follows."""
        return b"" if self.ended else self._fail(response_error(error))

    def _fail(self, error: JSONDict) -> bytes:
        output = []
        for item in self._items:
            if item.done is not None:
                output.append(item.done)
            elif item.kind == "function_call":
                output.append(self._call_shown(item, "incomplete"))
            elif item.kind == "reasoning":
                output.append(_reasoning_item(item.id, item.text, "incomplete"))
            else:
                parts = list(item.parts)
                if item.part == "output_text":
                    parts.append(_text_part(item.text))
                elif item.part == "refusal":
                    parts.append({"type": "refusal", "refusal": item.text})
                output.append(_message_item(item.id, parts, "incomplete"))
        response = _envelope(
            self._request,
            self._id,
            self._created_at,
            "failed",
            output,
            response_usage(self._usage),
            error=error,
        )
        self.final_response = response
        return self._event("response.failed", {"response": response})
