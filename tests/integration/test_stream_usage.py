"""Every stream's usage is known to Nexus at its end, whether or not the client asked for it,
and the client's stream stays exactly what it was (issue 10, point 2).

OpenAI-compatible backends known to take ``stream_options`` are asked for the usage chunk; the
fake here behaves like OpenAI once asked (``"usage": null`` in every chunk, then a usage-only
chunk), and what the client reads is compared byte for byte with what the same fake sends when
not asked. Translated dialects (Ollama, Anthropic, Gemini) know the usage anyway.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import orjson
import pytest

from nexus.backends import Call, StartedStream
from nexus.backends.base import HTTPAdapter
from nexus.backends.openai import hide_null_usage, usage_payload
from nexus.dialects.anthropic import usage as anthropic_usage
from nexus.registry import Status
from tests.cloud_fakes import FakeClaude, FakeGoogle, gemini_answer
from tests.contract import openapi
from tests.fakes import DONE, FakeOllama, FakeOpenAI, FakeUpstream, Reply, sse
from tests.harness import NexusServer, settings_for, wait_for

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 3,
    "total_tokens": 14,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
GUARD = httpx2.Timeout(10.0)


def _compact(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


def _spaced(obj: dict[str, Any]) -> bytes:  # Python's json: ", " and ": " separators
    return json.dumps(obj).encode()


def openai_stream(style: str, include_usage: bool, model: str = "mock-model") -> list[bytes]:
    """A stream as OpenAI writes it: with usage asked for, every chunk has ``usage: null`` (in
    the middle, last or first, as servers differ) and a usage-only chunk comes last."""
    dumps = _spaced if style == "spaced" else _compact
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hel"}, None),
        ({"content": 'lo "usage": null'}, None),  # text that only looks like the field
        ({}, "stop"),
    ]
    events = []
    for delta, finish in deltas:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
        if include_usage and style == "first":
            chunk = {"usage": None, **chunk}
        chunk.update({"created": 1700000000, "model": model, "choices": [choice]})
        if include_usage and style != "first":
            chunk["usage"] = None
        if style == "openai":
            chunk["obfuscation"] = "Xy1"  # OpenAI writes a field after usage
        events.append(b"data: " + dumps(chunk) + b"\n\n")
    if include_usage:
        last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000}
        last.update({"model": model, "choices": [], "usage": USAGE})
        events.append(b"data: " + dumps(last) + b"\n\n")
    return [*events, DONE]


class OpenAILike(FakeOpenAI):
    """An OpenAI-compatible server whose streams carry usage exactly as OpenAI's do."""

    style = "openai"

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if path == CHAT:
            body = orjson.loads(raw)
            if body.get("stream"):
                asked = bool((body.get("stream_options") or {}).get("include_usage"))
                return Reply(events=openai_stream(self.style, asked, body["model"]))
        return super().default(method, path, raw)


KEY_VAR = "NEXUS_TEST_STREAM_USAGE_KEY"
KEYED = {"openai", "anthropic", "google"}


@pytest.fixture
def serve(
    start_fake: Callable[[Any], Any],
    start_nexus: Callable[[Any], NexusServer],
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., NexusServer]:
    """Nexus with one backend of ``kind`` served by ``fake``, healthy."""

    def serve(fake: FakeUpstream, kind: str, **sections: Any) -> NexusServer:
        monkeypatch.setenv(KEY_VAR, "test-key-123456")
        start_fake(fake)
        entry = {"name": "up", "url": fake.url, "type": kind}
        if kind in KEYED:
            entry["api_key_env"] = KEY_VAR
        nexus = start_nexus(settings_for(backends=[entry], **sections))
        backend = nexus.gateway.registry.get("up")
        assert backend is not None
        assert wait_for(lambda: backend.status is Status.HEALTHY), backend.last_error
        return nexus

    return serve


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[StartedStream]:
    """Every stream an adapter opens in the app, as dispatch receives it."""
    streams: list[StartedStream] = []
    original = HTTPAdapter.open_events

    async def spy(self: HTTPAdapter, *args: Any, **kwargs: Any) -> StartedStream:
        started = await original(self, *args, **kwargs)
        streams.append(started)
        return started

    monkeypatch.setattr(HTTPAdapter, "open_events", spy)
    return streams


def post(client: httpx2.Client, url: str, raw: bytes) -> bytes:
    resp = client.post(url + CHAT, content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    return resp.content


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": USER, "stream": True, **extra}


def kept_usage(opened: list[StartedStream]) -> Any:
    [started] = opened
    return started.usage


def history_tokens(client: httpx2.Client, url: str) -> tuple[Any, Any]:
    """The prompt and completion tokens of the one request in /v1/history, once it is there."""
    entries: list[Any] = []

    def recorded() -> bool:
        entries[:] = client.get(url + "/v1/history").json()["data"]
        return len(entries) == 1

    assert wait_for(recorded), entries
    return entries[0]["prompt_tokens"], entries[0]["completion_tokens"]


# --- OpenAI-compatible backends -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "vllm", "llamacpp", "lmstudio"])
@pytest.mark.parametrize("style", ["openai", "spaced", "first"])
def test_usage_is_asked_for_and_hidden_byte_for_byte(serve, client, opened, kind, style):
    fake = OpenAILike()
    fake.style = style
    nexus = serve(fake, kind)
    raw = json.dumps(body(), indent=2).encode()  # bytes no encoder in Nexus would write

    received = post(client, nexus.url, raw)

    [call] = fake.calls(CHAT)
    # Spliced into the client's own bytes, not re-encoded.
    assert call.raw == b'{"stream_options":{"include_usage":true},' + raw[1:]
    assert call.json["stream_options"] == {"include_usage": True}
    assert received == b"".join(openai_stream(style, include_usage=False))
    assert b'"usage"' not in received.replace(b'\\"usage\\"', b"")
    assert kept_usage(opened) == USAGE
    assert history_tokens(client, nexus.url) == (11, 3)


def test_a_stream_read_in_one_write_is_hidden_the_same(serve, client, opened):
    fake = OpenAILike()
    fake.push(CHAT, Reply(events=[b"".join(openai_stream("openai", include_usage=True))]))
    nexus = serve(fake, "vllm")

    received = post(client, nexus.url, orjson.dumps(body()))

    assert received == b"".join(openai_stream("openai", include_usage=False))
    assert kept_usage(opened) == USAGE


def test_a_client_that_asked_gets_what_the_backend_sent(serve, client, opened):
    fake = OpenAILike()
    nexus = serve(fake, "openai")
    raw = orjson.dumps(body(stream_options={"include_usage": True}))

    received = post(client, nexus.url, raw)

    assert fake.calls(CHAT)[0].raw == raw
    assert received == b"".join(openai_stream("openai", include_usage=True))
    assert b'"usage":null' in received  # as OpenAI sends it: the client asked for this form
    [started] = opened
    assert started.usage is None  # passed on: dispatch reads it from the chunk itself


@pytest.mark.parametrize("kind", ["generic", "exo"])
def test_unknown_servers_are_not_sent_stream_options(serve, client, kind):
    fake = OpenAILike()
    nexus = serve(fake, kind)
    raw = orjson.dumps(body())

    received = post(client, nexus.url, raw)

    assert fake.calls(CHAT)[0].raw == raw
    assert received == b"".join(openai_stream("openai", include_usage=False))


def test_stream_options_without_include_usage_is_re_encoded(serve, client, opened):
    fake = OpenAILike()
    nexus = serve(fake, "vllm")
    options = {"include_usage": False, "continuous_usage_stats": False}

    received = post(client, nexus.url, orjson.dumps(body(stream_options=options)))

    sent = fake.calls(CHAT)[0].json
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert sent["messages"] == USER
    assert received == b"".join(openai_stream("openai", include_usage=False))
    assert kept_usage(opened) == USAGE


def test_an_aliased_model_is_renamed_and_asked_for_usage(serve, client, opened):
    fake = OpenAILike()
    aliases = {"aliases": {"house-model": "mock-model"}}
    nexus = serve(fake, "vllm", routing=aliases)

    received = post(client, nexus.url, orjson.dumps(body(model="house-model")))

    sent = fake.calls(CHAT)[0].json
    assert sent["model"] == "mock-model"
    assert sent["stream_options"] == {"include_usage": True}
    assert received == b"".join(openai_stream("openai", include_usage=False))
    assert kept_usage(opened) == USAGE


def test_usage_payload_splices_or_re_encodes() -> None:
    raw = b' {"model":"m","messages":[],"stream":true}'
    data = orjson.loads(raw)
    assert usage_payload(Call(data, raw, "m", {})) == (
        b' {"stream_options":{"include_usage":true},"model":"m","messages":[],"stream":true}'
    )
    odd = {**data, "stream_options": "yes"}  # refused by the backend as the client sent it
    assert usage_payload(Call(odd, orjson.dumps(odd), "m", {})) is None
    empty = {**data, "stream_options": None}
    asked = usage_payload(Call(empty, orjson.dumps(empty), "m", {}))
    assert asked is not None and orjson.loads(asked)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b'data: {"a":1,"usage":null,"b":2}\n\n', b'data: {"a":1,"b":2}\n\n'),
        (b'data: {"a":1,"usage":null}\n\n', b'data: {"a":1}\n\n'),
        (b'data: {"usage":null,"a":1}\n\n', b'data: {"a":1}\n\n'),
        (b'data: {"a": 1, "usage": null, "b": 2}\n\n', b'data: {"a": 1, "b": 2}\n\n'),
        (b'data: {"usage": null, "a": 1}\n\n', b'data: {"a": 1}\n\n'),
        (b'data: {"a":1,"usage": null}\n\n', b'data: {"a":1}\n\n'),
        (b'data: {"usage": null,"a":1}\n\n', b'data: {"a":1}\n\n'),
    ],
)
def test_null_usage_goes_in_every_spelling(event: bytes, expected: bytes) -> None:
    assert hide_null_usage(event) == expected


# --- translated dialects --------------------------------------------------------------------


def sse_usage_chunks(raw: bytes) -> list[Any]:
    chunks = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line[6:7] == b"{"]
    return [c for c in chunks if c.get("usage") is not None]


def test_ollama_stream_keeps_usage_the_client_did_not_ask_for(serve, client, opened):
    fake = FakeOllama(["llama3"])
    nexus = serve(fake, "ollama")

    received = post(client, nexus.url, orjson.dumps(body(model="llama3")))

    assert b'"usage"' not in received
    assert received.endswith(b"\n\n" + DONE)
    assert kept_usage(opened) == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert history_tokens(client, nexus.url) == (4, 2)


def test_ollama_stream_sends_usage_to_a_client_that_asked(serve, client, opened):
    fake = FakeOllama(["llama3"])
    nexus = serve(fake, "ollama")
    raw = orjson.dumps(body(model="llama3", stream_options={"include_usage": True}))

    received = post(client, nexus.url, raw)

    [last] = sse_usage_chunks(received)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 6


def claude_events(usage_start: dict[str, Any], usage_end: dict[str, Any]) -> list[bytes]:
    def event(kind: str, **data: Any) -> bytes:
        return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **data}) + b"\n\n"

    start = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
    delta = {"type": "text_delta", "text": "hi"}
    return [
        event("message_start", message={**start, "model": "m", "usage": usage_start}),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=0, delta=delta),
        event("message_delta", delta={"stop_reason": "end_turn"}, usage=usage_end),
        event("message_stop"),
    ]


def test_anthropic_stream_keeps_usage_with_cache_writes(serve, client, opened):
    fake = FakeClaude(["claude-x"])
    nexus = serve(fake, "anthropic")
    first = {"input_tokens": 5, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 9}
    fake.push("/v1/messages", Reply(events=claude_events(first, {"output_tokens": 6})))

    received = post(client, nexus.url, orjson.dumps(body(model="claude-x")))

    assert b'"usage"' not in received
    assert kept_usage(opened) == {
        "prompt_tokens": 21,
        "completion_tokens": 6,
        "total_tokens": 27,
        "prompt_tokens_details": {"cached_tokens": 7, "cache_write_tokens": 9},
    }
    assert history_tokens(client, nexus.url) == (21, 6)


def test_anthropic_stream_sends_usage_to_a_client_that_asked(serve, client):
    fake = FakeClaude(["claude-x"])
    nexus = serve(fake, "anthropic")
    raw = orjson.dumps(body(model="claude-x", stream_options={"include_usage": True}))

    received = post(client, nexus.url, raw)

    [last] = sse_usage_chunks(received)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2


def test_anthropic_usage_names_cache_writes_only_when_there_are_some() -> None:
    assert anthropic_usage({"input_tokens": 3, "output_tokens": 1})["prompt_tokens_details"] == {
        "cached_tokens": 0
    }
    written = anthropic_usage({"input_tokens": 3, "cache_creation_input_tokens": 2})
    assert written["prompt_tokens"] == 5
    assert written["prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 2}
    openapi.validate("CompletionUsage", written)  # OpenAI's schema allows the extra key


GEMINI_USAGE = {
    "promptTokenCount": 8,
    "candidatesTokenCount": 3,
    "thoughtsTokenCount": 2,
    "cachedContentTokenCount": 1,
    "totalTokenCount": 13,
}


def test_gemini_stream_keeps_usage_the_client_did_not_ask_for(serve, client, opened):
    fake = FakeGoogle(["gem-x"])
    nexus = serve(fake, "google")
    events = [sse({**gemini_answer("hi"), "usageMetadata": GEMINI_USAGE})]
    fake.push("/v1beta/models/gem-x:streamGenerateContent", Reply(events=events))

    received = post(client, nexus.url, orjson.dumps(body(model="gem-x")))

    assert b'"usage"' not in received
    assert received.endswith(b"\n\n" + DONE)
    assert kept_usage(opened) == {
        "prompt_tokens": 8,
        "completion_tokens": 5,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 1},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    assert history_tokens(client, nexus.url) == (8, 5)


def test_gemini_stream_sends_usage_to_a_client_that_asked(serve, client):
    fake = FakeGoogle(["gem-x"])
    nexus = serve(fake, "google")
    events = [sse({**gemini_answer("hi"), "usageMetadata": GEMINI_USAGE})]
    fake.push("/v1beta/models/gem-x:streamGenerateContent", Reply(events=events))
    raw = orjson.dumps(body(model="gem-x", stream_options={"include_usage": True}))

    received = post(client, nexus.url, raw)

    [last] = sse_usage_chunks(received)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 13
