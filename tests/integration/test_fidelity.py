"""Bodies pass through as data in both directions; only ``model`` changes, and only when an
alias resolved it (issue 7)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fakes import FakeOpenAI, Reply, completion
from tests.harness import settings_for

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


def rich_body(model: str, *, stream: bool) -> dict[str, Any]:
    """A request using every field that a typed model would be tempted to drop or reshape."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "Answer with JSON."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Zürich?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c": 21.5}'},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                    "strict": True,
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"temp": {"type": "number"}}},
                "strict": True,
            },
        },
        "seed": 1234567890123,
        "n": 2,
        "stop": "END",
        "temperature": 0.25,
        "logit_bias": {"50256": -100},
        "x_vendor_extension": {"nested": [1, 2.5, None, True, "ü"], "empty": {}},
        "chat_template_kwargs": {"enable_thinking": False},
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def odd_bytes(body: dict[str, Any]) -> bytes:
    """The body encoded the way no JSON library in Nexus would re-encode it."""
    return json.dumps(body, indent=3, ensure_ascii=True).encode()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_request_bytes_reach_the_backend_unchanged(start_fake, start_nexus, client, stream):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    raw = odd_bytes(rich_body("mock-model", stream=stream))

    resp = client.post(nexus.url + CHAT, content=raw, headers=JSON)

    assert resp.status_code == 200, resp.text
    [call] = fake.calls(CHAT)
    assert call.raw == raw


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_alias_changes_only_the_model(start_fake, start_nexus, client, stream):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(("vllm-1", fake, "vllm"), routing={"aliases": {"house-model": "mock-model"}})
    )
    sent = rich_body("house-model", stream=stream)

    resp = client.post(nexus.url + CHAT, content=odd_bytes(sent), headers=JSON)

    assert resp.status_code == 200, resp.text
    [call] = fake.calls(CHAT)
    received = call.json
    assert received["model"] == "mock-model"
    assert received == {**sent, "model": "mock-model"}


def rich_completion() -> dict[str, Any]:
    """An answer with every field a typed response model would be tempted to drop."""
    answer = completion(
        "mock-model",
        system_fingerprint="fp_44709d6fcb",
        service_tier="default",
        x_vendor_stats={"tokens_per_second": 87.5, "draft_accepted": [1, 0, 1]},
    )
    message = answer["choices"][0]["message"]
    message["content"] = None
    message["refusal"] = "I can only report the weather."
    message["tool_calls"] = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'},
        },
        {
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz":"Europe/Zurich"}'},
        },
    ]
    message["reasoning_content"] = "The user wants weather and time."
    answer["choices"][0]["finish_reason"] = "tool_calls"
    answer["choices"][0]["logprobs"] = {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.0123,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.0123, "bytes": [72, 105]}],
            }
        ],
        "refusal": None,
    }
    answer["choices"].append(
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Second choice", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": 128009,
        }
    )
    answer["usage"]["completion_tokens_details"] = {"reasoning_tokens": 7}
    answer["prompt_logprobs"] = None
    return answer


def test_response_fields_come_back_intact(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    answer = rich_completion()
    fake.push(CHAT, Reply(json=answer))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))

    resp = client.post(
        nexus.url + CHAT, content=odd_bytes(rich_body("mock-model", stream=False)), headers=JSON
    )

    assert resp.status_code == 200, resp.text
    assert resp.json() == answer


def test_response_fields_come_back_intact_through_an_alias(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    answer = rich_completion()
    fake.push(CHAT, Reply(json=answer))
    nexus = start_nexus(
        settings_for(("vllm-1", fake, "vllm"), routing={"aliases": {"house-model": "mock-model"}})
    )

    resp = client.post(nexus.url + CHAT, json=rich_body("house-model", stream=False))

    assert resp.status_code == 200, resp.text
    assert resp.json() == answer
