"""The official ``openai`` SDK (sync client) against a real Nexus in front of fake upstreams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.fakes import DONE, FakeOllama, FakeOpenAI, Reply, chunk, completion, sse
from tests.harness import NexusServer, settings_for

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def sdk() -> Iterator[Any]:
    """A factory of SDK clients pointed at a Nexus; every client is closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(nexus: NexusServer, api_key: str = "not-needed") -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=nexus.url + "/v1", api_key=api_key, max_retries=0, timeout=30
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _tool_call_completion(model: str) -> dict[str, Any]:
    body = completion(model)
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    return body


def test_models_list(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI(["alpha", "beta"]))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    models = sdk(nexus).models.list()
    ids = [m.id for m in models]
    assert ids == ["alpha", "beta"]
    assert all(m.object == "model" for m in models.data)
    assert all(m.owned_by == "vllm-1" for m in models.data)
    assert all(isinstance(m.created, int) for m in models.data)


def test_chat_completion_plain(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    result = sdk(nexus).chat.completions.create(model="mock-model", messages=MESSAGES)
    assert result.object == "chat.completion"
    assert result.choices[0].message.content == "Hello!"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None and result.usage.total_tokens == 7
    sent = fake.calls("/v1/chat/completions")[0].json
    assert sent["messages"] == MESSAGES
    assert sent["model"] == "mock-model"


def test_chat_completion_with_tools_and_tool_calls(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    fake.push("/v1/chat/completions", Reply(json=_tool_call_completion("mock-model")))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    result = sdk(nexus).chat.completions.create(
        model="mock-model", messages=MESSAGES, tools=TOOLS, tool_choice="auto"
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.id == "call_abc"
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    sent = fake.calls("/v1/chat/completions")[0].json
    assert sent["tools"] == TOOLS
    assert sent["tool_choice"] == "auto"


def test_chat_completion_tool_round_trip_messages_reach_the_backend(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    history: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "18C and sunny"},
    ]
    result = sdk(nexus).chat.completions.create(model="mock-model", messages=history, tools=TOOLS)
    assert result.choices[0].message.content == "Hello!"
    assert fake.calls("/v1/chat/completions")[0].json["messages"] == history


def test_stream_text_is_reassembled(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    stream = sdk(nexus).chat.completions.create(model="mock-model", messages=MESSAGES, stream=True)
    text = ""
    finish = []
    ids = set()
    with stream:
        for part in stream:
            assert part.object == "chat.completion.chunk"
            ids.add(part.id)
            for choice in part.choices:
                text += choice.delta.content or ""
                if choice.finish_reason is not None:
                    finish.append(choice.finish_reason)
    assert text == "Hello there!"
    assert finish == ["stop"]
    assert ids == {"chatcmpl-fake"}
    assert fake.calls("/v1/chat/completions")[0].json["stream"] is True


def test_stream_usage_chunk_with_include_usage(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    usage_chunk = {
        **chunk(),
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
    events = [sse(chunk(role="assistant", content="Hi")), sse(usage_chunk), DONE]
    fake.push("/v1/chat/completions", Reply(events=events))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    stream = sdk(nexus).chat.completions.create(
        model="mock-model",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [part.usage for part in stream if part.usage is not None]
    assert len(usages) == 1 and usages[0].total_tokens == 6
    assert fake.calls("/v1/chat/completions")[0].json["stream_options"] == {"include_usage": True}


def test_stream_tool_call_arguments_split_across_chunks_are_reassembled(
    start_fake, start_nexus, sdk
):
    fake = start_fake(FakeOpenAI())
    arguments = '{"city": "Paris", "unit": "celsius"}'
    pieces = ['{"ci', 'ty": "Pa', 'ris", "un', 'it": "cel', 'sius"}']
    assert "".join(pieces) == arguments
    head = {
        "index": 0,
        "id": "call_xyz",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    events = [sse(chunk(role="assistant", content=None, tool_calls=[head]))]
    events += [
        sse(chunk(tool_calls=[{"index": 0, "function": {"arguments": piece}}])) for piece in pieces
    ]
    final = chunk()
    final["choices"][0]["finish_reason"] = "tool_calls"
    events += [sse(final), DONE]
    fake.push("/v1/chat/completions", Reply(events=events))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))

    stream = sdk(nexus).chat.completions.create(
        model="mock-model", messages=MESSAGES, tools=TOOLS, stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    argument_deltas = 0
    for part in stream:
        for choice in part.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                slot = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += delta.id or ""
                if delta.function is not None:
                    slot["name"] += delta.function.name or ""
                    if delta.function.arguments:
                        argument_deltas += 1
                        slot["arguments"] += delta.function.arguments
    assert finish == "tool_calls"
    assert argument_deltas == len(pieces)  # relayed one for one, not merged or dropped
    assert list(calls) == [0]
    assert calls[0]["id"] == "call_xyz"
    assert calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == arguments
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_embeddings_string_and_list_openai_dialect(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI(["text-embed"]))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    client = sdk(nexus)

    single = client.embeddings.create(model="text-embed", input="hello")
    assert len(single.data) == 1
    assert single.data[0].embedding == pytest.approx([0.1, 0.2, 0.0])
    assert single.usage.prompt_tokens == 3

    many = client.embeddings.create(model="text-embed", input=["a", "b", "c"])
    assert [item.index for item in many.data] == [0, 1, 2]
    assert all(len(item.embedding) == 3 for item in many.data)
    assert [item.embedding[2] for item in many.data] == pytest.approx([0.0, 1.0, 2.0])

    sent = [call.json for call in fake.calls("/v1/embeddings")]
    assert sent[0]["input"] == "hello"
    assert sent[1]["input"] == ["a", "b", "c"]
    # The SDK asks for base64 by default; the request must reach the backend unchanged.
    assert all(body["encoding_format"] == "base64" for body in sent)


def test_embeddings_string_and_list_ollama_backend(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOllama(["nomic-embed-text:latest"], capabilities=["embedding"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    client = sdk(nexus)

    single = client.embeddings.create(model="nomic-embed-text", input="hello")
    assert len(single.data) == 1
    assert single.data[0].embedding == pytest.approx([0.5, -0.5, 0.0])
    assert single.usage.prompt_tokens == 6

    many = client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert len(many.data) == 2
    assert all(len(item.embedding) == 3 for item in many.data)
    assert many.data[1].embedding == pytest.approx([0.5, -0.5, 1.0])

    explicit = client.embeddings.create(
        model="nomic-embed-text", input=["x"], encoding_format="float"
    )
    assert explicit.data[0].embedding == pytest.approx([0.5, -0.5, 0.0])

    embed_calls = fake.calls("/api/embed")
    assert len(embed_calls) == 3
    assert embed_calls[1].json["input"] == ["a", "b"]
    assert embed_calls[0].json["model"] == "nomic-embed-text:latest"


def test_unknown_model_raises_not_found_with_model_not_found_code(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    with pytest.raises(openai.NotFoundError) as info:
        sdk(nexus).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert "no-such-model" in info.value.message
    assert "mock-model" in info.value.message  # the available models are named
    assert fake.calls("/v1/chat/completions") == []


def test_unknown_model_for_embeddings_raises_not_found(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    with pytest.raises(openai.NotFoundError) as info:
        sdk(nexus).embeddings.create(model="no-such-embedder", input="x")
    assert info.value.code == "model_not_found"


def test_upstream_400_raises_bad_request(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    envelope = {
        "error": {
            "message": "temperature must be at most 2",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }
    fake.push("/v1/chat/completions", Reply(status=400, json=envelope))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    with pytest.raises(openai.BadRequestError) as info:
        sdk(nexus).chat.completions.create(model="mock-model", messages=MESSAGES, temperature=5)
    assert info.value.status_code == 400
    assert info.value.code == "invalid_value"
    assert info.value.param == "temperature"
    assert "temperature must be at most 2" in info.value.message
    assert len(fake.calls("/v1/chat/completions")) == 1  # a client error is not retried


def test_stream_upstream_400_raises_bad_request(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    fake.push(
        "/v1/chat/completions",
        Reply(
            status=400,
            json={
                "error": {
                    "message": "bad",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
    )
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    with pytest.raises(openai.BadRequestError):
        sdk(nexus).chat.completions.create(model="mock-model", messages=MESSAGES, stream=True)


def test_invalid_request_raises_bad_request_without_reaching_backend(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    with pytest.raises(openai.BadRequestError) as info:
        sdk(nexus).chat.completions.create(model="mock-model", messages=[])
    assert info.value.param == "messages"
    assert fake.calls("/v1/chat/completions") == []


def test_configured_key_wins_over_the_clients_key(start_fake, start_nexus, sdk, monkeypatch):
    monkeypatch.setenv("NEXUS_TEST_UPSTREAM_KEY", "sk-configured-123")
    fake = start_fake(FakeOpenAI(["gpt-4o-mini"]))
    backends = [
        {
            "name": "cloud",
            "url": fake.url,
            "type": "openai",
            "api_key_env": "NEXUS_TEST_UPSTREAM_KEY",
        }
    ]
    nexus = start_nexus(settings_for(backends=backends))
    client = sdk(nexus, api_key="sk-client-should-not-pass")

    result = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert result.choices[0].message.content == "Hello!"
    vectors = client.embeddings.create(model="gpt-4o-mini", input="x")
    assert len(vectors.data) == 1
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello there!"

    upstream = [
        *fake.calls("/v1/models"),
        *fake.calls("/v1/chat/completions"),
        *fake.calls("/v1/embeddings"),
    ]
    assert len(upstream) >= 4
    for call in upstream:
        assert call.headers.get("Authorization") == "Bearer sk-configured-123", call.path
        assert "sk-client-should-not-pass" not in json.dumps(call.headers)


def test_client_key_is_passed_through_without_a_configured_key(start_fake, start_nexus, sdk):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    sdk(nexus, api_key="sk-client-abc").chat.completions.create(
        model="mock-model", messages=MESSAGES
    )
    assert fake.calls("/v1/chat/completions")[0].headers["Authorization"] == "Bearer sk-client-abc"
