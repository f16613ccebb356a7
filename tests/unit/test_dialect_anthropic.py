"""OpenAI chat <-> Anthropic Messages translation (issue 9, points 1 and 2): every request checked
against Anthropic's published schema, every answer and chunk against OpenAI's."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus.dialects.anthropic import (
    StreamTranslator,
    completion_from_message,
    messages_request,
    untranslatable,
)
from nexus.dialects.events import DONE, MAX_EVENT_BYTES
from nexus.errors import InvalidRequest
from tests.contract import anthropic_spec, openapi

JSONDict = dict[str, Any]
PNG = "iVBORw0KGgo="


def translate(body: JSONDict, default_max_tokens: int = 4096) -> JSONDict:
    """The Messages body for ``body``, which must be translatable and valid for Anthropic."""
    assert untranslatable(body) is None
    out = messages_request(body, "claude-x", default_max_tokens)
    anthropic_spec.validate("CreateMessageParams", out)
    return out


def complete(message: JSONDict) -> JSONDict:
    out = completion_from_message(message, "claude-x", created=1)
    openapi.validate("CreateChatCompletionResponse", out)
    return out


def user(content: Any) -> JSONDict:
    return {"role": "user", "content": content}


def call(id_: str, name: str, arguments: str) -> JSONDict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER: JSONDict = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


# --- requests --------------------------------------------------------------------------------


def test_system_and_developer_go_to_system_and_same_role_turns_merge() -> None:
    out = translate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                user("Hello"),
                user([{"type": "text", "text": "again"}]),
                {"role": "assistant", "content": "Bonjour"},
                user("Bye"),
            ]
        }
    )
    assert out["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "Use French."},
    ]
    assert out["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "again"}],
        },
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Bye"},
    ]
    assert out["model"] == "claude-x"
    assert out["max_tokens"] == 4096


def test_images_become_base64_and_url_sources() -> None:
    out = translate(
        {
            "messages": [
                user(
                    [
                        {"type": "text", "text": "Compare"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
                    ]
                )
            ]
        }
    )
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
    ]


def test_tools_carry_their_schema_as_input_schema() -> None:
    strict = {"type": "function", "function": {"name": "noop", "strict": True}}
    out = translate({"messages": [user("hi")], "tools": [WEATHER, strict]})
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather in a city",
            "input_schema": WEATHER["function"]["parameters"],
        },
        {"name": "noop", "input_schema": {"type": "object", "properties": {}}, "strict": True},
    ]
    assert "tool_choice" not in out


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),  # fmt: skip
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
    ],
)
def test_every_tool_choice_form(choice: Any, parallel: bool | None, expected: Any) -> None:
    body: JSONDict = {"messages": [user("hi")], "tools": [WEATHER]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body).get("tool_choice") == expected


def test_tool_calls_and_results_round_trip_into_blocks() -> None:
    out = translate(
        {
            "messages": [
                user("Weather in Paris and Oslo?"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        call("call_1", "get_weather", '{"city": "Paris"}'),
                        call("call.2", "get_weather", '{"city": "Oslo"}'),
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "call.2",
                    "content": [{"type": "text", "text": "rain"}],
                },
                user("Thanks; which is warmer?"),
            ],
            "tools": [WEATHER],
        }
    )
    assistant, results = out["messages"][1], out["messages"][2]
    assert assistant == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
    }
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {
                "type": "tool_result",
                "tool_use_id": "call_2",
                "content": [{"type": "text", "text": "rain"}],
            },
            {"type": "text", "text": "Thanks; which is warmer?"},
        ],
    }
    assert len(out["messages"]) == 3


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
def test_tool_arguments_that_are_not_a_json_object_are_a_client_error(arguments: str) -> None:
    body = {
        "messages": [user("x"), {"role": "assistant", "tool_calls": [call("c", "f", arguments)]}]
    }
    with pytest.raises(InvalidRequest, match="not a JSON object") as caught:
        messages_request(body, "claude-x", 1024)
    assert caught.value.status == 400
    assert caught.value.envelope()["error"]["type"] == "invalid_request_error"


def test_a_malformed_body_is_a_client_error_not_a_crash() -> None:
    with pytest.raises(InvalidRequest):
        messages_request({"messages": [{"role": "tool", "content": "x"}]}, "claude-x", 1024)


def test_sampling_fields_limits_and_user() -> None:
    out = translate(
        {
            "messages": [user("hi")],
            "max_tokens": 50,
            "stop": "END",
            "temperature": 0.2,
            "top_p": 0.9,
            "user": "alice",
            "stream": True,
            "seed": 7,  # best effort in OpenAI too: no effect on what the answer may be
        }
    )
    assert {k: out[k] for k in ("max_tokens", "stop_sequences", "temperature", "top_p")} == {
        "max_tokens": 50,
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
    }
    assert out["metadata"] == {"user_id": "alice"}
    assert out["stream"] is True
    newer = translate({"messages": [user("hi")], "max_completion_tokens": 9, "stop": ["a", "b"]})
    assert newer["max_tokens"] == 9
    assert newer["stop_sequences"] == ["a", "b"]
    assert translate({"messages": [user("hi")]}, default_max_tokens=321)["max_tokens"] == 321


@pytest.mark.parametrize(
    ("limits", "sent"),
    [
        ({"max_completion_tokens": 9, "max_tokens": 50}, 9),  # the newer name wins, as in OpenAI
        ({"max_completion_tokens": None, "max_tokens": 50}, 50),  # null is unset, not "default"
        ({"max_tokens": None}, 321),
        ({"max_tokens": 0}, 0),  # Anthropic's prompt-cache warm-up: kept, not replaced
        ({}, 321),
    ],
)
def test_max_tokens_from_either_name_else_the_model_default(limits: JSONDict, sent: int) -> None:
    body = {"messages": [user("hi")], **limits}
    assert translate(body, default_max_tokens=321)["max_tokens"] == sent


@pytest.mark.parametrize("value", ["50", 5.5, True, -1, [50]])
def test_a_max_tokens_that_is_not_a_count_is_a_client_error(value: Any) -> None:
    # Replacing it by the default would change the answer the client asked for.
    for key in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(InvalidRequest, match=key) as caught:
            messages_request({"messages": [user("hi")], key: value}, "claude-x", 4096)
        assert caught.value.param == key


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"n": 2}, "n > 1"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"temperature": 1.5}, "temperature"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "audio"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"messages": [{"role": "function", "name": "f", "content": "1"}]}, "role 'function'"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "not a function"),
        ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "allowed_tools"),
        ({"messages": [user([{"type": "input_audio", "input_audio": {}}])]}, "input_audio"),
        (
            {
                "messages": [
                    user([{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA"}}])
                ]
            },
            "image/bmp",
        ),  # fmt: skip
        (
            {"messages": [user([{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}])]},
            "image",
        ),
        (
            {
                "messages": [
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}],
                    }
                ]
            },
            "outside a user message",
        ),  # fmt: skip
    ],
)
def test_what_has_no_messages_equivalent_is_named(extra: JSONDict, reason: str) -> None:
    found = untranslatable({"messages": [user("hi")], **extra})
    assert found is not None
    assert reason in found


def test_defaults_are_translatable() -> None:
    body = {
        "messages": [user("hi")],
        "n": 1,
        "logprobs": False,
        "frequency_penalty": 0,
        "response_format": {"type": "text"},
        "temperature": 1,
    }
    assert untranslatable(body) is None


# --- answers ---------------------------------------------------------------------------------


def message(content: list[JSONDict], stop_reason: str = "end_turn", **usage: int) -> JSONDict:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 3, "output_tokens": 4},
    }


def test_text_thinking_and_tool_use_become_one_openai_message() -> None:
    out = complete(
        message(
            [
                {"type": "thinking", "thinking": "Paris first.", "signature": "sig"},
                {"type": "text", "text": "Let me "},
                {"type": "text", "text": "check."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
            "tool_use",
        )
    )
    assert out["id"] == "msg_01"
    assert out["model"] == "claude-x"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["logprobs"] is None
    assert choice["message"] == {
        "role": "assistant",
        "content": "Let me check.",
        "refusal": None,
        "reasoning_content": "Paris first.",
        "tool_calls": [call("toolu_1", "get_weather", '{"city":"Paris"}')],
    }


def test_tool_use_alone_leaves_content_null() -> None:
    out = complete(message([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use"))
    assert out["choices"][0]["message"]["content"] is None
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_stop_reasons(stop_reason: str, finish: str) -> None:
    out = complete(message([{"type": "text", "text": "x"}], stop_reason))
    assert out["choices"][0]["finish_reason"] == finish


def test_usage_folds_cache_reads_and_writes_into_the_prompt() -> None:
    out = complete(
        message(
            [{"type": "text", "text": "x"}],
            input_tokens=10,
            cache_read_input_tokens=100,
            cache_creation_input_tokens=20,
            output_tokens=5,
        )
    )
    assert out["usage"] == {
        "prompt_tokens": 130,
        "completion_tokens": 5,
        "total_tokens": 135,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 20},
    }


# --- streams ---------------------------------------------------------------------------------


def sse(event: str, data: JSONDict, end: bytes = b"\n") -> bytes:
    return b"event: " + event.encode() + end + b"data: " + orjson.dumps(data) + end + end


def block_start(index: int, block: JSONDict) -> bytes:
    return sse(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def delta(index: int, body: JSONDict) -> bytes:
    return sse(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": body}
    )


START = sse(
    "message_start",
    {
        "type": "message_start",
        "message": message(
            [], "end_turn", input_tokens=10, cache_read_input_tokens=5, output_tokens=1
        )
        | {"stop_reason": None},
    },
)
STOP = sse("message_stop", {"type": "message_stop"})


def finish(stop_reason: str, output_tokens: int) -> bytes:
    return sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
    )


def tool_stream(line_end: bytes = b"\n") -> bytes:
    """Thinking, text, and two tool calls with their arguments in fragments (the tools are the
    Anthropic blocks 2 and 3: OpenAI must see them as tool calls 0 and 1)."""
    events = [
        START,
        sse("ping", {"type": "ping"}),
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        delta(0, {"type": "thinking_delta", "thinking": "Hmm."}),
        delta(0, {"type": "signature_delta", "signature": "abc"}),
        block_start(1, {"type": "text", "text": ""}),
        delta(1, {"type": "text_delta", "text": "Checking"}),
        delta(1, {"type": "text_delta", "text": " both."}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        block_start(2, {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}),
        delta(2, {"type": "input_json_delta", "partial_json": ""}),
        delta(2, {"type": "input_json_delta", "partial_json": '{"city": "Pa'}),
        delta(2, {"type": "input_json_delta", "partial_json": 'ris"}'}),
        block_start(3, {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}),
        delta(3, {"type": "input_json_delta", "partial_json": "{}"}),
        finish("tool_use", 42),
        STOP,
    ]
    return b"".join(events).replace(b"\n", line_end)


def run(stream: bytes, *, include_usage: bool = False, bytewise: bool = False) -> list[bytes]:
    translator = StreamTranslator("claude-x", include_usage=include_usage, created=1)
    out: list[bytes] = []
    pieces = [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]
    for piece in pieces:
        out += translator.feed(piece)
    return out + translator.close()


def chunks(events: list[bytes]) -> list[JSONDict]:
    """The chunks before [DONE], each checked against OpenAI's schema."""
    assert events[-1] == DONE
    assert events.count(DONE) == 1
    parsed = []
    for event in events[:-1]:
        assert event.startswith(b"data: ")
        assert event.endswith(b"\n\n")
        item = json.loads(event[6:])
        openapi.validate("CreateChatCompletionStreamResponse", item)
        parsed.append(item)
    return parsed


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_stream_event_for_event_whatever_the_reads(line_end: bytes) -> None:
    stream = tool_stream(line_end)
    whole = run(stream)
    assert run(stream, bytewise=True) == whole
    items = chunks(whole)
    assert {(c["id"], c["object"], c["model"], c["created"]) for c in items} == {
        ("msg_01", "chat.completion.chunk", "claude-x", 1)
    }
    deltas = [c["choices"][0]["delta"] for c in items]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Hmm."},
        {"content": "Checking"},
        {"content": " both."},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "toolu_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },  # fmt: skip
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "toolu_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        },  # fmt: skip
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in items][-2:] == [None, "tool_calls"]
    assert all("usage" not in c for c in items)


def test_stream_usage_chunk_when_asked() -> None:
    items = chunks(run(START + finish("end_turn", 7) + STOP, include_usage=True))
    assert [c["choices"][0]["finish_reason"] if c["choices"] else "-" for c in items] == [
        None,
        "stop",
        "-",
    ]
    assert items[-1]["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 7,
        "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    assert items[0]["usage"] is None  # as OpenAI: every other chunk says usage null


@pytest.mark.parametrize(
    ("kind", "type_", "code"),
    [
        ("overloaded_error", "server_error", "overloaded"),
        ("rate_limit_error", "rate_limit_error", "rate_limit_exceeded"),
        ("api_error", "server_error", "api_error"),
        ("invalid_request_error", "invalid_request_error", "invalid_request_error"),
    ],
)
def test_stream_error_event_becomes_an_openai_error_and_done(
    kind: str, type_: str, code: str
) -> None:
    error = sse("error", {"type": "error", "error": {"type": kind, "message": "Overloaded"}})
    text = delta(0, {"type": "text_delta", "text": "Hi"})
    out = run(START + text + error + text + STOP)
    assert out[-1] == DONE
    assert len(out) == 4
    envelope = json.loads(out[-2][6:])
    openapi.validate("ErrorResponse", envelope)
    assert envelope == {
        "error": {"message": "Overloaded", "type": type_, "param": None, "code": code}
    }


@pytest.mark.parametrize("stream", [START, START + b"data: {broken", START + b"data: {broken\n\n"])
def test_a_stream_cut_short_or_broken_ends_with_an_error_and_done(stream: bytes) -> None:
    translator = StreamTranslator("claude-x")
    out = translator.feed(stream) + translator.close()
    assert out[-1] == DONE
    envelope = json.loads(out[-2][6:])
    openapi.validate("ErrorResponse", envelope)
    assert envelope["error"]["type"] == "server_error"
    assert envelope["error"]["code"] == "bad_gateway"
    assert translator.error == envelope


def test_an_event_that_never_ends_is_bounded() -> None:
    translator = StreamTranslator("claude-x")
    assert translator.feed(START) != []
    out = translator.feed(b"data: " + b"x" * MAX_EVENT_BYTES)
    assert out[-1] == DONE
    assert translator.error is not None
    assert translator.error["error"]["code"] == "bad_gateway"
    assert translator.close() == []


def test_nothing_after_message_stop() -> None:
    translator = StreamTranslator("claude-x")
    assert translator.feed(START + STOP)[-1] == DONE
    assert translator.feed(delta(0, {"type": "text_delta", "text": "late"})) == []
    assert translator.close() == []


# --- property: tool calls survive OpenAI -> Anthropic -> OpenAI --------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_calls = st.lists(
    st.tuples(
        st.from_regex(r"[a-zA-Z0-9_-]{1,20}", fullmatch=True),
        st.from_regex(r"[a-zA-Z0-9_-]{1,30}", fullmatch=True),
        st.dictionaries(st.text(max_size=6), _json_values, max_size=4),
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda c: c[0],
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=_calls, cut=st.integers(1, 7))
def test_tool_calls_survive_both_translations(
    calls: list[tuple[str, str, JSONDict]], cut: int
) -> None:
    sent = [call(id_, name, json.dumps(args)) for id_, name, args in calls]
    body = {"messages": [user("go"), {"role": "assistant", "tool_calls": sent}]}
    blocks = translate(body)["messages"][1]["content"]

    answer = complete(message(blocks, "tool_use"))["choices"][0]["message"]["tool_calls"]
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in answer
    ] == calls

    events = [START]
    for index, block in enumerate(blocks):
        events.append(block_start(index, {**block, "input": {}}))
        text = json.dumps(block["input"])
        for start in range(0, len(text), cut):
            events.append(
                delta(
                    index, {"type": "input_json_delta", "partial_json": text[start : start + cut]}
                )
            )
    streamed: dict[int, JSONDict] = {}
    for item in chunks(run(b"".join([*events, finish("tool_use", 1), STOP]))):
        for part in item["choices"][0]["delta"].get("tool_calls", ()) if item["choices"] else ():
            slot = streamed.setdefault(part["index"], {"arguments": ""})
            slot.update({k: part[k] for k in ("id",) if k in part})
            slot.update({"name": part["function"]["name"]} if "name" in part["function"] else {})
            slot["arguments"] += part["function"]["arguments"]
    rebuilt = [
        (s["id"], s["name"], json.loads(s["arguments"])) for _, s in sorted(streamed.items())
    ]
    assert rebuilt == calls
