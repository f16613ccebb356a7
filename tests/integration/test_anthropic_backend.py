"""Anthropic's Messages API behind Nexus, read by the official ``openai`` SDK: answers, streams,
tool calls, images, health from the free model list, errors and failover. Every request the fake
receives is checked against Anthropic's published schema, and every answer a client reads
(each stream chunk included) against OpenAI's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from nexus.registry import Status
from tests.contract import anthropic_spec
from tests.contract.openai_answers import CheckedClients, streamed_tool_calls
from tests.fakes import FakeOpenAI, FakeUpstream, Recorded, Reply
from tests.harness import data_events, settings_for, wait_for

KEY_VAR = "NEXUS_TEST_ANTHROPIC_KEY"
KEY = "sk-ant-test-key-1234567890"
CLIENT_KEY = "client-own-secret"
MODEL = "claude-sonnet-4-5"
USER: list[Any] = [{"role": "user", "content": "hi"}]


def event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def message(*content: dict[str, Any], stop: str = "end_turn") -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": list(content),
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 2},
    }


def text_events(*words: str) -> list[bytes]:
    start = message()
    start["content"], start["stop_reason"] = [], None
    out = [event("message_start", message=start), event("ping")]
    out.append(event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
    for word in words:
        out.append(
            event("content_block_delta", index=0, delta={"type": "text_delta", "text": word})
        )
    out.append(event("content_block_stop", index=0))
    out.append(
        event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 4})
    )
    return [*out, event("message_stop")]


class FakeAnthropic(FakeUpstream):
    """Anthropic's API: a model list, and Messages answered with a scripted or plain reply."""

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if method == "GET" and path == "/v1/models":
            data = [
                {
                    "type": "model",
                    "id": name,
                    "display_name": name,
                    "created_at": "2025-01-01T00:00:00Z",
                    "max_input_tokens": 200000,
                    "max_tokens": 64000,
                    "capabilities": None,
                }
                for name in self.models
            ]
            return Reply(json={"data": data, "has_more": False, "first_id": None, "last_id": None})
        if method == "POST" and path == "/v1/messages":
            if orjson.loads(raw).get("stream"):
                return Reply(events=text_events("Hel", "lo"))
            return Reply(json=message({"type": "text", "text": "Hello!"}))
        return None

    def messages(self) -> list[Recorded]:
        """The Messages requests, each checked against the spec and for its headers."""
        calls = self.calls("/v1/messages")
        for call in calls:
            anthropic_spec.validate("CreateMessageParams", call.json)
            headers = {k.lower(): v for k, v in call.headers.items()}
            assert headers["x-api-key"] == KEY
            assert headers["anthropic-version"] == "2023-06-01"
            assert "authorization" not in headers
        return calls


def anthropic_error(status: int, kind: str, text: str) -> Reply:
    return Reply(status=status, json={"type": "error", "error": {"type": kind, "message": text}})


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)


def entry(name: str, fake: FakeUpstream, priority: int = 50) -> dict[str, Any]:
    return {
        "name": name,
        "url": fake.url,
        "type": "anthropic",
        "api_key_env": KEY_VAR,
        "priority": priority,
    }


@pytest.fixture
def checked() -> Iterator[CheckedClients]:
    """Clients whose every answer must fit OpenAI's schema, checked when the test ends."""
    clients = CheckedClients()
    yield clients
    assert clients.check() > 0


@pytest.fixture
def setup(keyed, start_fake, start_nexus, checked):
    fake = start_fake(FakeAnthropic([MODEL]))
    nexus = start_nexus(settings_for(backends=[entry("claude", fake)]))
    backend = nexus.gateway.registry.get("claude")
    assert wait_for(lambda: backend.status is Status.HEALTHY), backend.last_error
    return fake, nexus, checked.sdk(nexus.url, CLIENT_KEY)


def test_a_text_answer_reads_as_openai_with_the_requested_model(setup):
    fake, nexus, sdk = setup
    answer = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *USER],
        temperature=0.2,
        stop="END",
        user="u-1",
    )
    assert answer.choices[0].message.content == "Hello!"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == MODEL
    assert answer.usage is not None and answer.usage.prompt_tokens == 12

    (sent,) = fake.messages()
    body = sent.json
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert body["max_tokens"] == 64000  # the model's largest (the list says so): no limit set
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-1"}
    assert "stream" not in body


def test_models_come_from_the_free_model_list(setup, checked):
    fake, nexus, _ = setup
    rows = {row["id"]: row for row in checked.http().get(nexus.url + "/v1/models").json()["data"]}
    assert rows[MODEL]["context_length"] == 200000
    assert fake.calls("/v1/messages") == []  # the probe never calls a billed endpoint
    probes = [r for r in fake.requests if r.path == "/v1/models"]
    assert probes and all(r.headers.get("x-api-key") == KEY for r in probes)


def test_a_text_stream_with_usage(setup):
    fake, _, sdk = setup
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []  # include_usage: a final chunk with the usage only
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.model == MODEL for c in chunks)
    (sent,) = fake.messages()
    assert sent.json["stream"] is True


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def tool_events() -> list[bytes]:
    start = message()
    start["content"], start["stop_reason"] = [], None
    block = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}
    out = [event("message_start", message=start)]
    out.append(event("content_block_start", index=0, content_block=block))
    for part in ('{"ci', 'ty": "Pa', 'ris"}'):
        delta = {"type": "input_json_delta", "partial_json": part}
        out.append(event("content_block_delta", index=0, delta=delta))
    out.append(event("content_block_stop", index=0))
    out.append(
        event("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 9})
    )
    return [*out, event("message_stop")]


def test_a_streamed_tool_call_arrives_in_fragments(setup):
    fake, _, sdk = setup
    # Every event in one write, then the same stream byte by byte: both read the same.
    whole = b"".join(tool_events())
    fake.push("/v1/messages", Reply(events=[whole]), Reply(events=[bytes([b]) for b in whole]))
    for _ in range(2):
        chunks = list(
            sdk.chat.completions.create(
                model=MODEL, messages=USER, tools=[WEATHER_TOOL], stream=True
            )
        )
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        fragments = [tc.function.arguments for tc in calls if tc.function]
        assert len([f for f in fragments if f]) == 3
        (call,) = streamed_tool_calls(chunks)  # id and name first, then arguments only
        assert call["id"] == "toolu_01" and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    sent = fake.messages()
    assert sent[0].json["tools"][0]["input_schema"] == WEATHER_TOOL["function"]["parameters"]


def test_a_streamed_tool_call_goes_back_with_its_result(setup):
    fake, _, sdk = setup
    fake.push("/v1/messages", Reply(events=tool_events()))
    first = sdk.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL], stream=True
    )
    calls = streamed_tool_calls(first)
    assistant = {"role": "assistant", "content": None, "tool_calls": calls}
    result = {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}
    second = sdk.chat.completions.create(
        model=MODEL, messages=[*USER, assistant, result], tools=[WEATHER_TOOL], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in second if c.choices) == "Hello"
    _, sent = (r.json for r in fake.messages())
    use = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}
    assert sent["messages"][1] == {"role": "assistant", "content": [use]}
    answer = {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"}
    assert sent["messages"][2] == {"role": "user", "content": [answer]}


def test_a_tool_call_round_trip(setup):
    fake, _, sdk = setup
    use = {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "Oslo"}}
    fake.push("/v1/messages", Reply(json=message(use, stop="tool_use")))
    first = sdk.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="required"
    )
    reply = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert reply.tool_calls is not None
    call = reply.tool_calls[0]
    assert call.id == "toolu_02" and json.loads(call.function.arguments) == {"city": "Oslo"}

    second = sdk.chat.completions.create(
        model=MODEL,
        tools=[WEATHER_TOOL],
        messages=[
            *USER,
            reply.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert second.choices[0].message.content == "Hello!"
    first_sent, second_sent = (r.json for r in fake.messages())
    assert first_sent["tool_choice"] == {"type": "any"}
    assert second_sent["messages"][1] == {"role": "assistant", "content": [use]}
    result = {"type": "tool_result", "tool_use_id": "toolu_02", "content": "sunny"}
    assert second_sent["messages"][2] == {"role": "user", "content": [result]}


def test_a_provider_error_comes_back_as_an_openai_envelope(setup):
    fake, _, sdk = setup
    fake.push("/v1/messages", anthropic_error(400, "invalid_request_error", "max_tokens: too big"))
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=10**7)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["message"] == "max_tokens: too big"
    assert body["type"] == "invalid_request_error"


PNG = "iVBORw0KGgo="


def test_images_go_as_base64_and_url_sources(setup):
    fake, _, sdk = setup
    content: list[Any] = [
        {"type": "text", "text": "Same cat?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg"}},
    ]
    answer = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}]
    )
    assert answer.choices[0].message.content == "Hello!"
    (sent,) = fake.messages()
    assert sent.json["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Same cat?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}},
            ],
        }
    ]


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
    ],
    ids=["json_object", "json_schema"],
)
def test_json_mode_is_refused_with_the_reason(setup, response_format):
    # Messages has no JSON mode: dropping response_format would change the answer.
    fake, _, sdk = setup
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=USER, response_format=response_format)
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "capability_mismatch"
    (excluded,) = caught.value.response.json()["context"]["excluded"]
    assert excluded["backend"] == "claude" and excluded["stage"] == "capabilities"
    reason = f"response_format {response_format['type']} (no JSON mode in Anthropic Messages)"
    assert reason in excluded["reason"]
    assert fake.messages() == []


def test_a_bad_key_makes_the_backend_unhealthy_with_the_reason(keyed, start_fake, start_nexus):
    fake = start_fake(FakeAnthropic([MODEL]))
    denied = anthropic_error(401, "authentication_error", f"invalid x-api-key {KEY}")
    fake.push("/v1/models", *[denied] * 5)
    nexus = start_nexus(settings_for(backends=[entry("claude", fake)]))
    backend = nexus.gateway.registry.get("claude")
    assert wait_for(lambda: backend.status is Status.UNHEALTHY and bool(backend.last_error))
    assert "invalid x-api-key" in str(backend.last_error)
    assert KEY not in str(backend.last_error)
    assert fake.calls("/v1/messages") == []


def test_overloaded_fails_over_to_the_next_backend(keyed, start_fake, start_nexus, checked):
    first = start_fake(FakeAnthropic([MODEL]))
    second = start_fake(FakeAnthropic([MODEL]))
    nexus = start_nexus(
        settings_for(
            backends=[entry("primary", first, priority=1), entry("secondary", second, priority=90)],
            routing={"strategy": "priority_only"},
        )
    )
    backends = [nexus.gateway.registry.get(name) for name in ("primary", "secondary")]
    assert wait_for(lambda: all(b.status is Status.HEALTHY for b in backends))
    first.push("/v1/messages", anthropic_error(529, "overloaded_error", "Overloaded"))
    sdk = checked.sdk(nexus.url, CLIENT_KEY)
    answer = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
    assert answer.headers["x-nexus-backend"] == "secondary"
    assert answer.parse().choices[0].message.content == "Hello!"
    assert len(first.messages()) == 1 and len(second.messages()) == 1


def test_an_untranslatable_request_goes_elsewhere_or_gets_the_reason(
    keyed, start_fake, start_nexus, checked
):
    client = checked.http()
    claude = start_fake(FakeAnthropic([MODEL]))
    other = start_fake(FakeOpenAI([MODEL]))
    nexus = start_nexus(settings_for(backends=[entry("claude", claude, priority=1)]))
    body = {"model": MODEL, "messages": USER, "n": 2}
    resp = client.post(nexus.url + "/v1/chat/completions", json=body)
    # Like any capability mismatch: the request must change, so 400 with each backend's reason.
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "capability_mismatch"
    assert "n > 1" in resp.text
    assert claude.calls("/v1/messages") == []

    both = [entry("claude", claude, priority=1), {"name": "gpu", "url": other.url, "type": "vllm"}]
    nexus = start_nexus(settings_for(backends=both, routing={"strategy": "priority_only"}))
    resp = client.post(nexus.url + "/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["x-nexus-backend"] == "gpu"
    assert claude.calls("/v1/messages") == []


OVERLOADED = {"type": "overloaded_error", "message": "Overloaded"}


@pytest.mark.parametrize(
    "failure",
    [
        anthropic_error(529, "overloaded_error", "Overloaded"),
        Reply(events=[event("error", error=OVERLOADED)]),
    ],
    ids=["status-529", "error-event-first"],
)
def test_an_overloaded_stream_start_fails_over(keyed, start_fake, start_nexus, checked, failure):
    first = start_fake(FakeAnthropic([MODEL]))
    second = start_fake(FakeAnthropic([MODEL]))
    nexus = start_nexus(
        settings_for(
            backends=[entry("primary", first, priority=1), entry("secondary", second, priority=90)],
            routing={"strategy": "priority_only"},
        )
    )
    backends = [nexus.gateway.registry.get(name) for name in ("primary", "secondary")]
    assert wait_for(lambda: all(b.status is Status.HEALTHY for b in backends))
    first.push("/v1/messages", failure)
    sdk = checked.sdk(nexus.url, CLIENT_KEY)
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=USER, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert len(first.messages()) == 1 and len(second.messages()) == 1


def test_an_error_mid_stream_ends_it_with_an_openai_error_event(setup, checked):
    fake, nexus, _ = setup
    events = text_events("Hel")[:4] + [event("error", error=OVERLOADED)]
    fake.push("/v1/messages", Reply(events=events))
    body = {"model": MODEL, "messages": USER, "stream": True}
    resp = checked.http().post(nexus.url + "/v1/chat/completions", json=body)
    got = data_events(resp.text)
    assert got[-1] == "[DONE]"
    error = json.loads(got[-2])["error"]
    assert error["message"] == "Overloaded" and error["code"] == "overloaded"
    assert json.loads(got[1])["choices"][0]["delta"]["content"] == "Hel"
