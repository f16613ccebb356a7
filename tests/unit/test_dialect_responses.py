"""OpenAI Responses <-> chat translation (issue 11, point 2): every request body checked against
OpenAI's published ``CreateResponse`` and its translation against ``CreateChatCompletionRequest``;
every answer and stream event against ``Response`` and the ``Response*Event`` schemas."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus.dialects.responses import (
    InboundChat,
    ResponsesStream,
    chat_request,
    output_items,
    response_object,
)
from nexus.errors import InvalidRequest
from tests.contract import openapi

JSONDict = dict[str, Any]
RID = "resp_abc123"
PNG = "data:image/png;base64,iVBORw0KGgo="


def valid_request(body: JSONDict) -> None:
    """``body`` fits ``CreateResponse``. The spec's ``InputItem`` is a oneOf whose branches
    overlap (a typed user message is both an ``EasyInputMessage`` and an ``InputMessage``; the
    discriminator, which jsonschema ignores, picks one): "valid under each of" is no violation."""
    items = body.get("input")
    if not isinstance(items, list):
        openapi.validate("CreateResponse", body)
        return
    openapi.validate("CreateResponse", {**body, "input": []})
    for item in items:
        problems = [
            e for e in openapi.errors("InputItem", item) if "is valid under each of" not in e
        ]
        assert not problems, problems


def translate(body: JSONDict, history: list[JSONDict] | None = None) -> InboundChat:
    """The translation of a spec-valid ``body``, itself a valid chat request."""
    valid_request(body)
    inbound = chat_request(body, history)
    openapi.validate("CreateChatCompletionRequest", inbound.body)
    return inbound


def rejected(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        chat_request(body)
    return caught.value


def answer(completion: JSONDict | None, request: JSONDict, **kwargs: Any) -> JSONDict:
    out = response_object(completion, request, RID, 1700000000, **kwargs)
    openapi.validate("Response", out)
    return out


def completion(message: JSONDict, finish: str = "stop", usage: JSONDict | None = None) -> JSONDict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "backend-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def fn(name: str, **extra: Any) -> JSONDict:
    params = {"type": "object", "properties": {"path": {"type": "string"}}}
    return {"type": "function", "name": name, "parameters": params, "strict": False, **extra}


def chat_fn(name: str, **extra: Any) -> JSONDict:
    params = {"type": "object", "properties": {"path": {"type": "string"}}}
    return {
        "type": "function",
        "function": {"name": name, "parameters": params, "strict": False, **extra},
    }


def call_item(call_id: str, name: str, arguments: str, **extra: Any) -> JSONDict:
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        **extra,
    }


def text_item(role: str, *texts: str) -> JSONDict:
    return {
        "type": "message",
        "role": role,
        "content": [{"type": "input_text", "text": t} for t in texts],
    }


def said(text: str) -> JSONDict:
    """An assistant message as the API returned it (an output item passed back)."""
    return {
        "type": "message",
        "id": "msg_0",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def tool_call(id_: str, name: str, arguments: str) -> JSONDict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- requests: input ---------------------------------------------------------------------------


def test_string_input_and_instructions_become_system_and_user() -> None:
    inbound = translate({"model": "m", "instructions": "Be brief.", "input": "Hi"})
    assert inbound.body == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    }
    assert inbound.dropped_tools == []
    assert inbound.input_items == [{"type": "message", "role": "user", "content": "Hi"}]


def test_message_items_roles_and_parts() -> None:
    body = {
        "model": "m",
        "instructions": "Rules.",
        "input": [
            text_item("developer", "Be terse.", "Use French."),
            {"role": "user", "content": "Role-only item"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Look"},
                    {"type": "input_image", "image_url": PNG, "detail": "low"},
                    {
                        "type": "input_file",
                        "filename": "a.pdf",
                        "file_data": "data:application/pdf;base64,JVBE",
                    },
                ],
            },
            said("Voilà"),
            {"role": "system", "content": "Late rule"},
        ],
    }
    inbound = translate(body)
    assert inbound.body["messages"] == [
        {"role": "system", "content": "Rules.\n\nBe terse.\n\nUse French."},
        {"role": "user", "content": "Role-only item"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                {
                    "type": "file",
                    "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"},
                },
            ],
        },
        {"role": "assistant", "content": "Voilà"},
        {"role": "system", "content": "Late rule"},
    ]
    # role-only items are stored as messages
    assert inbound.input_items[1] == {
        "type": "message",
        "role": "user",
        "content": "Role-only item",
    }


def test_assistant_refusal_part_becomes_text() -> None:
    item = {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "refusal", "refusal": "I can't."}],
    }
    inbound = translate({"model": "m", "input": [item, {"role": "user", "content": "Why?"}]})
    assert inbound.body["messages"][0] == {"role": "assistant", "content": "I can't."}


def test_function_calls_merge_into_the_assistant_turn_and_outputs_become_tool_messages() -> None:
    body = {
        "model": "m",
        "input": [
            {"role": "user", "content": "Read both"},
            said("Reading."),
            call_item("call_1", "read", '{"path":"a"}', id="fc_1", status="completed"),
            call_item("call_2", "read", '{"path":"b"}'),
            {"type": "function_call_output", "call_id": "call_1", "output": "A"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [
                    {"type": "input_text", "text": "B1"},
                    {"type": "input_text", "text": "B2"},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            call_item("call_3", "read", "{}"),
        ],
        "tools": [fn("read")],
    }
    inbound = translate(body)
    assert inbound.body["messages"] == [
        {"role": "user", "content": "Read both"},
        {
            "role": "assistant",
            "content": "Reading.",
            "tool_calls": [
                tool_call("call_1", "read", '{"path":"a"}'),
                tool_call("call_2", "read", '{"path":"b"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "A"},
        {"role": "tool", "tool_call_id": "call_2", "content": "B1B2"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("call_3", "read", "{}")]},
    ]
    assert all(item["type"] != "reasoning" for item in inbound.input_items)


def test_history_goes_before_the_input() -> None:
    first = {"model": "m", "instructions": "Sys", "input": "Read a", "tools": [fn("read")]}
    inbound = translate(first)
    done = answer(
        completion(
            {"role": "assistant", "content": None, "tool_calls": [tool_call("c1", "read", "{}")]},
            "tool_calls",
        ),
        first,
    )
    history = inbound.input_items + output_items(done)
    second = {
        "model": "m",
        "instructions": "Sys",
        "previous_response_id": RID,
        "input": [{"type": "function_call_output", "call_id": "c1", "output": "A"}],
        "tools": [fn("read")],
    }
    assert translate(second, history).body["messages"] == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Read a"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("c1", "read", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
    ]


def test_output_items_keep_messages_and_calls_and_drop_reasoning() -> None:
    request = {"model": "m", "input": "x"}
    done = answer(
        completion(
            {
                "role": "assistant",
                "content": "Sure",
                "reasoning_content": "think",
                "tool_calls": [tool_call("c1", "read", "{}")],
            },
            "tool_calls",
        ),
        request,
    )
    assert [item["type"] for item in done["output"]] == ["reasoning", "message", "function_call"]
    assert [item["type"] for item in output_items(done)] == ["message", "function_call"]


# --- requests: tools and options ---------------------------------------------------------------


CODEX_TOOLS: list[JSONDict] = [
    fn("exec_command", description="Run a command"),
    {
        "type": "namespace",
        "name": "mcp__fs__",
        "description": "File server",
        "tools": [fn("read_file"), {"type": "custom", "name": "patch"}],
    },
    {"type": "namespace", "name": "crm", "description": "CRM", "tools": [fn("lookup")]},
    {"type": "web_search"},
    {"type": "web_search_preview"},
    {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "image_generation"},
    {"type": "local_shell"},
    {"type": "custom", "name": "apply_patch"},
    {"type": "web_search"},
]


def test_function_tools_pass_namespaces_flatten_and_hosted_tools_are_dropped() -> None:
    inbound = translate({"model": "m", "input": "x", "tools": CODEX_TOOLS})
    assert inbound.body["tools"] == [
        chat_fn("exec_command", description="Run a command"),
        chat_fn("mcp__fs__read_file"),
        chat_fn("crm__lookup"),
    ]
    assert inbound.dropped_tools == [
        "mcp__fs__patch",
        "web_search",
        "web_search_preview",
        "file_search",
        "code_interpreter",
        "image_generation",
        "local_shell",
        "apply_patch",
    ]


def test_a_codex_request() -> None:
    """The shape Codex CLI sends (real-components.md section 7): no instructions, a developer
    item, store false, encrypted reasoning asked for, a namespace tool and web_search."""
    body = {
        "model": "my-model",
        "instructions": None,
        "input": [
            text_item("developer", "You are Codex."),
            text_item("user", "<environment_context>cwd=/tmp</environment_context>", "List files"),
            call_item("call_1", "exec_command", '{"cmd":"ls"}', id="fc_9", status="completed"),
            {"type": "function_call_output", "call_id": "call_1", "output": "a.txt", "id": None},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        ],
        "tools": CODEX_TOOLS[:4],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0193-session",
        "text": {"verbosity": "medium"},
    }
    inbound = translate(body)
    assert [m["role"] for m in inbound.body["messages"]] == ["system", "user", "assistant", "tool"]
    assert inbound.body["messages"][1]["content"] == [
        {"type": "text", "text": "<environment_context>cwd=/tmp</environment_context>"},
        {"type": "text", "text": "List files"},
    ]
    assert inbound.body["tool_choice"] == "auto" and inbound.body["parallel_tool_calls"] is False
    assert inbound.body["reasoning_effort"] == "medium"
    assert inbound.dropped_tools == ["mcp__fs__patch", "web_search"]


def test_dropped_tool_names_are_safe_for_a_header() -> None:
    tools = [{"type": "custom", "name": "evil\r\nX-Injected: 1"}, {"type": "w\u00e9b" * 40}]
    dropped = chat_request({"model": "m", "input": "x", "tools": tools}).dropped_tools
    assert dropped == ["evil__X-Injected:_1", ("w_b" * 40)[:64]]


def test_function_tool_without_parameters_gets_an_empty_object_schema() -> None:
    out = translate(
        {
            "model": "m",
            "input": "x",
            "tools": [{"type": "function", "name": "now", "strict": None, "parameters": None}],
        }
    )
    assert out.body["tools"] == [
        {
            "type": "function",
            "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
        }
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        (
            {"type": "function", "name": "exec_command"},
            {"type": "function", "function": {"name": "exec_command"}},
        ),
        (
            {"type": "function", "name": "crm__lookup"},
            {"type": "function", "function": {"name": "crm__lookup"}},
        ),
    ],
)
def test_tool_choice_forms(choice: Any, expected: Any) -> None:
    out = translate({"model": "m", "input": "x", "tools": CODEX_TOOLS, "tool_choice": choice})
    assert out.body["tool_choice"] == expected


def test_allowed_tools_narrow_the_tools() -> None:
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "exec_command"}, {"type": "web_search"}],
    }
    out = translate({"model": "m", "input": "x", "tools": CODEX_TOOLS, "tool_choice": choice})
    assert out.body["tools"] == [chat_fn("exec_command", description="Run a command")]
    assert out.body["tool_choice"] == "required"


def test_only_hosted_tools_leave_no_tools_and_no_choice() -> None:
    out = translate(
        {
            "model": "m",
            "input": "x",
            "tools": [{"type": "web_search"}],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
        }
    )
    assert "tools" not in out.body and "tool_choice" not in out.body
    assert "parallel_tool_calls" not in out.body
    assert out.dropped_tools == ["web_search"]


@pytest.mark.parametrize(
    "choice",
    [
        {"type": "function", "name": "apply_patch"},
        {"type": "custom", "name": "apply_patch"},
        {"type": "web_search_preview"},
        {"type": "file_search"},
        {"type": "mcp", "server_label": "x"},
        {"type": "function", "name": "nope"},
    ],
)
def test_tool_choice_naming_a_dropped_or_unknown_tool_is_refused(choice: JSONDict) -> None:
    body = {"model": "m", "input": "x", "tools": CODEX_TOOLS, "tool_choice": choice}
    valid_request(body)
    assert rejected(body).param == "tool_choice"


def test_required_tool_choice_without_function_tools_is_refused() -> None:
    error = rejected(
        {"model": "m", "input": "x", "tools": [{"type": "web_search"}], "tool_choice": "required"}
    )
    assert error.param == "tool_choice" and "web_search" in error.message


def test_options_map_to_chat() -> None:
    body = {
        "model": "m",
        "input": "x",
        "tools": [fn("read")],
        "parallel_tool_calls": False,
        "max_output_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.9,
        "text": {
            "format": {
                "type": "json_schema",
                "name": "out",
                "schema": {"type": "object"},
                "strict": True,
            },
            "verbosity": "low",
        },
        "reasoning": {"effort": "high", "summary": "auto"},
        "stream": True,
        "safety_identifier": "user-1",
        "store": False,
        "previous_response_id": None,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "k",
        "metadata": {"a": "b"},
        "truncation": "disabled",
        "service_tier": "auto",
        "top_logprobs": 2,
    }
    out = translate(body).body
    out.pop("messages")
    out.pop("tools")
    assert out == {
        "model": "m",
        "parallel_tool_calls": False,
        "max_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.9,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
        },
        "reasoning_effort": "high",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "user-1",
    }


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [({"type": "json_object"}, {"type": "json_object"}), ({"type": "text"}, None)],
)
def test_text_formats(fmt: JSONDict, expected: JSONDict | None) -> None:
    out = translate({"model": "m", "input": "x", "text": {"format": fmt}, "user": "u"}).body
    assert out.get("response_format") == expected
    assert out["user"] == "u"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"input": "x"}, "model"),
        ({"model": 3, "input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": 5}, "input"),
        ({"model": "m", "input": "x", "background": True}, "background"),
        ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
        ({"model": "m", "input": "x", "prompt": {"id": "p"}}, "prompt"),
        ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"model": "m", "input": [{"type": "reasoning", "summary": []}, {"id": "m"}]}, "input[1]"),
        ({"model": "m", "input": [{"type": "reasoning", "id": "rs", "summary": []}]}, "input"),
        ({"model": "m", "input": [{"id": "msg_1"}]}, "input[0]"),
        ({"model": "m", "input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type"),
        ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"model": "m", "input": [{"role": "user", "content": 3}]}, "input[0].content"),
        (
            {
                "model": "m",
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "file_id": "file_1", "detail": "auto"}],
                    }
                ],
            },
            "input[0].content[0].file_id",
        ),  # fmt: skip
        (
            {
                "model": "m",
                "input": [
                    {"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}
                ],
            },
            "input[0].content[0]",
        ),  # fmt: skip
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "input[0].content[0].type",
        ),  # fmt: skip
        (
            {
                "model": "m",
                "input": [
                    {"role": "system", "content": [{"type": "input_image", "image_url": PNG}]}
                ],
            },
            "input[0].content",
        ),  # fmt: skip
        (
            {"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
            "input[0].arguments",
        ),  # fmt: skip
        (
            {"model": "m", "input": [{"type": "function_call_output", "output": "x"}]},
            "input[0].call_id",
        ),
        (
            {
                "model": "m",
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image", "image_url": PNG}],
                    }
                ],
            },
            "input[0].output[0]",
        ),  # fmt: skip
        ({"model": "m", "input": "x", "tools": {}}, "tools"),
        ({"model": "m", "input": "x", "tools": [{"name": "f"}]}, "tools[0]"),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"model": "m", "input": "x", "tools": [fn("f"), fn("f")]}, "tools[1]"),
        ({"model": "m", "input": "x", "tools": [{"type": "namespace", "name": "n"}]}, "tools[0]"),
        ({"model": "m", "input": "x", "tools": [fn("f", parameters=[1])]}, "tools[0].parameters"),
        ({"model": "m", "input": "x", "tool_choice": 3}, "tool_choice"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "max_output_tokens": True}, "max_output_tokens"),
        ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
        (
            {"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
            "text.format.schema",
        ),  # fmt: skip
        ({"model": "m", "input": "x", "reasoning": {"effort": ["high"]}}, "reasoning.effort"),
        ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "input": "x", "instructions": ["a"]}, "instructions"),
        ({"model": "m", "input": "x", "metadata": [1]}, "metadata"),
    ],
)
def test_malformed_bodies_are_invalid_requests_naming_the_field(
    body: Any, param: str | None
) -> None:
    assert rejected(body).param == param


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(
    [
        "model", "input", "instructions", "tools", "tool_choice", "text", "reasoning", "stream",
        "max_output_tokens", "temperature", "parallel_tool_calls", "user", "background", "include",
    ]
)  # fmt: skip
_item_types = st.sampled_from(
    ["message", "function_call", "function_call_output", "reasoning", "item_reference", None]
)
_items = st.fixed_dictionaries(
    {"type": _item_types},
    optional={
        "role": st.sampled_from(["user", "assistant", "developer", "x"]) | _json,
        "content": _json,
        "call_id": _json,
        "name": _json,
        "arguments": _json,
        "output": _json,
        "id": _json,
    },  # fmt: skip
)


_tools = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "namespace", "web_search", "custom"])},
    optional={"name": _json, "tools": _json, "parameters": _json},
)


def translated_or_refused(body: Any) -> None:
    """Either a chat body (a model, messages with chat roles) or an ``InvalidRequest`` whose
    envelope is JSON; never another exception."""
    try:
        out = chat_request(body).body
    except InvalidRequest as exc:
        assert orjson.loads(exc.body())["error"]["type"] == "invalid_request_error"
        return
    assert isinstance(out["model"], str)
    assert {m["role"] for m in out["messages"]} <= {"system", "user", "assistant", "tool"}
    orjson.dumps(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _json, max_size=8) | _json)
def test_random_bodies_are_translated_or_refused(body: Any) -> None:
    translated_or_refused(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_items, max_size=5), st.lists(_json | _tools, max_size=3), _json)
def test_random_items_and_tools_are_translated_or_refused(
    items: Any, tools: Any, choice: Any
) -> None:
    translated_or_refused({"model": "m", "input": items, "tools": tools, "tool_choice": choice})


@settings(max_examples=200, deadline=None)
@given(_json, _json)
def test_random_completions_still_make_valid_responses(message: Any, usage: Any) -> None:
    body = {"choices": [{"message": message, "finish_reason": "stop"}], "usage": usage}
    out = response_object(body, {"model": "m", "input": "x"}, RID, 1)
    openapi.validate("Response", out)


# --- answers -----------------------------------------------------------------------------------


def test_text_answer_with_reasoning_and_usage() -> None:
    request = {
        "model": "alias",
        "instructions": "Sys",
        "input": "Hi",
        "temperature": 0.5,
        "metadata": {"k": "v"},
    }
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    out = answer(
        completion(
            {"role": "assistant", "content": "Hello", "reasoning_content": "hmm"}, usage=usage
        ),
        request,
    )
    assert out["status"] == "completed" and out["model"] == "alias" and out["id"] == RID
    assert (
        out["instructions"] == "Sys" and out["temperature"] == 0.5 and out["metadata"] == {"k": "v"}
    )
    assert out["output"] == [
        {
            "type": "reasoning",
            "id": "rs_abc123_0",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "hmm"}],
            "status": "completed",
        },
        {
            "type": "message",
            "id": "msg_abc123_1",
            "status": "completed",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}
            ],
        },
    ]
    assert out["usage"] == {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 2},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 19,
    }


def test_refusal_becomes_a_refusal_part() -> None:
    out = answer(
        completion({"role": "assistant", "content": None, "refusal": "No."}),
        {"model": "m", "input": "x"},
    )
    assert out["output"][0]["content"] == [{"type": "refusal", "refusal": "No."}]


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_cut_answers_are_incomplete(finish: str, reason: str) -> None:
    out = answer(
        completion({"role": "assistant", "content": "Par"}, finish), {"model": "m", "input": "x"}
    )
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": reason}
    assert out["output"][0]["status"] == "incomplete"


def test_failed_response_carries_its_error() -> None:
    out = answer(
        None,
        {"model": "m", "input": "x"},
        status="failed",
        error={"code": "server_error", "message": "down"},
    )
    assert out["status"] == "failed" and out["output"] == []
    assert out["error"] == {"code": "server_error", "message": "down"}
    # Nexus's own codes are not in the spec's list: they become the nearest one
    nexus = {
        "message": "no backend",
        "type": "service_unavailable",
        "param": None,
        "code": "service_unavailable",
    }
    assert answer(None, {"model": "m"}, status="failed", error=nexus)["error"] == {
        "code": "server_error",
        "message": "no backend",
    }
    limited = {"message": "slow down", "type": "rate_limit_error", "code": None}
    assert (
        answer(None, {"model": "m"}, status="failed", error=limited)["error"]["code"]
        == "rate_limit_exceeded"
    )


def test_function_call_round_trip_keeps_call_id_name_arguments_and_namespace() -> None:
    tools = CODEX_TOOLS
    calls = [
        call_item("call_A", "exec_command", '{"cmd":"ls"}'),
        call_item("call_B", "read_file", '{"path":"x"}', namespace="mcp__fs__"),
        call_item("call_C", "lookup", "{}", namespace="crm"),
    ]
    request = {"model": "m", "input": [{"role": "user", "content": "go"}, *calls], "tools": tools}
    chat = translate(request).body
    assert chat["messages"][1]["tool_calls"] == [
        tool_call("call_A", "exec_command", '{"cmd":"ls"}'),
        tool_call("call_B", "mcp__fs__read_file", '{"path":"x"}'),
        tool_call("call_C", "crm__lookup", "{}"),
    ]
    reply = completion(
        {"role": "assistant", "content": None, "tool_calls": chat["messages"][1]["tool_calls"]},
        "tool_calls",
    )
    items = answer(reply, request)["output"]
    assert [
        {k: item.get(k) for k in ("call_id", "name", "arguments", "namespace")} for item in items
    ] == [{k: call.get(k) for k in ("call_id", "name", "arguments", "namespace")} for call in calls]
    assert [item["id"] for item in items] == ["fc_abc123_0", "fc_abc123_1", "fc_abc123_2"]
    assert all(item["status"] == "completed" for item in items)


def test_response_echoes_request_settings() -> None:
    request = {
        "model": "m",
        "input": "x",
        "tools": CODEX_TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_output_tokens": 100,
        "top_p": 0.5,
        "text": {"format": {"type": "json_object"}},
        "reasoning": {"effort": "low"},
        "store": False,
        "previous_response_id": "resp_prev",
    }
    out = answer(completion({"role": "assistant", "content": "{}"}), request)
    assert out["tools"] == CODEX_TOOLS[:3]  # the hosted tools were not available
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert out["max_output_tokens"] == 100 and out["top_p"] == 0.5
    assert out["text"] == {"format": {"type": "json_object"}}
    assert out["reasoning"] == {"effort": "low", "summary": None}
    assert out["store"] is False and out["previous_response_id"] == "resp_prev"


# --- streams -----------------------------------------------------------------------------------


def chunk(
    delta: JSONDict | None = None, finish: str | None = None, usage: JSONDict | None = None
) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "b",
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
DONE = b"data: [DONE]\n\n"


def parse(stream: bytes) -> list[JSONDict]:
    """The events of ``stream``, each checked against the spec and against its ``event:`` line."""
    events = []
    for block in stream.split(b"\n\n"):
        if not block:
            continue
        head, data = block.split(b"\n", 1)
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        event = orjson.loads(data[6:])
        assert head[7:].decode() == event["type"]
        openapi.validate("ResponseStreamEvent", event)
        events.append(event)
    return events


def run(
    request: JSONDict, pieces: list[bytes], *, finish: bool = True
) -> tuple[list[JSONDict], ResponsesStream]:
    stream = ResponsesStream(request, RID, 1700000000)
    out = stream.start()
    for piece in pieces:
        out += stream.feed(piece)
    if finish:
        out += stream.finish()
    events = parse(out)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events, stream


def types(events: list[JSONDict]) -> list[str]:
    return [e["type"] for e in events]


TEXT = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
    chunk({}, "stop"),
    chunk(usage=USAGE),
    DONE,
]


def test_text_stream_events_and_final_response() -> None:
    request = {"model": "m", "input": "x", "stream": True}
    events, stream = run(request, TEXT)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    for event, schema in zip(
        events,
        [
            "ResponseCreatedEvent", "ResponseInProgressEvent", "ResponseOutputItemAddedEvent",
            "ResponseContentPartAddedEvent", "ResponseTextDeltaEvent", "ResponseTextDeltaEvent",
            "ResponseTextDoneEvent", "ResponseContentPartDoneEvent", "ResponseOutputItemDoneEvent",
            "ResponseCompletedEvent",
        ],
        strict=True,
    ):  # fmt: skip
        openapi.validate(schema, event)
    assert events[0]["response"]["status"] == "in_progress"
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == [
        "Hel",
        "lo",
    ]
    assert events[6]["text"] == "Hello"
    assert events[2]["item"]["status"] == "in_progress"
    final = events[-1]["response"]
    assert final == stream.final_response
    same = response_object(
        completion({"role": "assistant", "content": "Hello"}, usage=USAGE), request, RID, 1700000000
    )
    assert final == same


def test_one_item_holding_every_event_gives_the_same_stream() -> None:
    request = {"model": "m", "input": "x", "stream": True}
    one, _ = run(request, [b"".join(TEXT)])
    each, _ = run(request, TEXT)
    cut = b"".join(TEXT)
    split, _ = run(request, [cut[i : i + 7] for i in range(0, len(cut), 7)])
    assert one == each == split


def test_reasoning_then_text_stream() -> None:
    request = {"model": "m", "input": "x"}
    pieces = [
        chunk({"reasoning_content": "Let me "}),
        chunk({"reasoning_content": "think"}),
        chunk({"content": "42"}, "stop"),
        DONE,
    ]
    events, stream = run(request, pieces)
    assert types(events)[2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    for event in events:
        if event["type"].startswith("response.reasoning_text"):
            openapi.validate(
                "ResponseReasoningTextDeltaEvent"
                if event["type"].endswith("delta")
                else "ResponseReasoningTextDoneEvent",
                event,
            )
    assert stream.final_response is not None
    assert stream.final_response == response_object(
        completion(
            {"role": "assistant", "content": "42", "reasoning_content": "Let me think"}, usage=None
        )
        | {"usage": None},
        request,
        RID,
        1700000000,
    )


def test_tool_call_stream_with_fragments_and_parallel_calls() -> None:
    request = {"model": "m", "input": "x", "tools": CODEX_TOOLS}
    pieces = [
        chunk({"content": "Running."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_A",
                        "type": "function",
                        "function": {"name": "exec_command", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"cmd":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"ls"}'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_B",
                        "type": "function",
                        "function": {"name": "mcp__fs__read_file", "arguments": '{"path":"x"}'},
                    }
                ]
            }
        ),
        chunk({}, "tool_calls"),
        chunk(usage=USAGE),
        DONE,
    ]
    events, stream = run(request, pieces)
    calls = [e for e in events if e["type"].startswith("response.function_call_arguments")]
    for event in calls:
        schema = (
            "ResponseFunctionCallArgumentsDeltaEvent"
            if event["type"].endswith("delta")
            else "ResponseFunctionCallArgumentsDoneEvent"
        )
        openapi.validate(schema, event)
    assert [(e["type"].rsplit(".", 1)[1], e.get("delta") or e.get("arguments")) for e in calls] == [
        ("delta", '{"cmd":'),
        ("delta", '"ls"}'),
        ("delta", '{"path":"x"}'),
        ("done", '{"cmd":"ls"}'),
        ("done", '{"path":"x"}'),
    ]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert added[1] == {
        "type": "function_call",
        "id": "fc_abc123_1",
        "call_id": "call_A",
        "name": "exec_command",
        "arguments": "",
        "status": "in_progress",
    }
    assert added[2]["namespace"] == "mcp__fs__" and added[2]["name"] == "read_file"
    final = stream.final_response
    assert final is not None and final["status"] == "completed"
    reply = completion(
        {
            "role": "assistant",
            "content": "Running.",
            "tool_calls": [
                tool_call("call_A", "exec_command", '{"cmd":"ls"}'),
                tool_call("call_B", "mcp__fs__read_file", '{"path":"x"}'),
            ],
        },
        "tool_calls",
        USAGE,
    )
    assert final == response_object(reply, request, RID, 1700000000)
    # and the next turn sends them back as the same calls
    again = translate({"model": "m", "input": output_items(final), "tools": CODEX_TOOLS}).body
    assert again["messages"][0]["tool_calls"] == reply["choices"][0]["message"]["tool_calls"]


def test_refusal_stream() -> None:
    events, stream = run(
        {"model": "m", "input": "x"},
        [chunk({"refusal": "No"}), chunk({"refusal": "pe"}, "stop"), DONE],
    )
    assert "response.refusal.delta" in types(events)
    done = [e for e in events if e["type"] == "response.refusal.done"]
    openapi.validate("ResponseRefusalDoneEvent", done[0])
    assert done[0]["refusal"] == "Nope"
    assert stream.final_response is not None
    assert stream.final_response["output"][0]["content"] == [{"type": "refusal", "refusal": "Nope"}]


def test_cut_stream_matches_the_cut_answer() -> None:
    request = {"model": "m", "input": "x"}
    pieces = [chunk({"reasoning_content": "hmm"}), chunk({"content": "Par"}, "length"), DONE]
    _, stream = run(request, pieces)
    cut = completion({"role": "assistant", "content": "Par", "reasoning_content": "hmm"}, "length")
    expected = response_object(cut | {"usage": None}, request, RID, 1700000000)
    assert stream.final_response == expected
    assert [item["status"] for item in expected["output"]] == ["completed", "incomplete"]


def test_failure_met_by_nexus_fails_the_stream() -> None:
    stream = ResponsesStream({"model": "m", "input": "x"}, RID, 1)
    nexus = {"message": "No healthy backend", "type": "service_unavailable", "code": "x"}
    events = parse(stream.start() + stream.feed(chunk({"content": "a"})) + stream.fail(nexus))
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {
        "code": "server_error",
        "message": "No healthy backend",
    }
    assert stream.fail(nexus) == b"" and stream.finish() == b"" and stream.feed(DONE) == b""


def test_length_stream_ends_incomplete() -> None:
    events, stream = run({"model": "m", "input": "x"}, [chunk({"content": "Par"}, "length"), DONE])
    assert events[-1]["type"] == "response.incomplete"
    openapi.validate("ResponseIncompleteEvent", events[-1])
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_error_event_fails_the_response_and_nothing_follows() -> None:
    envelope = {"error": {"message": "Backend exploded", "type": "server_error", "code": "x"}}
    error = b"data: " + orjson.dumps(envelope) + b"\n\n"
    stream = ResponsesStream({"model": "m", "input": "x"}, RID, 1)
    out = stream.start() + stream.feed(
        chunk({"content": "Hal"}) + error + chunk({"content": "more"})
    )
    assert stream.feed(chunk({"content": "after"}) + DONE) == b""
    assert stream.finish() == b""
    events = parse(out)
    assert events[-1]["type"] == "response.failed"
    openapi.validate("ResponseFailedEvent", events[-1])
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "Backend exploded"}
    assert failed["output"][0]["content"][0]["text"] == "Hal"  # what came before is kept
    assert stream.final_response == failed
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_stream_ending_without_done_fails() -> None:
    events, stream = run({"model": "m", "input": "x"}, [chunk({"content": "Hal"})])
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert stream.final_response == events[-1]["response"]


def test_garbage_event_fails_the_response() -> None:
    events, _ = run({"model": "m", "input": "x"}, [b"data: {not json\n\n"], finish=False)
    assert types(events)[-1] == "response.failed"


def test_comments_and_empty_chunks_are_ignored() -> None:
    events, stream = run(
        {"model": "m", "input": "x"},
        [b": keep-alive\n\n", chunk({}), chunk({"content": "ok"}, "stop"), DONE],
    )
    assert types(events)[-1] == "response.completed"
    assert stream.final_response is not None and "usage" not in stream.final_response


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "content": st.text(max_size=5),
                "reasoning_content": st.text(max_size=5),
                "refusal": st.text(max_size=5),
                "tool_calls": st.lists(
                    st.fixed_dictionaries(
                        {"index": st.integers(0, 2)},
                        optional={
                            "id": st.text(max_size=4),
                            "function": st.fixed_dictionaries(
                                {},
                                optional={
                                    "name": st.text(max_size=4),
                                    "arguments": st.text(max_size=4),
                                },
                            ),
                        },  # fmt: skip
                    ),
                    max_size=2,
                ),
            },
        ),
        max_size=8,
    ),
    st.sampled_from(["stop", "length", "tool_calls", "content_filter"]),
)
def test_random_chunk_sequences_make_valid_increasing_streams(
    deltas: list[JSONDict], finish: str
) -> None:
    pieces = [chunk(delta) for delta in deltas] + [chunk({}, finish), chunk(usage=USAGE), DONE]
    events, stream = run({"model": "m", "input": "x", "tools": [fn("f")]}, pieces)
    assert types(events)[-1] in ("response.completed", "response.incomplete")
    assert stream.final_response is not None
    openapi.validate("Response", stream.final_response)
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    closed = sorted(e["output_index"] for e in events if e["type"] == "response.output_item.done")
    assert added == closed == list(range(len(stream.final_response["output"])))


def test_the_openai_sdk_types_accept_every_event_and_the_response() -> None:
    """The SDK's own models (stricter than the spec in places: ``cache_write_tokens``) parse all."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    request = {"model": "m", "input": "x", "tools": CODEX_TOOLS}
    call = {"index": 0, "id": "c1", "function": {"name": "crm__lookup", "arguments": "{}"}}
    pieces = [
        chunk({"reasoning_content": "hmm"}),
        chunk({"content": "Par"}),
        chunk({"refusal": "no"}),
        chunk({"tool_calls": [call]}, "tool_calls"),
        chunk(usage=USAGE),
        DONE,
    ]
    events, stream = run(request, pieces)
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    final = Response.model_validate(stream.final_response)
    assert final.output_text == "Par"
    assert final.output[-1].type == "function_call"
    assert (final.output[-1].namespace, final.output[-1].name) == ("crm", "lookup")
