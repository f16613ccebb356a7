"""The Gemini dialect (issue 9, point 3): OpenAI chat <-> generateContent, streams, embeddings.

Requests are validated against Gemini's discovery document converted to JSON Schema (closed
objects: an unknown field fails, as it does at Google); answers against OpenAI's OpenAPI spec.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.dialects import gemini
from nexus.dialects.gemini import (
    StreamTranslator,
    Untranslatable,
    completion_from_response,
    embed_request,
    embeddings_from_response,
    gemini_schema,
    generate_request,
    untranslatable,
)
from nexus.errors import InvalidRequest
from tests.contract import gemini_discovery, openapi

PNG = "data:image/png;base64,iVBORw0KGgo="
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "gemini-2.5-flash", "messages": list(messages), **extra}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def full_body() -> dict[str, Any]:
    return chat(
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
        user([{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": PNG}}]),
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        user("thanks"),
        tools=[WEATHER],
        tool_choice="auto",
        temperature=0.2,
        top_p=0.9,
        max_tokens=100,
        stop="END",
        n=1,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "properties": {}}},
        },
    )


# --- requests ---------------------------------------------------------------------------------


def test_full_request_is_valid_against_the_discovery_document() -> None:
    request = generate_request(full_body())
    gemini_discovery.validate("GenerateContentRequest", request)
    assert untranslatable(full_body()) is None


def test_the_discovery_validator_rejects_unknown_fields() -> None:
    problems = gemini_discovery.errors("GenerateContentRequest", {"contents": [], "bogus": 1})
    assert problems and "bogus" in problems[0]


def test_roles_system_instruction_and_merged_turns() -> None:
    request = generate_request(
        chat(
            {"role": "system", "content": "A"},
            user("one"),
            user("two"),
            {"role": "developer", "content": "B"},
            {"role": "assistant", "content": "three"},
            {"role": "assistant", "content": "four"},
        )
    )
    assert request["systemInstruction"] == {"parts": [{"text": "A"}, {"text": "B"}]}
    assert request["contents"] == [
        {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
        {"role": "model", "parts": [{"text": "three"}, {"text": "four"}]},
    ]


def test_data_url_image_becomes_inline_data() -> None:
    request = generate_request(chat(user([{"type": "image_url", "image_url": {"url": PNG}}])))
    assert request["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    ]


def test_remote_image_url_is_untranslatable() -> None:
    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    body = chat(user(remote))
    reason = untranslatable(body)
    assert reason is not None and "data: URL" in reason
    with pytest.raises(Untranslatable):
        generate_request(body)


def test_tools_become_one_function_declarations_list() -> None:
    request = generate_request(chat(user("hi"), tools=[WEATHER, WEATHER]))
    declarations = request["tools"][0]["functionDeclarations"]
    assert len(request["tools"]) == 1 and len(declarations) == 2
    assert declarations[0] == {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "OBJECT",
            "properties": {"city": {"type": "STRING"}, "days": {"type": "INTEGER"}},
            "required": ["city"],
        },
    }


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice_maps_to_function_calling_config(choice: Any, config: dict[str, Any]) -> None:
    request = generate_request(chat(user("hi"), tools=[WEATHER], tool_choice=choice))
    assert request["toolConfig"] == {"functionCallingConfig": config}
    gemini_discovery.validate("GenerateContentRequest", request)


def test_tool_calls_and_tool_results_map_by_id() -> None:
    request = generate_request(
        chat(
            user("weather?"),
            {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        )
    )
    model, result = request["contents"][1], request["contents"][2]
    assert model == {
        "role": "model",
        "parts": [
            {"text": "Checking."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}},
        ],
    }
    assert result == {
        "role": "user",
        "parts": [
            {
                "functionResponse": {
                    "id": "call_1",
                    "name": "get_weather",
                    "response": {"result": "sunny"},
                }
            }
        ],
    }


def test_json_object_tool_result_is_passed_as_the_response() -> None:
    request = generate_request(
        chat(
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        )
    )
    assert request["contents"][1]["parts"][0]["functionResponse"]["response"] == {"temp": 21}


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_tool_call_arguments_that_are_not_a_json_object_are_a_400(arguments: str) -> None:
    bad = {**CALL, "function": {"name": "get_weather", "arguments": arguments}}
    with pytest.raises(InvalidRequest) as caught:
        generate_request(chat({"role": "assistant", "tool_calls": [bad]}))
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": ["not a message"]},
        chat(user(42)),
        chat(user(["not a part"])),
        chat({"role": "assistant", "tool_calls": ["x"]}),
        chat(user("hi"), tools=["x"]),
    ],
)
def test_malformed_shapes_are_a_400_not_a_crash(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        generate_request(body)
    assert untranslatable(body) is None


def test_tool_message_with_unknown_id_is_a_400() -> None:
    with pytest.raises(InvalidRequest):
        generate_request(chat({"role": "tool", "tool_call_id": "nope", "content": "x"}))


def test_generation_config() -> None:
    request = generate_request(
        chat(user("hi"), temperature=0.5, top_p=0.8, max_completion_tokens=64, stop=["a", "b"])
    )
    assert request["generationConfig"] == {
        "temperature": 0.5,
        "topP": 0.8,
        "maxOutputTokens": 64,
        "stopSequences": ["a", "b"],
    }
    config = generate_request(chat(user("hi"), max_tokens=9, stop="x", n=1))["generationConfig"]
    assert config == {"maxOutputTokens": 9, "stopSequences": ["x"], "candidateCount": 1}


def test_a_null_max_completion_tokens_leaves_max_tokens_in_force() -> None:
    body = chat(user("hi"), max_completion_tokens=None, max_tokens=50)
    assert generate_request(body)["generationConfig"] == {"maxOutputTokens": 50}


@pytest.mark.parametrize(("effort", "budget"), [("none", 0), ("low", 1024), ("high", 24576)])
def test_reasoning_effort_becomes_a_thinking_budget(effort: str, budget: int) -> None:
    config = generate_request(chat(user("hi"), reasoning_effort=effort))["generationConfig"]
    assert config == {"thinkingConfig": {"thinkingBudget": budget}}


def test_audio_and_file_parts_become_inline_data() -> None:
    request = generate_request(
        chat(
            user(
                [
                    {"type": "input_audio", "input_audio": {"data": "UklG", "format": "mp3"}},
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}},
                ]
            )
        )
    )
    gemini_discovery.validate("GenerateContentRequest", request)
    assert request["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "audio/mp3", "data": "UklG"}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}},
    ]


def test_json_modes() -> None:
    json_object = chat(user("hi"), response_format={"type": "json_object"})
    assert generate_request(json_object)["generationConfig"] == {
        "responseMimeType": "application/json"
    }
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "$schema": "x"}
    json_schema = chat(
        user("hi"), response_format={"type": "json_schema", "json_schema": {"schema": schema}}
    )
    config = generate_request(json_schema)["generationConfig"]
    assert config == {
        "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}},
    }


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"n": 2}, "n > 1"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"reasoning_effort": "xhigh"}, "reasoning_effort"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "role"),
        ({"messages": [user([{"type": "video_url", "video_url": {}}])]}, "video_url"),
    ],
)
def test_untranslatable_requests_say_why(extra: dict[str, Any], words: str) -> None:
    reason = untranslatable(chat(user("hi"), **extra))
    assert reason is not None and words in reason


def test_a_malformed_request_is_left_to_the_400() -> None:
    assert untranslatable(chat({"role": "tool", "tool_call_id": "x", "content": "y"})) is None


# --- schema reduction: one test per removed or rewritten keyword ----------------------------


def obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


def test_schema_dollar_schema_removed() -> None:
    assert gemini_schema({"$schema": "https://json-schema.org/draft/2020-12/schema", **obj()}) == {
        "type": "OBJECT",
        "properties": {},
    }


def test_schema_additional_properties_removed() -> None:
    reduced = gemini_schema({**obj(a={"type": "object", "additionalProperties": {"x": 1}})})
    assert reduced == {"type": "OBJECT", "properties": {"a": {"type": "OBJECT"}}}


def test_schema_default_removed() -> None:
    assert gemini_schema({"type": "string", "default": "x"}) == {"type": "STRING"}


def test_schema_examples_removed() -> None:
    assert gemini_schema({"type": "string", "examples": ["a"]}) == {"type": "STRING"}


def test_schema_exclusive_bounds_removed_and_inclusive_kept() -> None:
    reduced = gemini_schema({"type": "number", "exclusiveMinimum": 0, "maximum": 5})
    assert reduced == {"type": "NUMBER", "maximum": 5}


@pytest.mark.parametrize(
    "keyword",
    [
        {"$id": "urn:x"},
        {"$comment": "why"},
        {"exclusiveMaximum": 9},
        {"multipleOf": 2},
        {"readOnly": True},
        {"writeOnly": True},
        {"deprecated": True},
        {"uniqueItems": True},
        {"contains": {"type": "integer"}},
        {"patternProperties": {"^x": {"type": "string"}}},
        {"propertyNames": {"pattern": "^x"}},
        {"not": {"type": "string"}},
        {"if": {"type": "integer"}, "then": {"minimum": 1}, "else": {"maximum": 0}},
        {"dependentRequired": {"a": ["b"]}},
        {"unevaluatedProperties": False},
        {"contentEncoding": "base64"},
    ],
    ids=lambda keyword: "+".join(keyword),
)
def test_schema_other_keywords_outside_gemini_schema_removed(keyword: dict[str, Any]) -> None:
    reduced = gemini_schema({"type": "integer", "minimum": 1, **keyword})
    assert reduced == {"type": "INTEGER", "minimum": 1}
    gemini_discovery.validate("Schema", reduced)


def test_schema_ref_and_defs_inlined() -> None:
    schema = {
        **obj(home={"$ref": "#/$defs/Place"}, work={"$ref": "#/definitions/Place"}),
        "$defs": {"Place": obj(city={"type": "string"})},
        "definitions": {"Place": obj(city={"type": "string"})},
    }
    place = {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}
    assert gemini_schema(schema) == {
        "type": "OBJECT",
        "properties": {"home": place, "work": place},
    }


def test_schema_unresolvable_ref_is_untranslatable() -> None:
    with pytest.raises(Untranslatable, match="cannot be resolved"):
        gemini_schema(obj(a={"$ref": "https://example.com/s.json"}))
    tool = {"type": "function", "function": {"name": "f", "parameters": obj(a={"$ref": "#/x"})}}
    reason = untranslatable(chat(user("hi"), tools=[tool]))
    assert reason is not None and "$ref" in reason


def test_schema_recursive_ref_is_untranslatable() -> None:
    schema = {
        **obj(node={"$ref": "#/$defs/Node"}),
        "$defs": {"Node": obj(next={"$ref": "#/$defs/Node"})},
    }
    with pytest.raises(Untranslatable, match="recursive"):
        gemini_schema(schema)


def test_schema_const_becomes_enum_of_one() -> None:
    assert gemini_schema({"const": "on"}) == {"enum": ["on"], "type": "STRING"}


def test_schema_one_of_becomes_any_of() -> None:
    reduced = gemini_schema({"oneOf": [{"type": "string"}, {"type": "integer"}]})
    assert reduced == {"anyOf": [{"type": "STRING"}, {"type": "INTEGER"}]}


def test_schema_all_of_merged() -> None:
    reduced = gemini_schema(
        {
            "allOf": [
                obj(a={"type": "string"}),
                {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
            ]
        }
    )
    assert reduced == {
        "type": "OBJECT",
        "properties": {"a": {"type": "STRING"}, "b": {"type": "INTEGER"}},
        "required": ["b"],
    }


def test_schema_type_list_with_null_becomes_nullable() -> None:
    assert gemini_schema({"type": ["string", "null"]}) == {"type": "STRING", "nullable": True}


def test_schema_type_list_becomes_any_of() -> None:
    assert gemini_schema({"type": ["string", "integer"]}) == {
        "anyOf": [{"type": "STRING"}, {"type": "INTEGER"}]
    }


def test_schema_non_string_enum_becomes_words() -> None:
    reduced = gemini_schema({"type": "integer", "enum": [1, 2], "description": "Level."})
    assert reduced == {"type": "INTEGER", "description": "Level. Allowed values: 1, 2."}


def test_schema_int64_bounds_are_strings() -> None:
    reduced = gemini_schema(
        {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1}
    )
    assert reduced == {
        "type": "ARRAY",
        "items": {"type": "STRING", "maxLength": "3"},
        "minItems": "1",
    }


def test_reduced_schemas_are_valid_gemini_schemas() -> None:
    schema = {
        "$schema": "x",
        **obj(
            a={"type": ["string", "null"], "default": None, "format": "date"},
            b={"oneOf": [{"const": "x"}, {"type": "array", "items": {"type": "number"}}]},
            c={"$ref": "#/$defs/C"},
        ),
        "$defs": {"C": {"type": "object", "additionalProperties": True, "examples": [{}]}},
        "required": ["a"],
    }
    gemini_discovery.validate("Schema", gemini_schema(schema))


# --- responses --------------------------------------------------------------------------------


def response(parts: list[dict[str, Any]], reason: str = "STOP", **extra: Any) -> dict[str, Any]:
    data = {
        "candidates": [
            {"content": {"role": "model", "parts": parts}, "finishReason": reason, "index": 0}
        ],
        "usageMetadata": {
            "promptTokenCount": 10,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 3,
            "cachedContentTokenCount": 4,
            "totalTokenCount": 18,
        },
        "responseId": "abc",
        **extra,
    }
    gemini_discovery.validate("GenerateContentResponse", data)
    return data


def test_completion_text_reasoning_and_usage() -> None:
    data = response([{"text": "thinking", "thought": True}, {"text": "Hel"}, {"text": "lo"}])
    completion = completion_from_response(data, "gemini-2.5-flash")
    openapi.validate("CreateChatCompletionResponse", completion)
    message = completion["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "Hello",
        "refusal": None,
        "reasoning_content": "thinking",
    }
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["model"] == "gemini-2.5-flash" and completion["id"] == "chatcmpl-abc"
    assert completion["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 8,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }


def test_completion_function_calls_become_tool_calls() -> None:
    data = response(
        [
            {"functionCall": {"name": "a", "args": {"x": 1}}},
            {"functionCall": {"id": "g1", "name": "b", "args": {}}, "thoughtSignature": "c2ln"},
        ]
    )
    completion = completion_from_response(data, "m")
    openapi.validate("CreateChatCompletionResponse", completion)
    choice = completion["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert calls[0]["id"].startswith("call_") and calls[1]["id"] == "g1"
    assert [c["function"] for c in calls] == [
        {"name": "a", "arguments": '{"x":1}'},
        {"name": "b", "arguments": "{}"},
    ]
    # The signature goes back to Gemini with the call on the next turn.
    replay = generate_request(chat({"role": "assistant", "tool_calls": [calls[1]]}))
    assert replay["contents"][0]["parts"][0]["thoughtSignature"] == "c2ln"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons(reason: str, expected: str) -> None:
    completion = completion_from_response(response([{"text": "x"}], reason), "m")
    assert completion["choices"][0]["finish_reason"] == expected


def test_blocked_prompt_is_an_empty_content_filter_answer() -> None:
    data = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 7}}
    completion = completion_from_response(data, "m")
    openapi.validate("CreateChatCompletionResponse", completion)
    assert completion["choices"][0]["finish_reason"] == "content_filter"
    assert completion["choices"][0]["message"]["content"] == ""


# --- streams ----------------------------------------------------------------------------------


def sse(data: dict[str, Any], end: bytes = b"\n") -> bytes:
    return b"data: " + orjson.dumps(data) + end + end


STREAM = (
    sse(
        {
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": "Hi", "thought": True}]}}
            ],
            "responseId": "r1",
        }
    )
    + sse(
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}],
            "responseId": "r1",
        },
        b"\r\n",
    )
    + b": comment\r\r"
    + sse(
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"text": "lo"},
                            {"functionCall": {"id": "c1", "name": "f", "args": {"a": [1]}}},
                        ],
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 2,
                "candidatesTokenCount": 3,
                "totalTokenCount": 5,
            },
            "responseId": "r1",
        },
        b"\r",
    )
)


def run(pieces: list[bytes], include_usage: bool = True) -> list[bytes]:
    translator = StreamTranslator("m", include_usage=include_usage, created=1)
    out: list[bytes] = []
    for piece in pieces:
        out.extend(translator.feed(piece))
    return out + translator.close()


def payloads(events: list[bytes]) -> list[Any]:
    assert events[-1] == b"data: [DONE]\n\n"
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    return [orjson.loads(e[6:]) for e in events[:-1]]


def test_stream_byte_by_byte_equals_one_write() -> None:
    whole = run([STREAM])
    assert run([STREAM[i : i + 1] for i in range(len(STREAM))]) == whole
    assert run([STREAM[:7], STREAM[7:200], STREAM[200:]]) == whole


def test_stream_chunks_are_openai_chunks() -> None:
    chunks = payloads(run([STREAM]))
    for chunk in chunks:
        openapi.validate("CreateChatCompletionStreamResponse", chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[:4] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Hi"},
        {"content": "Hel"},
        {"content": "lo"},
    ]
    call = deltas[4]["tool_calls"][0]
    assert call == {
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a":[1]}'},
        "index": 0,
    }
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5
    assert all(c["id"] == "chatcmpl-r1" for c in chunks)


def test_stream_without_finish_reason_still_finishes_and_ends_with_done() -> None:
    chunks = payloads(run([sse({"candidates": [{"content": {"parts": [{"text": "x"}]}}]})], False))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[-1]


def test_stream_error_event_becomes_an_openai_error_then_done() -> None:
    error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    text = (
        sse({"candidates": [{"content": {"parts": [{"text": "x"}]}}]})
        + sse(error)
        + sse({"candidates": []})
    )
    translator = StreamTranslator("m")
    events = translator.feed(text)
    assert translator.close() == []
    body = payloads(events)[-1]
    openapi.validate("ErrorResponse", body)
    assert body["error"]["message"] == "The model is overloaded."
    assert body["error"]["code"] == "UNAVAILABLE"


def test_stream_blocked_prompt_finishes_with_content_filter() -> None:
    chunks = payloads(run([sse({"promptFeedback": {"blockReason": "SAFETY"}})], False))
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "content_filter"]


# --- embeddings -------------------------------------------------------------------------------


def test_embed_request_is_a_valid_batch_request() -> None:
    request = embed_request(["a", "b"], "text-embedding-004")
    gemini_discovery.validate("BatchEmbedContentsRequest", request)
    assert [r["content"]["parts"][0]["text"] for r in request["requests"]] == ["a", "b"]
    assert request["requests"][0]["model"] == "models/text-embedding-004"


def test_embeddings_keep_order() -> None:
    data = {"embeddings": [{"values": [0.1, 0.2]}, {"values": [0.3, 0.4]}]}
    gemini_discovery.validate("BatchEmbedContentsResponse", data)
    result = embeddings_from_response(data, "text-embedding-004")
    openapi.validate("CreateEmbeddingResponse", result)
    assert [(d["index"], d["embedding"]) for d in result["data"]] == [
        (0, [0.1, 0.2]),
        (1, [0.3, 0.4]),
    ]


# --- round trip -------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True)
CALLS = st.lists(
    st.tuples(NAMES, st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(CALLS)
def test_tool_calls_survive_openai_to_gemini_to_openai(
    calls: list[tuple[str, dict[str, Any]]],
) -> None:
    tool_calls: list[dict[str, Any]] = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(args).decode()},
        }
        for i, (name, args) in enumerate(calls)
    ]
    request = generate_request(chat(user("go"), {"role": "assistant", "tool_calls": tool_calls}))
    gemini_discovery.validate("GenerateContentRequest", request)
    parts = request["contents"][1]["parts"]
    completion = completion_from_response(response(parts), "m")
    back = completion["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"]) for c in back] == [
        (c["id"], c["function"]["name"]) for c in tool_calls
    ]
    assert [orjson.loads(c["function"]["arguments"]) for c in back] == [args for _, args in calls]
    # The same parts streamed give the same calls.
    chunks = payloads(
        run([sse({"candidates": [{"content": {"role": "model", "parts": parts}}]})], False)
    )
    streamed = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert [(c["index"], c["id"], orjson.loads(c["function"]["arguments"])) for c in streamed] == [
        (i, f"call_{i}", args) for i, (_, args) in enumerate(calls)
    ]


def test_module_exports() -> None:
    assert set(gemini.__all__) <= set(dir(gemini))
