"""Anthropic Messages in front of any backend (issue 11, point 1): what clients send to
``/v1/messages`` becomes an OpenAI chat body valid under OpenAI's published schema, and answers,
stream events and errors go back valid under Anthropic's."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus.dialects.anthropic import FINISH_REASONS
from nexus.dialects.anthropic_inbound import (
    CHARS_PER_TOKEN,
    IMAGE_TOKENS,
    PING,
    STOP_REASONS,
    InboundChat,
    MessagesStream,
    chat_request,
    error_body,
    estimate_input_tokens,
    message_response,
)
from nexus.errors import InvalidRequest
from nexus.routing import requirements
from tests.contract import anthropic_spec, openapi

JSONDict = dict[str, Any]
PNG = "iVBORw0KGgo="
PDF = "JVBERi0xLjQK"


def request(**fields: Any) -> JSONDict:
    body: JSONDict = {"model": "qwen", "max_tokens": 1024, "messages": [user("Hi")]}
    body.update(fields)
    return body


def translate(body: JSONDict) -> InboundChat:
    """The chat body for ``body``, which must be a valid Messages request; the result must be a
    valid OpenAI chat request."""
    anthropic_spec.validate("CreateMessageParams", body)
    chat = chat_request(body)
    openapi.validate("CreateChatCompletionRequest", chat.body)
    return chat


def messages_of(body: JSONDict) -> list[JSONDict]:
    out: list[JSONDict] = translate(body).body["messages"]
    return out


def user(content: Any) -> JSONDict:
    return {"role": "user", "content": content}


def assistant(content: Any) -> JSONDict:
    return {"role": "assistant", "content": content}


def text(value: str, **extra: Any) -> JSONDict:
    return {"type": "text", "text": value, **extra}


def tool_use(id_: str, name: str, input_: Any) -> JSONDict:
    return {"type": "tool_use", "id": id_, "name": name, "input": input_}


def tool_result(id_: Any, content: Any = None, **extra: Any) -> JSONDict:
    block: JSONDict = {"type": "tool_result", "tool_use_id": id_, **extra}
    if content is not None:
        block["content"] = content
    return block


def image(source: JSONDict) -> JSONDict:
    return {"type": "image", "source": source}


PNG_SOURCE = {"type": "base64", "media_type": "image/png", "data": PNG}
PNG_URL = f"data:image/png;base64,{PNG}"
READ: JSONDict = {
    "name": "Read",
    "description": "Read a file",
    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
}


# --- requests ----------------------------------------------------------------------------------


def test_a_minimal_request() -> None:
    chat = translate(request())
    assert chat.body == {
        "model": "qwen",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1024,
    }
    assert chat.dropped_tools == []


def test_system_as_blocks_and_system_entries_in_messages() -> None:
    cache = {"cache_control": {"type": "ephemeral"}}
    body = request(
        system=[text("You are Claude Code.", **cache), text("Be brief.")],
        messages=[
            {"role": "system", "content": "Also: French."},
            user("Hi"),
            assistant("Bonjour"),
            {"role": "system", "content": [text("Reminder: be nice.")]},
            user([text("Again", **cache)]),
        ],
    )
    # The spec's InputMessage takes role "system"; translate() checks the request against it.
    assert messages_of(body) == [
        {"role": "system", "content": "You are Claude Code.\n\nBe brief.\n\nAlso: French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "system", "content": "Reminder: be nice."},
        {"role": "user", "content": "Again"},
    ]


def test_a_mid_conversation_system_block_splits_the_user_turn_in_place() -> None:
    block = {"type": "mid_conv_system", "content": [text("Now in plan mode.")]}
    body = request(messages=[user([text("one"), block, text("two")])])
    assert messages_of(body) == [
        {"role": "user", "content": "one"},
        {"role": "system", "content": "Now in plan mode."},
        {"role": "user", "content": "two"},
    ]


def test_images_and_documents_become_openai_parts() -> None:
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
    }
    plain = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "notes"},
    }
    nested = {
        "type": "document",
        "source": {"type": "content", "content": [text("a"), image(PNG_SOURCE)]},
    }
    body = request(
        messages=[
            user(
                [
                    text("Look"),
                    image(PNG_SOURCE),
                    image({"type": "url", "url": "https://example.com/cat.jpg"}),
                    {**pdf, "title": "report.pdf"},
                    plain,
                    nested,
                ]
            )
        ]
    )
    [message] = messages_of(body)
    assert message["content"] == [
        {"type": "text", "text": "Look"},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {
            "type": "file",
            "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
        },
        {"type": "text", "text": "notes"},
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
    ]


@pytest.mark.parametrize(
    ("block", "where"),
    [
        (
            {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}},
            "messages.0.content.0.source.type",
        ),
        ({"type": "document", "source": {"type": "file", "file_id": "f"}}, "source.type"),
        (image({"type": "file", "file_id": "file_1"}), "messages.0.content.0.source.type"),
        (image({"type": "base64", "media_type": "image/tiff", "data": PNG}), "media_type"),
        (image({"type": "url"}), "source.url"),
        ({"type": "tool_use", "id": "t", "name": "x", "input": {}}, "content.0.type"),
        ({"type": "hologram"}, "messages.0.content.0.type"),
        ({"text": "no type"}, "messages.0.content.0"),
        ({"type": "text", "text": 5}, "messages.0.content.0.text"),
    ],
)
def test_untranslatable_or_bad_user_blocks_are_named(block: JSONDict, where: str) -> None:
    with pytest.raises(InvalidRequest, match=where.replace(".", r"\.")) as caught:
        chat_request(request(messages=[user([block])]))
    assert caught.value.status == 400
    assert caught.value.param == "messages"


def test_tool_turns_tool_messages_first_then_the_rest_of_the_user_turn() -> None:
    body = request(
        tools=[READ],
        messages=[
            user("Read a and b"),
            assistant(
                [
                    {"type": "thinking", "thinking": "two reads", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "xx"},
                    text("Reading."),
                    tool_use("toolu_1", "Read", {"path": "a"}),
                    {**tool_use("toolu_2", "Read", {"path": "b"}), "caller": {"type": "direct"}},
                ]
            ),
            user(
                [
                    text("<system-reminder>keep going</system-reminder>"),
                    tool_result("toolu_1", "alpha"),
                    tool_result("toolu_2", [text("beta"), text("gamma")], is_error=True),
                ]
            ),
        ],
    )
    calls = [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "Read", "arguments": '{"path":"a"}'},
        },
        {
            "id": "toolu_2",
            "type": "function",
            "function": {"name": "Read", "arguments": '{"path":"b"}'},
        },
    ]
    assert messages_of(body) == [
        {"role": "user", "content": "Read a and b"},
        {"role": "assistant", "content": "Reading.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "alpha"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: beta\n\ngamma"},
        {"role": "user", "content": "<system-reminder>keep going</system-reminder>"},
    ]


def test_images_in_a_tool_result_follow_as_a_user_message() -> None:
    body = request(
        tools=[READ],
        messages=[
            user("Show me"),
            assistant([tool_use("toolu_1", "Read", {"path": "cat.png"})]),
            user([tool_result("toolu_1", [image(PNG_SOURCE)]), text("What is it?")]),
        ],
    )
    out = messages_of(body)
    assert out[1]["content"] is None
    assert out[2:] == [
        {
            "role": "tool",
            "tool_call_id": "toolu_1",
            "content": "(the tool's output is attached in the next message)",
        },
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": PNG_URL}},
                {"type": "text", "text": "What is it?"},
            ],
        },
    ]


def test_an_assistant_turn_of_thinking_only_or_server_blocks_is_left_out() -> None:
    body = request(
        messages=[
            user("Hi"),
            assistant([{"type": "thinking", "thinking": "hmm", "signature": "s"}]),
            assistant(
                [
                    {
                        "type": "server_tool_use",
                        "id": "srvtoolu_1",
                        "name": "web_search",
                        "input": {},
                    },
                    text("Found it."),
                ]
            ),
            user("Thanks"),
        ]
    )
    assert messages_of(body) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Found it."},
        {"role": "user", "content": "Thanks"},
    ]


def test_custom_tools_become_functions_and_server_tools_are_dropped_and_named() -> None:
    tools = [
        READ,
        {
            **READ,
            "name": "Grep",
            "type": "custom",
            "defer_loading": True,
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
        {"type": "code_execution_20250825", "name": "code_execution"},
    ]
    chat = translate(request(tools=tools))
    assert chat.body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "Read",
                "description": "Read a file",
                "parameters": READ["input_schema"],
            },
        },
        {
            "type": "function",
            "function": {
                "name": "Grep",
                "description": "Read a file",
                "parameters": READ["input_schema"],
            },
        },
    ]
    assert chat.dropped_tools == [
        "web_search",
        "bash",
        "str_replace_based_edit_tool",
        "code_execution",
    ]
    # computer use tools carry extra keys the spec's strict union rejects: checked untranslated
    computer = {"type": "computer_20250124", "name": "computer", "display_width_px": 1024}
    assert chat_request(request(tools=[computer])).dropped_tools == ["computer"]
    assert "tools" not in chat_request(request(tools=[computer])).body


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        ({"type": "none"}, "none", None),
        (
            {"type": "tool", "name": "Read"},
            {"type": "function", "function": {"name": "Read"}},
            None,
        ),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        ({"type": "auto", "disable_parallel_tool_use": False}, "auto", None),
    ],
)
def test_every_tool_choice_form(choice: JSONDict, expected: Any, parallel: bool | None) -> None:
    chat = translate(request(tools=[READ], tool_choice=choice))
    assert chat.body["tool_choice"] == expected
    assert chat.body.get("parallel_tool_calls") is parallel


def test_tool_choice_when_no_tool_can_run() -> None:
    search = {"type": "web_search_20250305", "name": "web_search"}
    chat = translate(request(tools=[search], tool_choice={"type": "auto"}))
    assert "tool_choice" not in chat.body
    assert "tools" not in chat.body
    # Forcing a server tool: only an Anthropic backend (sent the request as it came) can honour
    # it; the chat form goes without, and the tool is named as dropped for the others.
    for choice in ({"type": "any"}, {"type": "tool", "name": "web_search"}):
        chat = chat_request(request(tools=[READ, search], tool_choice=choice))
        assert chat.body.get("tool_choice") in (None, "required")
        assert chat.dropped_tools == ["web_search"]
    chat = chat_request(request(tools=[search], tool_choice={"type": "any"}))
    assert "tool_choice" not in chat.body and chat.dropped_tools == ["web_search"]
    with pytest.raises(InvalidRequest, match="'any' needs a tool"):
        chat_request(request(tool_choice={"type": "any"}))
    with pytest.raises(InvalidRequest, match=r"tool_choice\.name: no tool 'Nope'"):
        chat_request(request(tools=[READ], tool_choice={"type": "tool", "name": "Nope"}))


def test_sampling_limits_stream_and_user() -> None:
    chat = translate(
        request(
            max_tokens=32000,
            stop_sequences=["###", "END"],
            temperature=0.2,
            top_p=0.9,
            top_k=40,
            stream=True,
            metadata={"user_id": "user_abc"},
        )
    )
    body = chat.body
    assert body["max_tokens"] == 32000
    assert body["stop"] == ["###", "END"]
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.2, 0.9, 40)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["user"] == "user_abc"
    unstreamed = translate(request(stream=False, stop_sequences=[])).body
    assert unstreamed["stream"] is False
    assert "stream_options" not in unstreamed
    assert "stop" not in unstreamed


def test_anthropic_only_fields_are_accepted_and_not_sent() -> None:
    extra = {
        "cache_control": {"type": "ephemeral"},
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        "container": "container_1",
        "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}],
        "service_tier": "auto",
        "inference_geo": "us",
        "output_config": {"effort": "high"},
        "anthropic_beta_field_from_the_future": {"x": 1},
    }
    body = chat_request(request(**extra)).body
    assert set(body) == {"model", "messages", "max_tokens"}


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 4095}, "low"),
        ({"type": "enabled", "budget_tokens": 4096}, "medium"),
        ({"type": "enabled", "budget_tokens": 16383}, "medium"),
        ({"type": "enabled", "budget_tokens": 16384}, "high"),
        ({"type": "adaptive"}, "medium"),
        ({"type": "disabled"}, None),
    ],
)
def test_thinking_becomes_reasoning_effort(thinking: JSONDict, effort: str | None) -> None:
    body = translate(request(thinking=thinking, max_tokens=20000)).body
    assert body.get("reasoning_effort") == effort


@pytest.mark.parametrize(("level", "effort"), [("low", "low"), ("high", "high"), ("max", "high")])
def test_adaptive_thinking_follows_the_requested_effort(level: str, effort: str) -> None:
    body = translate(request(thinking={"type": "adaptive"}, output_config={"effort": level})).body
    assert body["reasoning_effort"] == effort


def test_structured_output_becomes_a_json_schema_response_format() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "additionalProperties": False,
    }
    body = translate(
        request(output_config={"format": {"type": "json_schema", "schema": schema}})
    ).body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    assert requirements.chat_requirements(body, {}).json_mode


def test_a_claude_code_request() -> None:
    """The shape Claude Code 2.1 sends (reference/real-components.md section 7)."""
    cache = {"cache_control": {"type": "ephemeral"}}
    bash = {
        "name": "Bash",
        "description": "Run a shell command",
        "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
            "additionalProperties": False,
        },
    }
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            text("x-anthropic-billing-header: cc_version=2.1.328;"),
            text("You are Claude Code, Anthropic's official CLI for Claude.", **cache),
        ],
        "messages": [
            user([text("<system-reminder>ctx</system-reminder>"), text("list files", **cache)]),
            assistant([tool_use("toolu_01", "Bash", {"command": "ls"})]),
            user([tool_result("toolu_01", "a.txt\nb.txt", **cache)]),
            {"role": "system", "content": "Todo list is empty."},
        ],
        "tools": [bash, {**READ, "defer_loading": True}],
        "metadata": {"user_id": "user_1_account__session_2"},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
    }
    chat = chat_request(body)
    openapi.validate("CreateChatCompletionRequest", chat.body)
    assert [m["role"] for m in chat.body["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "system",
    ]
    assert chat.body["reasoning_effort"] == "medium"
    assert [t["function"]["name"] for t in chat.body["tools"]] == ["Bash", "Read"]
    assert chat.dropped_tools == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ("text", "body"),
        ({"max_tokens": 5, "messages": [user("x")]}, "model"),
        (request(model=""), "model"),
        (request(model=7), "model"),
        (request(max_tokens=None), "max_tokens"),
        (request(max_tokens=0), "max_tokens"),
        (request(max_tokens="100"), "max_tokens"),
        (request(max_tokens=True), "max_tokens"),
        (request(max_tokens=1.5), "max_tokens"),
        (request(messages=[]), "messages"),
        (request(messages={"role": "user"}), "messages"),
        (request(messages=["hi"]), "messages.0"),
        (request(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
        (request(messages=[user(5)]), "messages.0"),
        (request(messages=[user([text("a"), "b"])]), "messages.0.content.1"),
        (request(messages=[assistant([image(PNG_SOURCE)])]), "messages.0.content.0.type"),
        (request(messages=[assistant([tool_use("", "Read", {})])]), "messages.0.content.0.id"),
        (request(messages=[assistant([tool_use("t", "", {})])]), "messages.0.content.0.name"),
        (request(messages=[assistant([tool_use("t", "R", [])])]), "messages.0.content.0.input"),
        (request(messages=[user([tool_result(5)])]), "messages.0.content.0.tool_use_id"),
        (request(messages=[user([tool_result("t", 5)])]), "messages.0.content.0.content"),
        (request(messages=[user([tool_result("t", "x", is_error="yes")])]), "is_error"),
        (
            request(messages=[user([tool_result("t", [{"type": "video"}])])]),
            "content.0.content.0.type",
        ),
        (request(system=5), "system"),
        (request(system=[image(PNG_SOURCE)]), "system.0.type"),
        (request(tools={"Read": READ}), "tools"),
        (request(tools=[{"name": "Read"}]), "tools.0.input_schema"),
        (request(tools=[{**READ, "name": ""}]), "tools.0.name"),
        (request(tools=[{**READ, "type": 3}]), "tools.0.type"),
        (request(tools=["Read"]), "tools.0"),
        (request(tools=[READ], tool_choice="auto"), "tool_choice"),
        (request(tools=[READ], tool_choice={"type": "maybe"}), "tool_choice.type"),
        (request(tools=[READ], tool_choice={"type": "tool"}), "tool_choice.name"),
        (
            request(tools=[READ], tool_choice={"type": "auto", "disable_parallel_tool_use": 1}),
            "disable_parallel",
        ),
        (request(temperature="hot"), "temperature"),
        (request(top_k=True), "top_k"),
        (request(stop_sequences="END"), "stop_sequences"),
        (request(stop_sequences=[1]), "stop_sequences"),
        (request(stream="yes"), "stream"),
        (request(metadata="me"), "metadata"),
        (request(metadata={"user_id": 5}), "metadata.user_id"),
        (request(thinking={"type": "enabled"}), "thinking.budget_tokens"),
        (request(thinking={"type": "sometimes"}), "thinking.type"),
        (request(thinking="on"), "thinking.type"),
        (request(output_config=[]), "output_config"),
        (request(output_config={"format": {"type": "json_object"}}), "output_config.format"),
    ],
)
def test_malformed_requests_are_400s_naming_the_field(body: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_request(body)
    assert caught.value.status == 400
    if field != "body":
        assert field in caught.value.message


# Any JSON at all: a 400 or a body, never a crash.
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
_KEYS = [
    *("model", "max_tokens", "messages", "system", "tools", "tool_choice", "thinking", "stream"),
    *("metadata", "stop_sequences", "output_config", "temperature", "role", "content", "type"),
    *("text", "source", "tool_use_id", "input", "name", "id", "is_error", "input_schema"),
]


def _valid_body() -> JSONDict:
    """A fresh copy each time: mutations must not reach the shared constants."""
    body = request(
        system=[text("sys")],
        tools=[READ, {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "auto"},
        thinking={"type": "enabled", "budget_tokens": 2048},
        stream=True,
        messages=[
            user([text("hi"), image(PNG_SOURCE)]),
            assistant([text("ok"), tool_use("toolu_1", "Read", {"path": "a"})]),
            user([tool_result("toolu_1", [text("x"), image(PNG_SOURCE)]), text("more")]),
        ],
    )
    out: JSONDict = orjson.loads(orjson.dumps(body))
    return out


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(_paths(item, (*prefix, i)))
    return found


def _mutate(body: JSONDict, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = body
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return body


def _translate_or_400(body: Any) -> None:
    try:
        chat = chat_request(body)
    except InvalidRequest as exc:
        assert exc.status == 400
        return
    orjson.dumps(chat.body)  # whatever came out can be sent
    assert isinstance(estimate_input_tokens(body), int)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(_KEYS), _json, max_size=8) | _json)
def test_any_json_body_is_a_chat_body_or_a_400(body: Any) -> None:
    _translate_or_400(body)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), value=_json)
def test_a_valid_body_with_any_part_replaced_is_a_chat_body_or_a_400(data: Any, value: Any) -> None:
    body = _valid_body()
    path = data.draw(st.sampled_from(_paths(body)))
    _translate_or_400(_mutate(body, path, value))


def test_estimate_counts_what_would_be_sent() -> None:
    tools = [READ, {"type": "web_search_20250305", "name": "web_search"}]
    body = {
        "model": "qwen",  # count_tokens bodies have no max_tokens
        "system": "s" * 40,
        "tools": tools,
        "messages": [
            user([text("u" * 400), image(PNG_SOURCE), image(PNG_SOURCE)]),
            assistant(
                [{"type": "thinking", "thinking": "t" * 4000, "signature": ""}, text("a" * 80)]
            ),
        ],
    }
    function = {"name": "Read", "description": "Read a file", "parameters": READ["input_schema"]}
    chars = 40 + 400 + 80 + len(orjson.dumps(function))
    assert estimate_input_tokens(body) == chars // CHARS_PER_TOKEN + 2 * IMAGE_TOKENS
    assert CHARS_PER_TOKEN == requirements.CHARS_PER_TOKEN
    with pytest.raises(InvalidRequest, match="messages"):
        estimate_input_tokens({"model": "qwen", "messages": "hi"})


# --- answers -----------------------------------------------------------------------------------


def completion(message: JSONDict, finish: str | None = "stop", **extra: Any) -> JSONDict:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
    out: JSONDict = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "q"}
    return {**out, "choices": [choice], **extra}


def answer(body: JSONDict, model: str = "claude-sonnet-4-5") -> JSONDict:
    message = message_response(body, model)
    anthropic_spec.validate("Message", message)
    return message


def call(id_: Any, name: str, arguments: Any) -> JSONDict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_an_answer_with_reasoning_text_and_tool_calls() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 50,
        "total_tokens": 1050,
        "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 100},
    }
    message = answer(
        completion(
            {
                "content": "Reading it.",
                "reasoning_content": "I should read.",
                "tool_calls": [
                    call("call_1", "Read", '{"path": "a"}'),
                    call("call.2", "Read", "{}"),
                ],
            },
            "tool_calls",
            usage=usage,
        )
    )
    assert message["id"] == "msg_chatcmpl-1"
    assert message["model"] == "claude-sonnet-4-5"
    assert message["content"] == [
        {"type": "thinking", "thinking": "I should read.", "signature": ""},
        {"type": "text", "text": "Reading it.", "citations": None},
        {
            "type": "tool_use",
            "id": "call_1",
            "name": "Read",
            "input": {"path": "a"},
            "caller": {"type": "direct"},
        },
        {
            "type": "tool_use",
            "id": "call_2",
            "name": "Read",
            "input": {},
            "caller": {"type": "direct"},
        },
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["stop_sequence"] is None
    assert message["usage"]["input_tokens"] == 300
    assert message["usage"]["output_tokens"] == 50
    assert message["usage"]["cache_read_input_tokens"] == 600
    assert message["usage"]["cache_creation_input_tokens"] == 100


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
        ("something_new", "end_turn"),
    ],
)
def test_stop_reasons(finish: str | None, stop: str) -> None:
    assert answer(completion({"content": "x"}, finish))["stop_reason"] == stop


def test_stop_reasons_invert_the_outbound_table() -> None:
    for finish, stop in STOP_REASONS.items():
        if finish != "function_call":  # the legacy name: the same as tool_calls
            assert FINISH_REASONS[stop] == finish


def test_a_tool_call_answered_with_finish_stop_is_tool_use() -> None:
    """Ollama says "stop" after a tool call; Anthropic clients wait for "tool_use"."""
    body = completion({"content": None, "tool_calls": [call("c1", "Read", "{}")]}, "stop")
    assert answer(body)["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ("", {}),
        (None, {}),
        ('{"a": [1, 2]}', {"a": [1, 2]}),
        ({"a": 1}, {"a": 1}),
        ("{not json", {"_raw_arguments": "{not json"}),
        ("[1, 2]", {"_raw_arguments": "[1, 2]"}),
        ('"text"', {"_raw_arguments": '"text"'}),
    ],
)
def test_tool_arguments_become_an_input_object(arguments: Any, expected: JSONDict) -> None:
    [block] = answer(completion({"content": None, "tool_calls": [call("c", "f", arguments)]}))[
        "content"
    ]
    assert block["input"] == expected


def test_missing_ids_names_and_fields_still_make_a_valid_message() -> None:
    body = completion({"content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}, None)
    del body["id"]
    message = answer(body)
    assert message["id"].startswith("msg_")
    [block] = message["content"]
    assert block["id"].startswith("toolu_")
    assert block["name"]
    assert answer({})["content"] == []
    assert answer({"choices": [None], "usage": "lots"})["usage"]["input_tokens"] == 0
    refusal = answer(completion({"content": None, "refusal": "I can't."}, "content_filter"))
    assert refusal["content"][0]["text"] == "I can't."
    assert refusal["stop_reason"] == "refusal"


_ids = st.from_regex(r"[a-zA-Z0-9_-]{1,24}", fullmatch=True)
_inputs = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=12,
    ),
    max_size=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(st.tuples(_ids, _ids, _inputs), min_size=1, max_size=4, unique_by=lambda c: c[0])
)
def test_tool_use_input_survives_the_round_trip(calls: list[tuple[str, str, JSONDict]]) -> None:
    """Messages tool_use -> chat tool_calls -> (the backend repeats them) -> tool_use again."""
    blocks = [tool_use(id_, name, input_) for id_, name, input_ in calls]
    chat = chat_request(request(messages=[user("go"), assistant(blocks), user("ok")]))
    tool_calls = chat.body["messages"][1]["tool_calls"]
    message = answer(completion({"content": None, "tool_calls": tool_calls}, "tool_calls"))
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == calls


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "sent", "kind"),
    [
        (400, 400, "invalid_request_error"),
        (401, 401, "authentication_error"),
        (402, 402, "billing_error"),
        (403, 403, "permission_error"),
        (404, 404, "not_found_error"),
        (405, 405, "invalid_request_error"),
        (408, 408, "timeout_error"),
        (413, 413, "request_too_large"),
        (415, 415, "invalid_request_error"),
        (429, 429, "rate_limit_error"),
        (500, 500, "api_error"),
        (501, 500, "api_error"),
        (502, 529, "overloaded_error"),
        (503, 529, "overloaded_error"),
        (504, 504, "timeout_error"),
        (200, 500, "api_error"),
    ],
)
def test_error_bodies(status: int, sent: int, kind: str) -> None:
    got, body = error_body(status, "Nope", request_id="req_1")
    assert got == sent
    envelope = orjson.loads(body)
    assert envelope == {
        "type": "error",
        "error": {"type": kind, "message": "Nope"},
        "request_id": "req_1",
    }
    if kind != "request_too_large":  # documented by Anthropic, missing from the spec's enum
        anthropic_spec.validate("ErrorResponse", envelope)


# --- streams -----------------------------------------------------------------------------------


def chunk(delta: JSONDict, finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "q",
        "choices": [choice],
    }
    return b"data: " + orjson.dumps({**body, **extra}) + b"\n\n"


def usage_chunk(prompt: int, completion: int, cached: int = 0) -> bytes:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    body = {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "q",
        "choices": [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"
_STREAM_EVENTS = {
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
}


def events_of(data: bytes) -> list[JSONDict]:
    """Parse Anthropic SSE, checking each event's name, its spec schema and the framing."""
    assert data.endswith(b"\n\n") or not data
    out = []
    for raw in data.split(b"\n\n")[:-1]:
        name_line, data_line = raw.split(b"\n")
        name = name_line.removeprefix(b"event: ").decode()
        event = orjson.loads(data_line.removeprefix(b"data: "))
        assert event["type"] == name
        if name in _STREAM_EVENTS:
            anthropic_spec.validate("MessageStreamEvent", event)
        elif name == "error":
            anthropic_spec.validate("ErrorResponse", event)
        else:
            assert event == {"type": "ping"}
        out.append(event)
    return out


def run(items: list[bytes], *, grouping: str = "event", finish: bool = True) -> list[JSONDict]:
    stream = MessagesStream("claude-sonnet-4-5", 120)
    data = b"".join(items)
    if grouping == "event":
        pieces = items
    elif grouping == "all":
        pieces = [data]
    else:
        pieces = [data[i : i + 1] for i in range(len(data))]
    out = b"".join(stream.feed(piece) for piece in pieces)
    if finish:
        out += stream.finish()
    return events_of(out)


def kinds(events: list[JSONDict]) -> list[str]:
    return [
        e["type"] + (f":{e['delta']['type']}" if e["type"] == "content_block_delta" else "")
        for e in events
    ]


TEXT_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hello"}),
    chunk({"content": " there"}),
    chunk({}, "stop"),
    usage_chunk(200, 7, cached=50),
    DONE,
]


@pytest.mark.parametrize("grouping", ["event", "all", "byte"])
def test_a_text_stream_in_anthropics_exact_sequence(grouping: str) -> None:
    events = run(TEXT_STREAM, grouping=grouping)
    assert kinds(events) == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta:text_delta",
        "content_block_delta:text_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0]["message"]
    assert start["id"] == "msg_chatcmpl-9"
    assert start["model"] == "claude-sonnet-4-5"
    assert start["content"] == []
    assert (start["usage"]["input_tokens"], start["usage"]["output_tokens"]) == (120, 0)
    assert events[2] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": "", "citations": None},
    }
    assert [e["delta"]["text"] for e in events[3:5]] == ["Hello", " there"]
    assert events[5] == {"type": "content_block_stop", "index": 0}
    delta = events[6]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["delta"]["stop_sequence"] is None
    assert delta["usage"]["output_tokens"] == 7
    assert delta["usage"]["input_tokens"] == 150
    assert delta["usage"]["cache_read_input_tokens"] == 50


def test_thinking_text_and_streamed_tool_calls_as_blocks_in_turn() -> None:
    def tool(index: int, **function: Any) -> JSONDict:
        return {"index": index, "function": function}

    items = [
        chunk({"role": "assistant", "reasoning_content": "Let me"}),
        chunk({"reasoning_content": " think."}),
        chunk({"content": "Reading both."}),
        chunk(
            {
                "tool_calls": [
                    {**tool(0, name="Read", arguments=""), "id": "call_a", "type": "function"}
                ]
            }
        ),
        chunk({"tool_calls": [tool(0, arguments='{"pa')]}),
        chunk({"tool_calls": [tool(0, arguments='th": "a"}')]}),
        chunk(
            {"tool_calls": [{**tool(1, name="Read", arguments='{"path": "b"}'), "id": "call_b"}]}
        ),
        chunk({}, "tool_calls"),
        usage_chunk(300, 40),
        DONE,
    ]
    for grouping in ("event", "all", "byte"):
        events = run(items, grouping=grouping)
        assert kinds(events) == [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta:thinking_delta",
            "content_block_delta:thinking_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta:text_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta:input_json_delta",
            "content_block_delta:input_json_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta:input_json_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        starts = [e for e in events if e["type"] == "content_block_start"]
        assert [e["index"] for e in starts] == [0, 1, 2, 3]
        assert starts[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
        assert starts[2]["content_block"] == {
            "type": "tool_use",
            "id": "call_a",
            "name": "Read",
            "input": {},
            "caller": {"type": "direct"},
        }
        assert starts[3]["content_block"]["id"] == "call_b"
        fragments = [
            e["delta"]["partial_json"]
            for e in events
            if e.get("index") == 2 and e["type"] == "content_block_delta"
        ]
        assert orjson.loads("".join(fragments)) == {"path": "a"}
        assert events[-2]["delta"]["stop_reason"] == "tool_use"
        assert events[-2]["usage"]["output_tokens"] == 40


def test_a_tool_call_whose_name_comes_late_starts_when_named() -> None:
    items = [
        chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"arguments": '{"x"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ": 1}"}}]}),
        chunk({}, "stop"),
        DONE,
    ]
    events = run(items)
    start = next(e for e in events if e["type"] == "content_block_start")
    assert start["content_block"]["name"] == "f"
    deltas = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert orjson.loads("".join(deltas)) == {"x": 1}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"  # Ollama's "stop" after a call


def test_without_usage_the_output_is_estimated_and_input_left_null() -> None:
    events = run([chunk({"content": "abcdefgh"}), chunk({}, "length"), DONE])
    delta = events[-2]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["output_tokens"] == 8 // CHARS_PER_TOKEN
    assert delta["usage"]["input_tokens"] is None


def test_an_empty_answer_is_still_a_whole_message() -> None:
    assert kinds(run([DONE])) == ["message_start", "ping", "message_delta", "message_stop"]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (
            {"message": "busy", "type": "service_unavailable", "code": "service_unavailable"},
            "overloaded_error",
        ),
        ({"message": "cut", "type": "server_error", "code": "bad_gateway"}, "api_error"),
        ({"message": "slow", "type": "server_error", "code": "gateway_timeout"}, "timeout_error"),
        ({"message": "limit", "type": "rate_limit_error", "code": None}, "rate_limit_error"),
        (
            {"message": "bad", "type": "invalid_request_error", "code": "context_length_exceeded"},
            "invalid_request_error",
        ),
        ({"message": "odd", "type": "weird", "code": 5}, "api_error"),
    ],
)
def test_an_openai_error_event_ends_the_stream_with_an_anthropic_error(
    error: JSONDict, kind: str
) -> None:
    stream = MessagesStream("m", 10, request_id="req_7")
    first = events_of(stream.feed(chunk({"content": "Hi"})))
    assert kinds(first)[:2] == ["message_start", "ping"]
    failed = events_of(stream.feed(b"data: " + orjson.dumps({"error": error}) + b"\n\n" + DONE))
    assert failed == [
        {
            "type": "error",
            "error": {"type": kind, "message": error["message"]},
            "request_id": "req_7",
        }
    ]
    assert stream.error == failed[0]
    assert stream.feed(chunk({"content": "more"})) == b""
    assert stream.finish() == b""


@pytest.mark.parametrize(
    "tail",
    [b"", b"data: {broken\n\n", b"data: [1, 2]\n\n", b'data: {"choices": [] '],
)
def test_a_stream_cut_short_or_broken_ends_with_an_error(tail: bytes) -> None:
    events = run([chunk({"content": "Hi"}), tail])
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error"
    assert [e["type"] for e in events].count("error") == 1


def test_a_stream_whose_done_lacks_its_blank_line_still_ends_well() -> None:
    events = run([chunk({"content": "Hi"}), b"data: [DONE]"])
    assert events[-1] == {"type": "message_stop"}


def test_nothing_after_message_stop_and_start_is_sent_once() -> None:
    stream = MessagesStream("m", 5)
    head = stream.start("msg_given")
    assert events_of(head)[0]["message"]["id"] == "msg_given"
    assert head.endswith(PING)
    assert stream.start() == b""
    rest = events_of(stream.feed(chunk({"content": "x"}) + DONE))
    assert rest[0]["type"] == "content_block_start"
    assert stream.feed(chunk({"content": "late"})) == b""
    assert stream.finish() == b""


def test_an_event_that_never_ends_is_bounded() -> None:
    stream = MessagesStream("m", 5)
    out = stream.feed(b"data: " + b"x" * (2 * 1024 * 1024))
    assert events_of(out)[-1]["error"]["type"] == "api_error"


_chunks = st.fixed_dictionaries(
    {},
    optional={
        "id": _json,
        "usage": _json,
        "error": _json,
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "finish_reason": st.sampled_from(["stop", "length", "tool_calls"]) | _json,
                    "delta": st.fixed_dictionaries(
                        {},
                        optional={
                            "content": st.text(max_size=5) | _json,
                            "reasoning_content": st.text(max_size=5) | _json,
                            "tool_calls": st.lists(
                                st.fixed_dictionaries(
                                    {},
                                    optional={
                                        "index": st.integers(0, 2) | _json,
                                        "id": _ids | _json,
                                        "function": st.fixed_dictionaries(
                                            {},
                                            optional={
                                                "name": _ids | _json,
                                                "arguments": st.text(max_size=5) | _json,
                                            },
                                        ),
                                    },
                                ),
                                max_size=2,
                            ),
                        },
                    ),
                },
            )
            | _json,
            max_size=2,
        ),
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_chunks | _json, max_size=6), done=st.booleans())
def test_any_chunks_give_valid_anthropic_events(items: list[Any], done: bool) -> None:
    events = [b"data: " + orjson.dumps(item) + b"\n\n" for item in items]
    out = run([*events, DONE] if done else events, grouping="all")
    assert out[-1]["type"] in ("message_stop", "error")
    assert sum(e["type"] in ("message_stop", "error") for e in out) == 1


def _sdk_stream(items: list[bytes]) -> Any:
    """The official SDK reading what MessagesStream makes of ``items`` (no server: the stream
    translation alone; the endpoint's own tests go through real sockets)."""
    anthropic = pytest.importorskip("anthropic")
    httpx2 = pytest.importorskip("httpx2")

    def handler(request: Any) -> Any:
        stream = MessagesStream("claude-sonnet-4-5", 3)
        body = b"".join(stream.feed(item) for item in items) + stream.finish()
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    transport = httpx2.MockTransport(handler)
    client = anthropic.Anthropic(
        api_key="k",
        base_url="http://nexus.invalid",
        http_client=anthropic.DefaultHttpxClient(transport=transport),
        max_retries=0,
    )
    with client.messages.stream(model="m", max_tokens=9, messages=[user("x")]) as stream:
        return stream.get_final_message()


def test_the_anthropic_sdk_accumulates_the_stream() -> None:
    items = [
        chunk({"reasoning_content": "hm"}),
        chunk({"content": "Reading."}),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "function": {"name": "Read", "arguments": '{"pa'}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'th": "a"}'}}]}),
        chunk({}, "tool_calls"),
        usage_chunk(10, 5),
        DONE,
    ]
    message = _sdk_stream(items)
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[2].input == {"path": "a"}
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 5)


def test_the_anthropic_sdk_raises_the_error_event() -> None:
    anthropic = pytest.importorskip("anthropic")
    error = {
        "message": "All backends are busy",
        "type": "service_unavailable",
        "code": "service_unavailable",
    }
    with pytest.raises(anthropic.APIStatusError, match="All backends are busy"):
        _sdk_stream(
            [chunk({"content": "Hi"}), b"data: " + orjson.dumps({"error": error}) + b"\n\n", DONE]
        )
