"""Ollama's native API behind Nexus: models, chat translation, streams and embeddings."""

from __future__ import annotations

import array
import base64
from typing import Any

import openai
import orjson

from tests.fakes import FakeOllama, Reply
from tests.harness import data_events, settings_for

USER = [{"role": "user", "content": "hi"}]
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\nfake-image-bytes").decode()


class PerModelOllama(FakeOllama):
    """A FakeOllama whose /api/show answer depends on the model asked about."""

    def __init__(self, shows: dict[str, dict[str, Any]]) -> None:
        super().__init__(list(shows))
        self.shows = shows

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if path == "/api/show":
            name = orjson.loads(raw)["model"]
            return Reply(json=self.shows[name])
        return super().default(method, path, raw)


def ndjson(*lines: dict[str, Any]) -> list[bytes]:
    return [orjson.dumps(line) + b"\n" for line in lines]


def ollama_line(content: str = "", done: bool = False, **extra: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "model": "llama3.2:latest",
        "message": {"role": "assistant", "content": content},
        "done": done,
    }
    return {**line, **extra}


# --- models --------------------------------------------------------------------------------


def test_models_come_from_tags_with_show_details(start_fake, start_nexus, client):
    # Names chosen so that guessing from the name gives other answers: the traits must come
    # from /api/show.
    fake = start_fake(
        PerModelOllama(
            {
                "gemma3:4b": {
                    "capabilities": ["completion", "vision"],
                    "model_info": {"gemma3.context_length": 4096},
                },
                "granite3:2b": {
                    "capabilities": ["completion", "tools"],
                    "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
                },
                "arctic:latest": {
                    "capabilities": ["embedding"],
                    "model_info": {"bert.context_length": 2048},
                },
            }
        )
    )
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.get(f"{nexus.url}/v1/models")
    assert resp.status_code == 200
    rows = {row["id"]: row for row in resp.json()["data"]}
    assert set(rows) == {"gemma3:4b", "granite3:2b", "arctic:latest"}

    assert rows["gemma3:4b"]["context_length"] == 4096
    assert rows["gemma3:4b"]["capabilities"] == {
        "vision": True,
        "tools": False,
        "json_mode": True,
        "embeddings": False,
    }
    assert rows["granite3:2b"]["context_length"] == 131072
    assert rows["granite3:2b"]["capabilities"] == {
        "vision": False,
        "tools": True,
        "json_mode": True,
        "embeddings": False,
    }
    assert rows["arctic:latest"]["context_length"] == 2048
    assert rows["arctic:latest"]["capabilities"] == {
        "vision": False,
        "tools": False,
        "json_mode": False,
        "embeddings": True,
    }
    for row in rows.values():
        assert row["owned_by"] == "ollama-1"
        assert row["backends"] == ["ollama-1"]
    asked = sorted(call.json["model"] for call in fake.calls("/api/show"))
    assert asked == sorted(rows)


def test_show_is_called_once_per_model_and_cached_across_health_rounds(
    start_fake, start_nexus, loop_thread, client
):
    fake = start_fake(FakeOllama(["llama3.2:latest", "qwen2.5:7b"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    assert len(fake.calls("/api/tags")) == 1
    assert sorted(c.json["model"] for c in fake.calls("/api/show")) == [
        "llama3.2:latest",
        "qwen2.5:7b",
    ]
    loop_thread.run(nexus.gateway.health.check_all())
    loop_thread.run(nexus.gateway.health.check_all())
    assert len(fake.calls("/api/tags")) == 3  # the second and third rounds did happen
    assert len(fake.calls("/api/show")) == 2  # ... without describing the models again
    rows = client.get(f"{nexus.url}/v1/models").json()["data"]
    assert {row["id"]: row["context_length"] for row in rows} == {
        "llama3.2:latest": 8192,
        "qwen2.5:7b": 8192,
    }


def test_a_new_model_is_described_in_a_later_round(start_fake, start_nexus, loop_thread):
    fake = start_fake(FakeOllama(["llama3.2:latest"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    fake.models.append("mistral:7b")
    loop_thread.run(nexus.gateway.health.check_all())
    assert [c.json["model"] for c in fake.calls("/api/show")] == ["llama3.2:latest", "mistral:7b"]
    assert nexus.gateway.registry.model_ids() == ["llama3.2:latest", "mistral:7b"]


def test_bare_name_routes_to_latest_tag(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama(["llama3.2:latest"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(
        f"{nexus.url}/v1/chat/completions", json={"model": "llama3.2", "messages": USER}
    )
    assert resp.status_code == 200, resp.text
    assert fake.calls("/api/chat")[0].json["model"] == "llama3.2:latest"
    assert resp.headers["x-nexus-backend"] == "ollama-1"


# --- chat, not streamed ----------------------------------------------------------------------


def test_chat_is_translated_to_an_openai_completion(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(
        f"{nexus.url}/v1/chat/completions", json={"model": "llama3.2:latest", "messages": USER}
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "llama3.2:latest"
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hello"
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert fake.calls("/api/chat")[0].json["stream"] is False


def test_chat_done_reason_length_becomes_finish_reason_length(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    fake.push(
        "/api/chat",
        Reply(
            json=ollama_line("cut", True, done_reason="length", prompt_eval_count=9, eval_count=1)
        ),
    )
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    body = client.post(
        f"{nexus.url}/v1/chat/completions", json={"model": "llama3.2", "messages": USER}
    ).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}


def test_chat_request_is_translated_to_ollama(start_fake, start_nexus, client):
    # a vision model: the request carries an image (capability routing would exclude others)
    fake = start_fake(FakeOllama(capabilities=["completion", "tools", "vision"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    request = {
        "model": "llama3.2",
        "messages": messages,
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 42,
        "stop": "END",
        "max_tokens": 64,
        "tools": tools,
        "response_format": {"type": "json_object"},
    }
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=request)
    assert resp.status_code == 200, resp.text
    sent = fake.calls("/api/chat")[0].json

    assert sent["model"] == "llama3.2:latest"
    assert sent["stream"] is False
    assert sent["options"] == {
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["END"],
        "num_predict": 64,
    }
    assert sent["format"] == "json"
    assert sent["tools"] == tools
    out = sent["messages"]
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert out[0]["content"] == "Be brief."
    assert out[1]["content"] == "What is in this picture?"
    assert out[1]["images"] == [PNG_B64]
    assert out[2]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert out[3]["content"] == "sunny"
    assert out[3]["tool_name"] == "get_weather"


def test_stop_list_and_json_schema_format(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    request = {
        "model": "llama3.2",
        "messages": USER,
        "stop": ["A", "B"],
        "max_completion_tokens": 10,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        },
    }
    assert client.post(f"{nexus.url}/v1/chat/completions", json=request).status_code == 200
    sent = fake.calls("/api/chat")[0].json
    assert sent["format"] == schema
    assert sent["options"] == {"stop": ["A", "B"], "num_predict": 10}


def test_remote_image_url_is_refused_with_400(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama(capabilities=["completion", "vision"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}],
        }
    ]
    resp = client.post(
        f"{nexus.url}/v1/chat/completions", json={"model": "llama3.2", "messages": messages}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert fake.calls("/api/chat") == []


def test_ollama_tool_calls_become_openai_tool_calls(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    answer = ollama_line(
        "",
        True,
        done_reason="stop",
        prompt_eval_count=10,
        eval_count=5,
    )
    answer["message"]["tool_calls"] = [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
        {"function": {"name": "get_time", "arguments": {"tz": "CET"}}},
    ]
    fake.push("/api/chat", Reply(json=answer))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    body = client.post(
        f"{nexus.url}/v1/chat/completions", json={"model": "llama3.2", "messages": USER}
    ).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    for call in calls:
        assert call["type"] == "function"
        assert isinstance(call["id"], str) and call["id"]
        assert isinstance(call["function"]["arguments"], str)
    assert len({c["id"] for c in calls}) == 2
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert orjson.loads(calls[1]["function"]["arguments"]) == {"tz": "CET"}


def test_ollama_error_answer_becomes_an_error_envelope(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    fake.push("/api/chat", Reply(status=404, json={"error": "model 'llama3.2' not found"}))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(
        f"{nexus.url}/v1/chat/completions", json={"model": "llama3.2", "messages": USER}
    )
    assert resp.status_code == 404
    assert "not found" in resp.json()["error"]["message"]


# --- chat, streamed --------------------------------------------------------------------------


def stream(client, url: str, **extra: Any) -> tuple[Any, list[str]]:
    body = {"model": "llama3.2", "messages": USER, "stream": True, **extra}
    resp = client.post(f"{url}/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    return resp, data_events(resp.text)


def test_stream_is_translated_to_chat_completion_chunks(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    _, events = stream(client, nexus.url)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["model"] == "llama3.2:latest" for c in chunks)
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello"
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["stop"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert fake.calls("/api/chat")[0].json["stream"] is True


def test_stream_usage_chunk_when_include_usage(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    _, events = stream(client, nexus.url, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    with_usage = [c for c in chunks if c.get("usage")]
    assert len(with_usage) == 1
    last = chunks[-1]
    assert last is with_usage[0]  # the usage chunk comes last, before [DONE]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_stream_tool_calls_are_translated(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    tool_line = ollama_line("")
    tool_line["message"]["tool_calls"] = [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ]
    events = ndjson(
        tool_line, ollama_line("", True, done_reason="stop", prompt_eval_count=3, eval_count=7)
    )
    fake.push("/api/chat", Reply(events=events, content_type="application/x-ndjson"))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    _, seen = stream(client, nexus.url)
    assert seen[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in seen[:-1]]
    deltas = [ch["delta"] for c in chunks for ch in c["choices"]]
    calls = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    assert len(calls) == 1
    assert calls[0]["index"] == 0
    assert calls[0]["type"] == "function"
    assert calls[0]["id"]
    assert calls[0]["function"]["name"] == "get_weather"
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["tool_calls"]


def test_stream_with_two_tool_calls_keeps_them_apart(start_fake, start_nexus, client):
    # Ollama streams each tool call in a line of its own; OpenAI clients merge the deltas of
    # one index, so the second call must get index 1, not a second index 0.
    fake = start_fake(FakeOllama())
    lines = []
    for name, city in (("get_weather", "Oslo"), ("get_time", "Lima")):
        line = ollama_line("")
        line["message"]["tool_calls"] = [{"function": {"name": name, "arguments": {"city": city}}}]
        lines.append(line)
    events = ndjson(*lines, ollama_line("", True, done_reason="stop"))
    fake.push("/api/chat", Reply(events=events, content_type="application/x-ndjson"))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))

    _, seen = stream(client, nexus.url)

    chunks = [orjson.loads(e) for e in seen[:-1]]
    calls = [
        tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls") or ()
    ]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [
        (0, "get_weather"),
        (1, "get_time"),
    ]
    assert len({c["id"] for c in calls}) == 2
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["tool_calls"]


def test_two_streamed_tool_calls_reach_the_openai_sdk_as_two(start_fake, start_nexus):
    fake = start_fake(FakeOllama())
    lines = []
    for name in ("get_weather", "get_time"):
        line = ollama_line("")
        line["message"]["tool_calls"] = [{"function": {"name": name, "arguments": {"x": 1}}}]
        lines.append(line)
    events = ndjson(*lines, ollama_line("", True, done_reason="stop"))
    fake.push("/api/chat", Reply(events=events, content_type="application/x-ndjson"))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    sdk = openai.OpenAI(base_url=nexus.url + "/v1", api_key="unused", max_retries=0)

    messages: list[Any] = list(USER)
    with sdk.chat.completions.stream(model="llama3.2", messages=messages) as stream_:
        final = stream_.get_final_completion()

    calls = final.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", '{"x":1}'),
        ("get_time", '{"x":1}'),
    ]


def test_error_line_mid_stream_becomes_error_event_then_done(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    events = ndjson(ollama_line("Hel"), {"error": "model runner has unexpectedly stopped"})
    fake.push("/api/chat", Reply(events=events, content_type="application/x-ndjson"))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    _, seen = stream(client, nexus.url)
    assert seen[-1] == "[DONE]"
    assert len(seen) == 3
    first, error = orjson.loads(seen[0]), orjson.loads(seen[1])
    assert first["choices"][0]["delta"]["content"] == "Hel"
    assert "choices" not in error
    assert "model runner has unexpectedly stopped" in error["error"]["message"]
    assert error["error"]["type"] == "server_error"
    assert nexus.gateway.registry.get("ollama-1").in_flight == 0


def test_stream_ending_without_done_line_ends_with_error_then_done(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama())
    fake.push(
        "/api/chat",
        Reply(events=ndjson(ollama_line("Hel")), content_type="application/x-ndjson"),
    )
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    _, seen = stream(client, nexus.url)
    assert seen[-1] == "[DONE]"
    assert "error" in orjson.loads(seen[-2])


# --- embeddings ------------------------------------------------------------------------------


def test_embeddings_batch_goes_in_one_call(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama(["nomic-embed-text:latest"], capabilities=["embedding"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(
        f"{nexus.url}/v1/embeddings",
        json={"model": "nomic-embed-text", "input": ["one", "two", "three"]},
    )
    assert resp.status_code == 200, resp.text
    calls = fake.calls("/api/embed")
    assert len(calls) == 1
    assert calls[0].json["input"] == ["one", "two", "three"]
    assert calls[0].json["model"] == "nomic-embed-text:latest"
    body = resp.json()
    assert body["object"] == "list"
    assert body["model"] == "nomic-embed-text:latest"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert [d["embedding"] for d in body["data"]] == [
        [0.5, -0.5, 0.0],
        [0.5, -0.5, 1.0],
        [0.5, -0.5, 2.0],
    ]
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}


def test_embeddings_single_string_and_base64(start_fake, start_nexus, client):
    fake = start_fake(FakeOllama(["nomic-embed-text:latest"], capabilities=["embedding"]))
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    resp = client.post(
        f"{nexus.url}/v1/embeddings",
        json={
            "model": "nomic-embed-text",
            "input": "one",
            "encoding_format": "base64",
            "dimensions": 3,
        },
    )
    assert resp.status_code == 200, resp.text
    sent = fake.calls("/api/embed")[0].json
    assert sent["input"] == "one"
    assert sent["dimensions"] == 3
    encoded = resp.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert array.array("f", base64.b64decode(encoded)).tolist() == [0.5, -0.5, 0.0]


def test_embeddings_batch_is_checked_against_the_context_per_input(start_fake, start_nexus, client):
    # 20 inputs of ~25 tokens each for a 50-token model: each fits, their sum would not.
    fake = start_fake(
        FakeOllama(["nomic-embed-text:latest"], capabilities=["embedding"], context_length=50)
    )
    nexus = start_nexus(settings_for(("ollama-1", fake, "ollama")))
    url = f"{nexus.url}/v1/embeddings"

    batch = client.post(url, json={"model": "nomic-embed-text", "input": ["x" * 100] * 20})
    assert batch.status_code == 200, batch.text
    assert len(batch.json()["data"]) == 20

    too_long = client.post(url, json={"model": "nomic-embed-text", "input": ["short", "x" * 400]})
    assert too_long.status_code == 400, too_long.text  # capability_mismatch: it cannot fit
    assert "context_length" in too_long.text
    assert len(fake.calls("/api/embed")) == 1
