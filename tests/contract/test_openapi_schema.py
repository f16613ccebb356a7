"""Nexus's answers checked against the schemas of OpenAI's official OpenAPI spec."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.contract.openapi import ValidationError, errors, validate
from tests.fakes import DONE, FakeOllama, FakeOpenAI, Reply, chunk, completion, sse
from tests.harness import data_events, settings_for

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


def stream_chunks(client, url: str, body: dict[str, Any]) -> list[Any]:
    resp = client.post(f"{url}/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = data_events(resp.text)
    assert events and events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    return [orjson.loads(event) for event in events[:-1]]


# --- the checker itself -------------------------------------------------------------------


def test_validator_rejects_what_the_spec_forbids():
    body = completion()
    validate("CreateChatCompletionResponse", body)
    del body["choices"][0]["logprobs"]
    with pytest.raises(ValidationError, match="logprobs"):
        validate("CreateChatCompletionResponse", body)
    with pytest.raises(ValidationError):
        validate("ErrorResponse", {"error": {"message": "x"}})
    # the nullable fix: a nullable field accepts null
    validate("ErrorResponse", {"error": {"message": "x", "type": "t", "param": None, "code": None}})


# --- OpenAI-dialect backend ---------------------------------------------------------------


def test_chat_completion_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    validate("CreateChatCompletionResponse", resp.json())


def test_chat_completion_missing_refusal_and_logprobs_are_added_as_null(
    start_fake, start_nexus, client
):
    fake = start_fake(FakeOpenAI())
    sparse = completion()
    del sparse["choices"][0]["logprobs"]
    del sparse["choices"][0]["message"]["refusal"]
    sparse["llama_timings"] = {"predicted_n": 2}  # a server's extra field must survive
    assert errors("CreateChatCompletionResponse", sparse)  # the upstream answer is not valid
    fake.push("/v1/chat/completions", Reply(json=sparse))
    nexus = start_nexus(settings_for(("llamacpp-1", fake, "llamacpp")))
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    body = resp.json()
    validate("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert "logprobs" in choice and choice["logprobs"] is None
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    assert choice["message"]["content"] == "Hello!"
    assert body["llama_timings"] == {"predicted_n": 2}


def test_chat_completion_with_tool_calls_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    body = completion()
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"q": "x"}'},
            }
        ],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    fake.push("/v1/chat/completions", Reply(json=body))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=CHAT)
    validate("CreateChatCompletionResponse", resp.json())


def test_stream_chunks_are_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    chunks = stream_chunks(client, nexus.url, {**CHAT, "stream": True})
    assert len(chunks) == 5
    for item in chunks:
        validate("CreateChatCompletionStreamResponse", item)


def test_stream_chunks_with_tool_calls_and_usage_are_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    head = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    final = chunk()
    final["choices"][0]["finish_reason"] = "tool_calls"
    usage = {
        **chunk(),
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    events = [
        sse(chunk(role="assistant", content=None, tool_calls=[head])),
        sse(chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"a":'}}])),
        sse(chunk(tool_calls=[{"index": 0, "function": {"arguments": " 1}"}}])),
        sse(final),
        sse(usage),
        DONE,
    ]
    fake.push("/v1/chat/completions", Reply(events=events))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(client, nexus.url, body)
    assert len(chunks) == 5
    for item in chunks:
        validate("CreateChatCompletionStreamResponse", item)


def test_models_list_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI(["a-model", "b-model"], max_model_len=4096))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    resp = client.get(f"{nexus.url}/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    validate("ListModelsResponse", body)
    assert [m["id"] for m in body["data"]] == ["a-model", "b-model"]


def test_empty_models_list_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    fake.push("/v1/models", Reply(status=500))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    body = client.get(f"{nexus.url}/v1/models").json()
    validate("ListModelsResponse", body)
    assert body["data"] == []


@pytest.mark.parametrize("inputs", ["one text", ["a", "b", "c"]])
def test_embeddings_are_valid(start_fake, start_nexus, client, inputs):
    fake = start_fake(FakeOpenAI(["embedder"]))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    resp = client.post(f"{nexus.url}/v1/embeddings", json={"model": "embedder", "input": inputs})
    assert resp.status_code == 200
    body = resp.json()
    validate("CreateEmbeddingResponse", body)
    assert len(body["data"]) == (1 if isinstance(inputs, str) else len(inputs))


# --- error bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        ("/v1/chat/completions", {"model": "mock-model", "messages": []}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400),
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/embeddings", {"model": "mock-model", "input": []}, 400),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
        ),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404),
        ("/v1/no-such-endpoint", {}, 404),
    ],
)
def test_error_bodies_are_valid(start_fake, start_nexus, client, path, payload, status):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    if isinstance(payload, bytes):
        resp = client.post(
            nexus.url + path, content=payload, headers={"Content-Type": "application/json"}
        )
    else:
        resp = client.post(nexus.url + path, json=payload)
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    validate("ErrorResponse", resp.json())


def test_upstream_400_error_body_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    fake.push("/v1/chat/completions", Reply(status=400, json={"error": "context too long"}))
    nexus = start_nexus(settings_for(("llamacpp-1", fake, "llamacpp")))
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 400
    body = resp.json()
    validate("ErrorResponse", body)
    assert "context too long" in body["error"]["message"]


def test_upstream_400_non_json_error_body_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    fake.push("/v1/chat/completions", Reply(status=400, body=b"bad things"))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 400
    validate("ErrorResponse", resp.json())


def test_mid_stream_error_event_is_an_error_response(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    events = [sse(chunk(role="assistant", content="Hi")), sse(chunk(content=" there"))]
    # The upstream falls silent after one event; Nexus's idle timeout ends the stream.
    fake.push("/v1/chat/completions", Reply(events=events, hang_after=1))
    settings = settings_for(("vllm-1", fake, "vllm"), server={"stream_idle_timeout_seconds": 0.5})
    nexus = start_nexus(settings)
    resp = client.post(f"{nexus.url}/v1/chat/completions", json={**CHAT, "stream": True})
    events_seen = data_events(resp.text)
    assert events_seen[-1] == "[DONE]"
    first, error = orjson.loads(events_seen[0]), orjson.loads(events_seen[-2])
    validate("CreateChatCompletionStreamResponse", first)
    validate("ErrorResponse", error)
    assert error["error"]["code"] == "gateway_timeout"


# --- Ollama backend (translated) -----------------------------------------------------------

OLLAMA_CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def test_ollama_chat_completion_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=OLLAMA_CHAT)
    assert resp.status_code == 200
    validate("CreateChatCompletionResponse", resp.json())


def test_ollama_tool_call_completion_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    answer = {
        "model": "llama3.2:latest",
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "lookup", "arguments": {"q": "x"}}}],
        },
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 4,
        "eval_count": 2,
    }
    fake.push("/api/chat", Reply(json=answer))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=OLLAMA_CHAT)
    assert resp.status_code == 200
    validate("CreateChatCompletionResponse", resp.json())


@pytest.mark.parametrize("include_usage", [False, True])
def test_ollama_stream_chunks_are_valid(start_fake, start_nexus, client, include_usage):
    fake = start_fake(FakeOllama())
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    body = {**OLLAMA_CHAT, "stream": True, "stream_options": {"include_usage": include_usage}}
    chunks = stream_chunks(client, nexus.url, body)
    assert len(chunks) >= 3
    for item in chunks:
        validate("CreateChatCompletionStreamResponse", item)


def test_ollama_models_list_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama(["llama3.2:latest", "qwen2.5:7b"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    body = client.get(f"{nexus.url}/v1/models").json()
    validate("ListModelsResponse", body)
    assert len(body["data"]) == 2


@pytest.mark.parametrize("inputs", ["one text", ["a", "b"]])
def test_ollama_embeddings_are_valid(start_fake, start_nexus, client, inputs):
    fake = start_fake(FakeOllama(["nomic-embed-text:latest"], capabilities=["embedding"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(
        f"{nexus.url}/v1/embeddings", json={"model": "nomic-embed-text", "input": inputs}
    )
    assert resp.status_code == 200
    validate("CreateEmbeddingResponse", resp.json())


def test_ollama_upstream_error_body_is_valid(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    fake.push("/api/chat", Reply(status=400, json={"error": "invalid options"}))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=OLLAMA_CHAT)
    assert resp.status_code == 400
    validate("ErrorResponse", resp.json())
