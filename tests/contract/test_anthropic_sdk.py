"""The official ``anthropic`` SDK against ``/v1/messages`` on a real Nexus, in front of an
OpenAI-compatible, an Ollama and an Anthropic upstream: answers, streams, a tool-use round trip
with streamed arguments, ``count_tokens`` and errors. Every answer and stream event the SDK read
is checked against Anthropic's published schema (``agent_answers``); an Anthropic upstream must
receive the client's own request and its answer must reach the client as it came."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexus.dialects.anthropic_inbound import estimate_input_tokens
from nexus.registry import Status
from tests.agent_fakes import (
    ANTHROPIC_KEY,
    ANTHROPIC_KEY_VAR,
    MODELS,
    FakeAnthropic,
    Rig,
    backend_entry,
    claude_text_events,
    make_fake,
)
from tests.fakes import DONE, FakeOllama, FakeOpenAI, FakeUpstream, Reply, chunk, sse, text_stream
from tests.harness import NexusServer, settings_for, wait_for

from .agent_answers import AgentClients

KINDS = ["openai", "ollama", "anthropic"]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
    "required": ["city"],
}
TOOLS: list[Any] = [
    {"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER_SCHEMA}
]
USER: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
FRAGMENTS = ['{"ci', 'ty": "Pa', 'ris", "un', 'it": "c"}']


@pytest.fixture
def clients() -> Iterator[AgentClients]:
    """SDK clients whose every answer is validated against the spec when the test ends."""
    made = AgentClients()
    yield made
    assert made.check() > 0


Starter = Callable[..., Rig]


@pytest.fixture
def make_rig(monkeypatch, start_fake, start_nexus) -> Starter:
    """A Nexus in front of one healthy fake upstream of a kind."""
    monkeypatch.setenv(ANTHROPIC_KEY_VAR, ANTHROPIC_KEY)

    def make(kind: str, fake: FakeUpstream | None = None, **entry: Any) -> Rig:
        model = MODELS[kind]
        fake = start_fake(fake or make_fake(kind, model))
        backends = [{**backend_entry(kind, fake), **entry}]
        nexus = start_nexus(settings_for(backends=backends))
        backend = nexus.gateway.registry.get("up")
        assert wait_for(lambda: backend.status is Status.HEALTHY), backend.last_error
        return Rig(kind, fake, nexus, model)

    return make


@pytest.fixture(params=KINDS)
def rig(request, make_rig) -> Rig:
    made: Rig = make_rig(request.param)
    return made


def sdk_of(clients: AgentClients, nexus: NexusServer) -> anthropic.Anthropic:
    return clients.anthropic(nexus.url)


def texts(message: anthropic.types.Message) -> list[str]:
    return [block.text for block in message.content if block.type == "text"]


# --- messages.create ---------------------------------------------------------------------------


def test_create_with_a_system_string(rig, clients):
    sdk = sdk_of(clients, rig.nexus)
    text = rig.push_text(["Hello", " world"], stream=False)
    answer = sdk.messages.create(
        model=rig.model,
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": "hi"}],
        stop_sequences=["END"],
        metadata={"user_id": "user-1"},
        extra_body={"temperature": 0.2, "top_k": 40},  # no longer in the SDK's signature
    )
    assert answer.type == "message" and answer.role == "assistant"
    assert texts(answer) == [text]
    assert answer.stop_reason == "end_turn"
    assert answer.model == rig.model
    assert answer.usage.output_tokens > 0
    sent = clients.on("/v1/messages")[-1].request
    received = rig.last()
    if rig.kind == "anthropic":
        assert received == sent  # the client's own request, untouched
        return
    assert received["messages"][:2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    if rig.kind == "openai":
        assert received["temperature"] == 0.2
        assert received["stop"] == ["END"]
        assert received["max_tokens"] == 64
        assert received["user"] == "user-1"


def test_create_with_system_blocks_and_a_system_entry_in_messages(rig, clients):
    """Claude Code's shape: cached system blocks, a ``system`` entry between turns, thinking,
    a beta field and header. Another backend gets the system texts in place; Anthropic gets all
    of it untouched."""
    sdk = sdk_of(clients, rig.nexus)
    text = rig.push_text(["Fine."], stream=False)
    system: list[Any] = [
        {"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief."},
    ]
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "The user prefers French."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "again", "cache_control": {"type": "ephemeral"}}],
        },
    ]
    answer = sdk.messages.create(
        model=rig.model,
        max_tokens=2048,
        system=system,
        messages=messages,
        thinking={"type": "enabled", "budget_tokens": 1024},
        metadata={"user_id": "user-1"},
        extra_headers={"anthropic-beta": "context-management-2025-06-27"},
        extra_body={"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
    )
    assert texts(answer) == [text]
    sent = clients.on("/v1/messages")[-1].request
    assert sent["context_management"] and sent["thinking"]  # what the SDK really sent
    received = rig.last()
    if rig.kind == "anthropic":
        assert received == sent
        return
    roles = [(m["role"], m["content"]) for m in received["messages"]]
    assert roles == [
        ("system", "You are a coding agent.\n\nBe brief."),
        ("user", "hi"),
        ("assistant", "Hello."),
        ("system", "The user prefers French."),
        ("user", "again"),
    ]


# --- messages.stream ---------------------------------------------------------------------------


def test_stream_text_and_the_accumulated_message(rig, clients):
    sdk = sdk_of(clients, rig.nexus)
    words = ["Hel", "lo", " there"]
    text = rig.push_text(words, stream=True)
    with sdk.messages.stream(model=rig.model, max_tokens=64, messages=USER) as stream:
        streamed = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(streamed) == text
    assert texts(final) == [text]
    assert final.stop_reason == "end_turn"
    assert final.model == rig.model
    assert final.usage.output_tokens > 0
    exchange = clients.on("/v1/messages")[-1]
    assert exchange.streamed
    if rig.kind == "anthropic":  # Anthropic's own events, byte for byte
        assert exchange.body() == b"".join(claude_text_events(*words))
        assert rig.last() == exchange.request
        return
    kinds = [data["type"] for _, data in exchange.events()]
    blocks = ["content_block_start", *["content_block_delta"] * len(words), "content_block_stop"]
    assert kinds == ["message_start", "ping", *blocks, "message_delta", "message_stop"]


# --- a tool-use round trip ---------------------------------------------------------------------


def test_tool_use_round_trip_with_streamed_arguments(rig, clients):
    sdk = sdk_of(clients, rig.nexus)
    arguments = json.loads("".join(FRAGMENTS))
    upstream_id = "toolu_01ABC" if rig.kind == "anthropic" else "call_w1"
    call_id = rig.push_tool_call(upstream_id, "get_weather", FRAGMENTS, stream=True)
    with sdk.messages.stream(
        model=rig.model, max_tokens=256, messages=USER, tools=TOOLS, tool_choice={"type": "auto"}
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    calls = [block for block in final.content if block.type == "tool_use"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather"
    assert call.input == arguments  # the SDK's accumulation of the streamed fragments
    if call_id:
        assert call.id == call_id
    first = clients.on("/v1/messages")[-1]
    deltas = [
        data["delta"]["partial_json"]
        for _, data in first.events()
        if data["type"] == "content_block_delta" and data["delta"]["type"] == "input_json_delta"
    ]
    assert json.loads("".join(deltas)) == arguments
    if rig.kind != "ollama":  # Ollama sends a call whole; the others in fragments, kept as such
        assert deltas == FRAGMENTS
    if rig.kind == "openai":
        tools = rig.last()["tools"]
        function = {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": WEATHER_SCHEMA,
        }
        assert tools == [{"type": "function", "function": function}]
        assert rig.last()["tool_choice"] == "auto"

    result = "18 degrees, sunny"
    text = rig.push_text(["It is sunny."], stream=False)
    history: list[Any] = [
        *USER,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}],
        },
    ]
    second = sdk.messages.create(model=rig.model, max_tokens=256, messages=history, tools=TOOLS)
    assert texts(second) == [text]
    received = rig.last()
    if rig.kind == "anthropic":
        assert received == clients.on("/v1/messages")[-1].request
        return
    turns = received["messages"]
    if rig.kind == "openai":
        assistant = turns[-2]
        assert assistant["role"] == "assistant"
        assert [c["id"] for c in assistant["tool_calls"]] == [call.id]
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == arguments
        assert turns[-1] == {"role": "tool", "tool_call_id": call.id, "content": result}
    else:
        assert turns[-2]["tool_calls"] == [
            {"function": {"name": "get_weather", "arguments": arguments}}
        ]
        assert turns[-1] == {"role": "tool", "content": result, "tool_name": "get_weather"}


# --- count_tokens ------------------------------------------------------------------------------


def test_count_tokens(rig, clients):
    sdk = sdk_of(clients, rig.nexus)
    counted = sdk.messages.count_tokens(
        model=rig.model, system="Be brief.", messages=USER, tools=TOOLS
    )
    sent = clients.on("/v1/messages/count_tokens")[-1].request
    assert not rig.generations(), "counting must not generate"
    if rig.kind == "anthropic":
        assert counted.input_tokens == FakeAnthropic.input_tokens  # the provider's count
        asked = rig.fake.calls("/v1/messages/count_tokens")
        assert len(asked) == 1
        assert asked[0].json == sent
        assert asked[0].headers["x-api-key"] == ANTHROPIC_KEY
        return
    assert counted.input_tokens == estimate_input_tokens(sent) > 0


# --- errors ------------------------------------------------------------------------------------


def anthropic_error(exc: anthropic.APIStatusError) -> dict[str, Any]:
    """The envelope the SDK read, checked for Anthropic's shape."""
    body = exc.body
    assert isinstance(body, dict) and body["type"] == "error", body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_a_not_found_error(make_rig, clients, stream):
    rig = make_rig("openai")
    sdk = sdk_of(clients, rig.nexus)
    with pytest.raises(anthropic.NotFoundError) as caught:
        if stream:
            with sdk.messages.stream(model="no-such-model", max_tokens=8, messages=USER) as s:
                s.get_final_message()
        else:
            sdk.messages.create(model="no-such-model", max_tokens=8, messages=USER)
    assert caught.value.status_code == 404
    error = anthropic_error(caught.value)
    assert error["type"] == "not_found_error"
    assert "no-such-model" in error["message"]
    assert not rig.generations()


@pytest.mark.parametrize("kind", KINDS)
def test_no_healthy_backend_is_529_overloaded(make_rig, clients, kill, kind):
    rig = make_rig(kind)
    sdk = sdk_of(clients, rig.nexus)
    kill(rig.fake)
    for _ in range(2):  # the failed try (the backend is gone), then nothing healthy is left
        with pytest.raises(anthropic.OverloadedError) as caught:
            sdk.messages.create(model=rig.model, max_tokens=8, messages=USER)
        assert caught.value.status_code == 529
        assert anthropic_error(caught.value)["type"] == "overloaded_error"
    backend = rig.nexus.gateway.registry.get("up")
    assert backend.status is not Status.HEALTHY


def test_a_full_backend_with_no_queue_is_529_overloaded(
    monkeypatch, start_fake, start_nexus, clients
):
    fake = start_fake(FakeOpenAI())
    entry = {"name": "up", "url": fake.url, "type": "vllm", "max_concurrent": 1}
    nexus = start_nexus(settings_for(backends=[entry], queue={"enabled": False}))
    sdk = sdk_of(clients, nexus)
    fake.push("/v1/chat/completions", Reply(events=text_stream(["one", "two"]), hang_after=2))
    with sdk.messages.stream(model="mock-model", max_tokens=8, messages=USER) as held:
        first = next(iter(held))  # the only slot is taken while this stream is open
        assert first.type == "message_start"
        with pytest.raises(anthropic.OverloadedError) as caught:
            sdk.messages.create(model="mock-model", max_tokens=8, messages=USER)
    clients.on("/v1/messages")[0].cut = True
    assert caught.value.status_code == 529
    error = anthropic_error(caught.value)
    assert error["type"] == "overloaded_error"
    assert "capacity" in error["message"].lower()


def test_tools_on_a_backend_without_tools_is_an_actionable_error(make_rig, clients):
    rig = make_rig("ollama", FakeOllama([MODELS["ollama"]], capabilities=["completion"]))
    sdk = sdk_of(clients, rig.nexus)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(model=rig.model, max_tokens=8, messages=USER, tools=TOOLS)
    assert caught.value.status_code == 400
    error = anthropic_error(caught.value)
    assert error["type"] == "invalid_request_error"
    # Actionable: it says what is missing (tools) and where (the backend), in the envelope itself.
    message = error["message"].lower()
    assert "tool" in message and "up" in message, error["message"]
    assert not rig.generations()


# --- one pipeline: headers, history, metrics ---------------------------------------------------


def test_headers_history_and_metrics_carry_the_messages_api(make_rig, clients):
    rig = make_rig("openai")
    sdk = sdk_of(clients, rig.nexus)
    raw = sdk.messages.with_raw_response.create(model=rig.model, max_tokens=8, messages=USER)
    assert texts(raw.parse()) == ["Hello!"]
    assert raw.headers["x-nexus-backend"] == "up"
    request_id = raw.headers["x-request-id"]
    assert request_id
    http = clients.http()

    def entries() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = http.get(rig.nexus.url + "/v1/history").json()["data"]
        return found

    assert wait_for(lambda: len(entries()) == 1)
    entry = entries()[0]
    assert (entry["api"], entry["request_id"], entry["status"]) == ("messages", request_id, 200)
    assert requests_total(http, rig.nexus) == {("messages", "up", "mock-model", "200"): 1.0}


def requests_total(http: Any, nexus: NexusServer) -> dict[tuple[str, ...], float]:
    """``nexus_requests_total`` by (api, backend, model, status), from ``/metrics``."""
    text = http.get(nexus.url + "/metrics").text
    return {
        (s.labels["api"], s.labels["backend"], s.labels["model"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "nexus_requests_total"
    }


# --- keys, beta headers, server tools, the provider's own errors -------------------------------


@pytest.mark.parametrize("form", ["x-api-key", "bearer"])
def test_the_client_key_reaches_a_keyless_backend_in_either_form(make_rig, clients, form):
    rig = make_rig("openai")
    if form == "x-api-key":
        sdk = clients.anthropic(rig.nexus.url, api_key="client-key-1")
    else:
        sdk = clients.anthropic(rig.nexus.url, api_key=None, auth_token="client-key-1")
    answer = sdk.messages.create(model=rig.model, max_tokens=8, messages=USER)
    assert texts(answer) == ["Hello!"]
    headers = {k.lower(): v for k, v in rig.generations()[-1].headers.items()}
    assert headers["authorization"] == "Bearer client-key-1"
    assert "x-api-key" not in headers


def test_the_anthropic_beta_header_reaches_an_anthropic_backend(make_rig, clients):
    """Beta fields pass through natively, so must the header that enables them (Claude Code
    sends several betas on every request); the backend's own key replaces the client's."""
    rig = make_rig("anthropic")
    sdk = clients.anthropic(rig.nexus.url, api_key="client-key-1")
    betas = "context-management-2025-06-27,interleaved-thinking-2025-05-14"
    sdk.messages.create(
        model=rig.model,
        max_tokens=8,
        messages=USER,
        extra_headers={"anthropic-beta": betas},
        extra_body={"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
    )
    headers = {k.lower(): v for k, v in rig.generations()[-1].headers.items()}
    assert headers["x-api-key"] == ANTHROPIC_KEY
    assert headers.get("anthropic-beta") == betas


def test_server_tools_are_dropped_and_named_for_other_backends(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.anthropic(rig.nexus.url)
    tools: list[Any] = [{"type": "web_search_20250305", "name": "web_search"}, *TOOLS]
    raw = sdk.messages.with_raw_response.create(
        model=rig.model, max_tokens=8, messages=USER, tools=tools
    )
    assert texts(raw.parse()) == ["Hello!"]
    assert raw.headers["x-nexus-dropped-tools"] == "web_search"
    assert [tool["function"]["name"] for tool in rig.last()["tools"]] == ["get_weather"]


def test_server_tools_reach_an_anthropic_backend_and_are_not_named_dropped(make_rig, clients):
    rig = make_rig("anthropic")
    sdk = clients.anthropic(rig.nexus.url)
    tools: list[Any] = [{"type": "web_search_20250305", "name": "web_search"}, *TOOLS]
    raw = sdk.messages.with_raw_response.create(
        model=rig.model, max_tokens=8, messages=USER, tools=tools
    )
    assert texts(raw.parse()) == ["Hello!"]
    assert rig.last()["tools"] == tools  # Anthropic runs its own server tools
    assert "x-nexus-dropped-tools" not in raw.headers


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_backend_error_reaches_the_client_with_its_type(make_rig, clients, stream):
    rig = make_rig("anthropic")
    sdk = clients.anthropic(rig.nexus.url)
    error = {"type": "invalid_request_error", "message": "messages.0: bad block"}
    rig.fake.push(rig.path, Reply(status=400, json={"type": "error", "error": error}))
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(model=rig.model, max_tokens=8, messages=USER, stream=stream)
    got = anthropic_error(caught.value)
    assert got["type"] == "invalid_request_error"
    assert "messages.0: bad block" in got["message"]


def test_the_error_envelope_carries_the_request_id(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.anthropic(rig.nexus.url)
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk.messages.create(model="no-such-model", max_tokens=8, messages=USER)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["request_id"] == caught.value.response.headers["x-request-id"]


def test_a_stream_cut_by_the_upstream_ends_with_an_error_event(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.anthropic(rig.nexus.url)
    rig.fake.push(rig.path, Reply(events=text_stream(["a", "b", "c"]), drop_after=2))
    with (
        pytest.raises(anthropic.APIStatusError),
        sdk.messages.stream(model=rig.model, max_tokens=8, messages=USER) as stream,
    ):
        stream.get_final_message()
    kinds = [data["type"] for _, data in clients.on("/v1/messages")[-1].events()]
    assert kinds[0] == "message_start" and kinds[-1] == "error", kinds


def test_tool_choice_naming_a_server_tool_reaches_an_anthropic_backend(make_rig, clients):
    """Only Anthropic runs its server tools; forcing one is valid there, and the request is
    Anthropic's own: the checks made for translating it must not refuse it."""
    rig = make_rig("anthropic")
    sdk = clients.anthropic(rig.nexus.url)
    tools: list[Any] = [{"type": "web_search_20250305", "name": "web_search"}]
    answer = sdk.messages.create(
        model=rig.model,
        max_tokens=8,
        messages=USER,
        tools=tools,
        tool_choice={"type": "tool", "name": "web_search"},
    )
    assert texts(answer) == ["Hello!"]
    assert rig.last()["tool_choice"] == {"type": "tool", "name": "web_search"}


def test_a_context_too_small_for_the_system_prompt_is_an_actionable_error(make_rig, clients):
    """Claude Code's long system prompt on a small model: refused, the reason in Anthropic's
    envelope itself (the SDK shows the message only), never sent to be cut short."""
    rig = make_rig("openai", FakeOpenAI(max_model_len=512))
    sdk = clients.anthropic(rig.nexus.url)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(
            model=rig.model, max_tokens=64, system="Be careful. " * 800, messages=USER
        )
    error = anthropic_error(caught.value)
    assert error["type"] == "invalid_request_error"
    assert "context" in error["message"].lower().replace("(see context)", ""), error["message"]
    assert not rig.generations()


def test_count_tokens_passes_the_beta_header_to_an_anthropic_backend(make_rig, clients):
    rig = make_rig("anthropic")
    sdk = clients.anthropic(rig.nexus.url)
    betas = "context-management-2025-06-27"
    counted = sdk.messages.count_tokens(
        model=rig.model, messages=USER, extra_headers={"anthropic-beta": betas}
    )
    assert counted.input_tokens == FakeAnthropic.input_tokens
    asked = rig.fake.calls("/v1/messages/count_tokens")[-1]
    assert {k.lower(): v for k, v in asked.headers.items()}.get("anthropic-beta") == betas


# --- more of the answer's shapes -----------------------------------------------------------------


def test_reasoning_streams_as_thinking_blocks(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.anthropic(rig.nexus.url)
    events = [
        sse(chunk(role="assistant", reasoning_content="Let me ")),
        sse(chunk(reasoning_content="think.")),
        sse(chunk(content="Paris.")),
        sse({**chunk(), "choices": [{**chunk()["choices"][0], "finish_reason": "stop"}]}),
        DONE,
    ]
    rig.fake.push(rig.path, Reply(events=events))
    with sdk.messages.stream(
        model=rig.model,
        max_tokens=2048,
        messages=USER,
        thinking={"type": "enabled", "budget_tokens": 1024},
    ) as stream:
        final = stream.get_final_message()
    kinds = [block.type for block in final.content]
    assert kinds == ["thinking", "text"]
    thinking = final.content[0]
    assert thinking.type == "thinking" and thinking.thinking == "Let me think."
    assert texts(final) == ["Paris."]
    deltas = [
        data["delta"]["type"]
        for _, data in clients.on("/v1/messages")[-1].events()
        if data["type"] == "content_block_delta"
    ]
    assert deltas == ["thinking_delta", "thinking_delta", "text_delta"]


def test_parallel_tool_calls_stream_as_separate_blocks(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.anthropic(rig.nexus.url)

    def call(index: int, call_id: str, city: str) -> list[bytes]:
        head = {"index": index, "id": call_id, "type": "function"}
        head["function"] = {"name": "get_weather", "arguments": ""}
        rest = [{"index": index, "function": {"arguments": part}} for part in ('{"city": ', city)]
        return [sse(chunk(tool_calls=[head])), *(sse(chunk(tool_calls=[r])) for r in rest)]

    final_chunk = chunk()
    final_chunk["choices"][0]["finish_reason"] = "tool_calls"
    events = [*call(0, "call_a", '"Paris"}'), *call(1, "call_b", '"Oslo"}'), sse(final_chunk), DONE]
    rig.fake.push(rig.path, Reply(events=events))
    with sdk.messages.stream(
        model=rig.model,
        max_tokens=256,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": False},
    ) as stream:
        final = stream.get_final_message()
    uses = [(b.id, b.input) for b in final.content if b.type == "tool_use"]
    assert uses == [("call_a", {"city": "Paris"}), ("call_b", {"city": "Oslo"})]
    assert final.stop_reason == "tool_use"
    assert rig.last()["tool_choice"] == "required"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            {
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": False,
            },
        ),
    ],
)
def test_every_tool_choice_form(make_rig, clients, choice, expected):
    rig = make_rig("openai")
    sdk = clients.anthropic(rig.nexus.url)
    sdk.messages.create(
        model=rig.model, max_tokens=8, messages=USER, tools=TOOLS, tool_choice=choice
    )
    sent = rig.last()
    assert {key: sent.get(key) for key in expected} == expected


def test_an_image_block_reaches_the_upstream_as_a_data_url(make_rig, clients):
    rig = make_rig("openai", FakeOpenAI(max_model_len=32768))
    sdk = clients.anthropic(rig.nexus.url)
    pixel = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
        "AAAABJRU5ErkJggg=="
    )
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": pixel},
    }
    content: list[Any] = [image, {"type": "text", "text": "What is this?"}]
    sdk.messages.create(
        model=rig.model, max_tokens=8, messages=[{"role": "user", "content": content}]
    )
    parts = rig.last()["messages"][-1]["content"]
    assert parts == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
        {"type": "text", "text": "What is this?"},
    ]


# --- the same pipeline: failover, disconnects ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_failover_from_anthropic_to_a_local_backend_translates(
    monkeypatch, start_fake, start_nexus, clients, stream
):
    """The native request goes to the Anthropic backend first; when it is overloaded the next
    backend, an OpenAI-compatible one, gets the translation and the client Anthropic's shape."""
    monkeypatch.setenv(ANTHROPIC_KEY_VAR, ANTHROPIC_KEY)
    model = "shared-model"
    cloud = start_fake(FakeAnthropic([model]))
    local = start_fake(FakeOpenAI([model]))
    backends = [
        {**backend_entry("anthropic", cloud, "cloud"), "priority": 1},
        {**backend_entry("openai", local, "local"), "priority": 2},
    ]
    routing = {"strategy": "priority_only", "affinity": False}
    nexus = start_nexus(settings_for(backends=backends, routing=routing))
    registry = nexus.gateway.registry

    def healthy() -> bool:
        return all(registry.get(n).status is Status.HEALTHY for n in ("cloud", "local"))

    assert wait_for(healthy)
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    cloud.push("/v1/messages", Reply(status=529, json=overloaded))
    sdk = clients.anthropic(nexus.url)
    raw = sdk.messages.with_raw_response.create(
        model=model, max_tokens=8, messages=USER, stream=stream
    )
    assert raw.headers["x-nexus-backend"] == "local"
    if stream:
        with raw.parse() as events:
            text = "".join(
                e.delta.text
                for e in events
                if e.type == "content_block_delta" and e.delta.type == "text_delta"
            )
        assert text == "Hello there!"
    else:
        assert texts(raw.parse()) == ["Hello!"]
    assert len(cloud.calls("/v1/messages")) == 1
    assert local.calls("/v1/chat/completions")[-1].json["messages"] == USER


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_client_that_leaves_a_stream_cancels_the_upstream(make_rig, clients, kind):
    rig = make_rig(kind)
    sdk = clients.anthropic(rig.nexus.url)
    events = text_stream(["one", "two"]) if kind == "openai" else claude_text_events("one", "two")
    rig.fake.push(rig.path, Reply(events=events, hang_after=2))
    with sdk.messages.stream(model=rig.model, max_tokens=8, messages=USER) as stream:
        first = next(iter(stream))
        assert first.type == "message_start"
    clients.on("/v1/messages")[-1].cut = True
    assert rig.fake.wait_disconnect(10), "the upstream call was left open"
