"""The official ``openai`` SDK against ``/v1/responses`` on a real Nexus, in front of an
OpenAI-compatible, an Ollama and an Anthropic upstream: answers, typed event streams, a
function-call round trip (with ``previous_response_id`` and statelessly), hosted tools left out,
``text.format`` and errors. Every Response and every stream event the SDK read is checked
against OpenAI's published schema (``agent_answers``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexus.registry import Status
from tests.agent_fakes import (
    ANTHROPIC_KEY,
    ANTHROPIC_KEY_VAR,
    MODELS,
    Rig,
    backend_entry,
    make_fake,
)
from tests.fakes import DONE, FakeUpstream, Reply, chunk, sse, text_stream
from tests.harness import settings_for, wait_for

from .agent_answers import AgentClients

KINDS = ["openai", "ollama", "anthropic"]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
    "required": ["city"],
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": WEATHER_SCHEMA,
    "strict": False,  # as Codex sends them
}
TOOLS: list[Any] = [WEATHER]
QUESTION = "What is the weather in Paris?"
FRAGMENTS = ['{"ci', 'ty": "Pa', 'ris", "un', 'it": "c"}']
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_END = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def clients() -> Iterator[AgentClients]:
    """SDK clients whose every answer is validated against the spec when the test ends."""
    made = AgentClients()
    yield made
    assert made.check() > 0


@pytest.fixture
def make_rig(monkeypatch, start_fake, start_nexus) -> Callable[..., Rig]:
    monkeypatch.setenv(ANTHROPIC_KEY_VAR, ANTHROPIC_KEY)

    def make(kind: str, fake: FakeUpstream | None = None) -> Rig:
        model = MODELS[kind]
        fake = start_fake(fake or make_fake(kind, model))
        nexus = start_nexus(settings_for(backends=[backend_entry(kind, fake)]))
        backend = nexus.gateway.registry.get("up")
        assert wait_for(lambda: backend.status is Status.HEALTHY), backend.last_error
        return Rig(kind, fake, nexus, model)

    return make


@pytest.fixture(params=KINDS)
def rig(request, make_rig) -> Rig:
    made: Rig = make_rig(request.param)
    return made


def text_of(content: Any) -> str:
    """A message's text in any dialect: a string, or its text parts/blocks joined."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or () if isinstance(part, dict))


def turns(rig: Rig) -> list[tuple[str, str]]:
    """(role, text) of the conversation the upstream received, system first."""
    body = rig.last()
    out = []
    if rig.kind == "anthropic" and body.get("system"):
        out.append(("system", text_of(body["system"])))
    for message in body["messages"]:
        out.append((message["role"], text_of(message.get("content"))))
    return out


# --- responses.create --------------------------------------------------------------------------


def test_create_with_a_string_input(rig, clients):
    sdk = clients.openai(rig.nexus.url)
    text = rig.push_text(["Hello", " world"], stream=False)
    response = sdk.responses.create(model=rig.model, input=QUESTION, max_output_tokens=64)
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == text
    assert [item.type for item in response.output] == ["message"]
    assert response.model == rig.model
    assert response.usage is not None and response.usage.output_tokens > 0
    assert turns(rig) == [("user", QUESTION)]
    limit = {"openai": "max_tokens", "anthropic": "max_tokens"}.get(rig.kind)
    if limit:
        assert rig.last()[limit] == 64


def test_create_with_items_and_instructions(rig, clients):
    sdk = clients.openai(rig.nexus.url)
    text = rig.push_text(["Fine."], stream=False)
    items: list[Any] = [
        {"role": "developer", "content": "Answer in metric units."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "message", "role": "assistant", "content": "Hello."},
        {"role": "user", "content": QUESTION},
    ]
    response = sdk.responses.create(model=rig.model, input=items, instructions="Be brief.")
    assert response.output_text == text
    assert response.instructions == "Be brief."
    seen = turns(rig)
    assert seen[0][0] == "system"
    assert "Be brief." in seen[0][1] and "Answer in metric units." in seen[0][1]
    assert seen[1:] == [("user", "hi"), ("assistant", "Hello."), ("user", QUESTION)]


# --- streams -----------------------------------------------------------------------------------


def test_streamed_events_in_order(rig, clients):
    sdk = clients.openai(rig.nexus.url)
    words = ["Hel", "lo", " there"]
    text = rig.push_text(words, stream=True)
    events = list(sdk.responses.create(model=rig.model, input=QUESTION, stream=True))
    kinds = [event.type for event in events]
    deltas = ["response.output_text.delta"] * len(words)
    assert kinds == [*TEXT_EVENTS, *deltas, *TEXT_END]
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(len(events)))
    pieces = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert pieces == words
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == text
    assert last.response.usage is not None
    ids = {e.response.id for e in events if e.type in ("response.created", "response.completed")}
    assert len(ids) == 1


def test_stream_helper_final_response(rig, clients):
    sdk = clients.openai(rig.nexus.url)
    text = rig.push_text(["Sun", "ny."], stream=True)
    with sdk.responses.stream(model=rig.model, input=QUESTION) as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert streamed == text
    assert final.output_text == text
    assert final.status == "completed"


def test_a_stream_cut_by_the_upstream_ends_with_response_failed(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    rig.fake.push(rig.path, Reply(events=text_stream(["a", "b", "c"]), drop_after=2))
    events = list(sdk.responses.create(model=rig.model, input=QUESTION, stream=True))
    assert events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None
    assert [e.sequence_number for e in events] == list(range(len(events)))


# --- a function-call round trip ----------------------------------------------------------------


def test_function_call_round_trip(rig, clients):
    sdk = clients.openai(rig.nexus.url)
    arguments = json.loads("".join(FRAGMENTS))
    upstream_id = "toolu_01ABC" if rig.kind == "anthropic" else "call_w1"
    call_id = rig.push_tool_call(upstream_id, "get_weather", FRAGMENTS, stream=True)
    events = list(
        sdk.responses.create(
            model=rig.model, input=QUESTION, tools=TOOLS, tool_choice="auto", stream=True
        )
    )
    kinds = [event.type for event in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert json.loads("".join(deltas)) == arguments
    if rig.kind != "ollama":  # Ollama sends a call whole; the others in fragments, kept as such
        assert deltas == FRAGMENTS
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == arguments
    assert kinds[-1] == "response.completed"
    first = events[-1].response
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == arguments
    if call_id:
        assert call.call_id == call_id
    if rig.kind == "openai":
        function = {k: v for k, v in WEATHER.items() if k != "type"}
        assert rig.last()["tools"] == [{"type": "function", "function": function}]
        assert rig.last()["tool_choice"] == "auto"

    output = {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}
    text = rig.push_text(["It is sunny."], stream=False)
    second = sdk.responses.create(
        model=rig.model, previous_response_id=first.id, input=[output], tools=TOOLS
    )
    assert second.output_text == text
    chained = rig.last()
    check_tool_turn(rig, chained, call.call_id, arguments)

    # The same turn statelessly: the items passed back instead of the id.
    rig.push_text(["It is sunny."], stream=False)
    items: list[Any] = [
        {"role": "user", "content": QUESTION},
        call.model_dump(exclude_none=True),
        output,
    ]
    third = sdk.responses.create(model=rig.model, input=items, tools=TOOLS, store=False)
    assert third.output_text == text
    stateless = rig.last()
    assert stateless["messages"] == chained["messages"]


def check_tool_turn(rig: Rig, body: dict[str, Any], call_id: str, arguments: Any) -> None:
    """The upstream got the question, the call and its result, in its own dialect."""
    messages = body["messages"]
    assert text_of(messages[0]["content"]) == QUESTION
    if rig.kind == "openai":
        assistant, tool = messages[-2], messages[-1]
        assert [c["id"] for c in assistant["tool_calls"]] == [call_id]
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == arguments
        assert tool == {"role": "tool", "tool_call_id": call_id, "content": "18 degrees"}
    elif rig.kind == "ollama":
        assert messages[-2]["tool_calls"] == [
            {"function": {"name": "get_weather", "arguments": arguments}}
        ]
        assert messages[-1] == {"role": "tool", "content": "18 degrees", "tool_name": "get_weather"}
    else:
        use = messages[-2]["content"]
        assert [(b["type"], b["id"], b["input"]) for b in use] == [("tool_use", call_id, arguments)]
        result = messages[-1]["content"]
        assert [(b["type"], b["tool_use_id"]) for b in result] == [("tool_result", call_id)]
        assert text_of(result[0]["content"]) == "18 degrees"


# --- tools, formats, errors --------------------------------------------------------------------


def test_hosted_tools_are_dropped_and_named(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    tools: list[Any] = [{"type": "web_search"}, WEATHER]
    raw = sdk.responses.with_raw_response.create(model=rig.model, input=QUESTION, tools=tools)
    assert raw.parse().output_text == "Hello!"
    assert raw.headers["x-nexus-dropped-tools"] == "web_search"
    assert [tool["function"]["name"] for tool in rig.last()["tools"]] == ["get_weather"]


def test_a_function_tool_without_strict_is_echoed_as_a_valid_tool(make_rig, clients):
    """The SDK's users leave ``strict`` out; the Response still echoes a valid FunctionTool
    (the spec requires ``strict``; OpenAI answers with its default)."""
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    loose = {k: v for k, v in WEATHER.items() if k != "strict"}
    response = sdk.responses.create(model=rig.model, input=QUESTION, tools=[loose])
    assert response.output_text == "Hello!"
    echoed = json.loads(clients.on("/v1/responses")[-1].body())["tools"]
    assert [tool["name"] for tool in echoed] == ["get_weather"]
    assert isinstance(echoed[0]["strict"], bool)


def test_text_format_json_schema_reaches_the_upstream_as_response_format(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    rig.push_text(['{"city": "Paris"}'], stream=False)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    text: Any = {
        "format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}
    }
    response = sdk.responses.create(model=rig.model, input=QUESTION, text=text)
    assert json.loads(response.output_text) == {"city": "Paris"}
    assert rig.last()["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "place", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_previous_response_id_is_404(make_rig, clients, stream):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.responses.create(
            model=rig.model, input=QUESTION, previous_response_id="resp_nope", stream=stream
        )
    assert caught.value.status_code == 404
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "previous_response_not_found"  # the SDK hands over the error object
    assert body["param"] == "previous_response_id"
    assert not rig.generations()


def test_unknown_model_is_404(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.responses.create(model="no-such-model", input=QUESTION)
    assert caught.value.status_code == 404
    assert "no-such-model" in str(caught.value)


def test_tools_on_a_backend_without_tools_is_an_actionable_error(make_rig, clients):
    from tests.fakes import FakeOllama

    rig = make_rig("ollama", FakeOllama([MODELS["ollama"]], capabilities=["completion"]))
    sdk = clients.openai(rig.nexus.url)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model=rig.model, input=QUESTION, tools=TOOLS)
    assert caught.value.status_code == 400
    exchange = clients.on("/v1/responses")[-1]
    envelope = json.loads(exchange.body())
    reasons = [item["reason"] for item in envelope["context"]["excluded"]]
    assert reasons == ["model lacks tools"]
    assert not rig.generations()


# --- one pipeline: headers, history, metrics ---------------------------------------------------


def test_headers_history_and_metrics_carry_the_responses_api(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    raw = sdk.responses.with_raw_response.create(model=rig.model, input=QUESTION)
    assert raw.parse().output_text == "Hello!"
    assert raw.headers["x-nexus-backend"] == "up"
    request_id = raw.headers["x-request-id"]
    assert request_id
    http = clients.http()

    def entries() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = http.get(rig.nexus.url + "/v1/history").json()["data"]
        return found

    assert wait_for(lambda: len(entries()) == 1)
    entry = entries()[0]
    assert (entry["api"], entry["request_id"], entry["status"]) == ("responses", request_id, 200)
    text = http.get(rig.nexus.url + "/metrics").text
    totals = {
        (s.labels["api"], s.labels["backend"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "nexus_requests_total"
    }
    assert totals == {("responses", "up", "200"): 1.0}


def test_namespace_tools_are_flattened_and_calls_scoped_again(make_rig, clients):
    """Codex's MCP tools come as a ``namespace``: the upstream sees one flat function name, the
    client a call scoped by ``namespace``; passed back, the call reaches the upstream flat."""
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    read = {
        "type": "function",
        "name": "read_file",
        "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        "strict": False,
    }
    tools: list[Any] = [
        {"type": "namespace", "name": "mcp__fs__", "description": "Files", "tools": [read]}
    ]
    rig.push_tool_call("call_r1", "mcp__fs__read_file", ['{"path": "a.txt"}'], stream=False)
    first = sdk.responses.create(model=rig.model, input=QUESTION, tools=tools)
    assert [tool["function"]["name"] for tool in rig.last()["tools"]] == ["mcp__fs__read_file"]
    raw = json.loads(clients.on("/v1/responses")[-1].body())
    calls = [item for item in raw["output"] if item["type"] == "function_call"]
    assert [(c["namespace"], c["name"], c["call_id"]) for c in calls] == [
        ("mcp__fs__", "read_file", "call_r1")
    ]
    assert first.output[0].type == "function_call"

    rig.push_text(["Done."], stream=False)
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"}
    items: list[Any] = [
        {"role": "user", "content": QUESTION},
        reasoning,  # Codex passes its reasoning items back; another backend cannot read them
        calls[0],
        {"type": "function_call_output", "call_id": "call_r1", "output": "hello"},
    ]
    second = sdk.responses.create(model=rig.model, input=items, tools=tools, store=False)
    assert second.output_text == "Done."
    assistant, tool = rig.last()["messages"][-2:]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["mcp__fs__read_file"]
    assert tool == {"role": "tool", "tool_call_id": "call_r1", "content": "hello"}


def test_a_context_too_small_for_the_instructions_is_an_actionable_error(make_rig, clients):
    """An agent's long system prompt on a small model: refused with the reason, in OpenAI's
    envelope, never sent to be cut short."""
    from tests.fakes import FakeOpenAI

    rig = make_rig("openai", FakeOpenAI(max_model_len=512))
    sdk = clients.openai(rig.nexus.url)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model=rig.model, input=QUESTION, instructions="Be careful. " * 800)
    assert caught.value.status_code == 400
    envelope = json.loads(clients.on("/v1/responses")[-1].body())
    reasons = " ".join(item["reason"] for item in envelope["context"]["excluded"])
    assert "context" in reasons, reasons
    assert not rig.generations()


def test_reasoning_streams_as_a_reasoning_item(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    final_chunk = chunk()
    final_chunk["choices"][0]["finish_reason"] = "stop"
    events = [
        sse(chunk(role="assistant", reasoning_content="Let me ")),
        sse(chunk(reasoning_content="think.")),
        sse(chunk(content="Paris.")),
        sse(final_chunk),
        DONE,
    ]
    rig.fake.push(rig.path, Reply(events=events))
    streamed = list(sdk.responses.create(model=rig.model, input=QUESTION, stream=True))
    kinds = [event.type for event in streamed]
    assert kinds.count("response.reasoning_text.delta") == 2
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    final = streamed[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["reasoning", "message"]
    assert final.response.output_text == "Paris."


def test_parallel_function_calls_stream_as_separate_items(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)

    def call(index: int, call_id: str, city: str) -> list[bytes]:
        head = {"index": index, "id": call_id, "type": "function"}
        head["function"] = {"name": "get_weather", "arguments": '{"city": '}
        more = {"index": index, "function": {"arguments": city}}
        return [sse(chunk(tool_calls=[head])), sse(chunk(tool_calls=[more]))]

    final_chunk = chunk()
    final_chunk["choices"][0]["finish_reason"] = "tool_calls"
    events = [*call(0, "call_a", '"Paris"}'), *call(1, "call_b", '"Oslo"}'), sse(final_chunk), DONE]
    rig.fake.push(rig.path, Reply(events=events))
    streamed = list(
        sdk.responses.create(
            model=rig.model, input=QUESTION, tools=TOOLS, parallel_tool_calls=True, stream=True
        )
    )
    final = streamed[-1]
    assert final.type == "response.completed"
    calls = [
        (i.call_id, json.loads(i.arguments))
        for i in final.response.output
        if i.type == "function_call"
    ]
    assert calls == [("call_a", {"city": "Paris"}), ("call_b", {"city": "Oslo"})]
    assert rig.last()["parallel_tool_calls"] is True


def test_a_client_that_leaves_a_stream_cancels_the_upstream(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    rig.fake.push(rig.path, Reply(events=text_stream(["one", "two"]), hang_after=2))
    with sdk.responses.stream(model=rig.model, input=QUESTION) as stream:
        first = next(iter(stream))
        assert first.type == "response.created"
    clients.on("/v1/responses")[-1].cut = True
    assert rig.fake.wait_disconnect(10), "the upstream call was left open"


def test_a_response_not_stored_cannot_be_continued(make_rig, clients):
    rig = make_rig("openai")
    sdk = clients.openai(rig.nexus.url)
    kept = sdk.responses.create(model=rig.model, input=QUESTION)
    unkept = sdk.responses.create(model=rig.model, input=QUESTION, store=False)
    assert kept.store is True and unkept.store is False
    rig.push_text(["Again."], stream=False)
    later = sdk.responses.create(model=rig.model, input="more", previous_response_id=kept.id)
    assert later.previous_response_id == kept.id
    assert turns(rig) == [("user", QUESTION), ("assistant", "Hello!"), ("user", "more")]
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model=rig.model, input="more", previous_response_id=unkept.id)
