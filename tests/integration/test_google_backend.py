"""Google Gemini behind Nexus: the official openai SDK in front, a fake Gemini server behind.

Every request the fake receives is checked against Gemini's discovery document, every answer a
client reads (each stream chunk included) against OpenAI's schema, and every key check looks at
the raw request: the key only in ``x-goog-api-key``, never in the URL, and never the client's
Authorization.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from tests.contract import gemini_discovery
from tests.contract.openai_answers import CheckedClients, streamed_tool_calls
from tests.fakes import FakeOpenAI, FakeUpstream, Recorded, Reply
from tests.harness import data_events, settings_for, wait_for

KEY = "AIza-test-key-123"
CLIENT_KEY = "sk-client-secret"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
MODEL = "gemini-2.5-flash"


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


def answer(*parts: dict[str, Any], finish: str = "STOP") -> dict[str, Any]:
    return {
        "candidates": [
            {"content": {"role": "model", "parts": list(parts)}, "finishReason": finish}
        ],
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6},
        "responseId": "resp-1",
    }


PAGES = {
    "": {
        "models": [
            {
                "name": "models/gemini-2.5-flash",
                "inputTokenLimit": 1048576,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            },
            {
                "name": "models/imagen-3",
                "inputTokenLimit": 480,
                "supportedGenerationMethods": ["predict"],
            },
        ],
        "nextPageToken": "page-2",
    },
    "page-2": {
        "models": [
            {
                "name": "models/gemini-embedding-001",
                "inputTokenLimit": 2048,
                "supportedGenerationMethods": ["embedContent", "batchEmbedContents"],
            },
            {
                "name": "models/aqa",
                "inputTokenLimit": 7168,
                "supportedGenerationMethods": ["generateAnswer"],
            },
        ]
    },
}


class FakeGemini(FakeUpstream):
    """A scripted Gemini server: paged model list, generateContent, streams, embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[str] = []
        self.bad_key = False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), raw))
        self.queries.append(request.query_string)
        if self.bad_key:
            error = {
                "error": {
                    "code": 400,
                    "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT",
                }
            }
            return web.json_response(error, status=400)
        queue = self.script.get(request.path)
        if queue:
            return await self._answer(request, queue.popleft())
        if request.path == "/v1beta/models":
            return web.json_response(PAGES[request.query.get("pageToken", "")])
        return web.json_response({"error": {"code": 404, "message": "no", "status": "NOT_FOUND"}})

    def generate(self, method: str) -> list[Recorded]:
        """The ``generateContent``/``streamGenerateContent`` calls, each checked against the
        discovery document."""
        calls = self.calls(f"/v1beta/models/{MODEL}:{method}")
        for call in calls:
            gemini_discovery.validate("GenerateContentRequest", call.json)
        return calls


@pytest.fixture
def checked() -> Iterator[CheckedClients]:
    """Clients whose every answer must fit OpenAI's schema, checked when the test ends."""
    clients = CheckedClients()
    yield clients
    assert clients.check() > 0


@pytest.fixture
def gemini(start_fake, start_nexus, monkeypatch, checked):
    monkeypatch.setenv("NEXUS_TEST_GEMINI_KEY", KEY)
    fake = start_fake(FakeGemini())
    nexus = start_nexus(
        settings_for(
            backends=[
                {
                    "name": "gemini",
                    "url": fake.url,
                    "type": "google",
                    "api_key_env": "NEXUS_TEST_GEMINI_KEY",
                }
            ]
        )
    )
    return fake, nexus, checked.sdk(nexus.url, CLIENT_KEY)


def assert_key_only_in_header(fake: FakeGemini) -> None:
    assert fake.requests
    for recorded, query in zip(fake.requests, fake.queries, strict=True):
        headers = {k.lower(): v for k, v in recorded.headers.items()}
        assert headers.get("x-goog-api-key") == KEY
        assert "authorization" not in headers
        assert KEY not in query and "key=" not in query
        assert CLIENT_KEY not in " ".join(headers.values())


def test_models_come_from_every_page_without_prefix(gemini, checked):
    fake, nexus, sdk = gemini
    rows = {row["id"]: row for row in checked.http().get(f"{nexus.url}/v1/models").json()["data"]}
    assert set(rows) == {MODEL, "gemini-embedding-001"}
    assert rows[MODEL]["context_length"] == 1048576
    assert rows["gemini-embedding-001"]["capabilities"]["embeddings"] is True
    assert [q for q in fake.queries if "pageToken=page-2" in q]
    # Only the model list was called: a probe never generates (never billed).
    assert {r.path for r in fake.requests} == {"/v1beta/models"}
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="imagen-3", messages=USER)
    assert_key_only_in_header(fake)


def test_text_answer(gemini):
    fake, _, sdk = gemini
    fake.push(f"/v1beta/models/{MODEL}:generateContent", Reply(json=answer({"text": "Hello!"})))
    completion = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, *USER],
        temperature=0.2,
        max_tokens=50,
    )
    assert completion.choices[0].message.content == "Hello!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL
    assert completion.usage is not None and completion.usage.total_tokens == 6
    sent = fake.generate("generateContent")[0].json
    assert sent["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert sent["generationConfig"]["maxOutputTokens"] == 50
    assert_key_only_in_header(fake)


def test_stream_ends_with_done_and_usage(gemini, checked):
    fake, nexus, sdk = gemini
    events = [
        sse({"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}]}),
        sse(answer({"text": "lo"})),
    ]
    path = f"/v1beta/models/{MODEL}:streamGenerateContent"
    fake.push(path, Reply(events=events), Reply(events=events))
    stream = sdk.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    assert chunks[-1].choices == []  # include_usage: a final chunk with the usage only
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert fake.queries[-1] == "alt=sse"
    assert fake.generate("streamGenerateContent")[0].json["contents"]

    raw = checked.http().post(
        f"{nexus.url}/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": True}
    )
    assert data_events(raw.text)[-1] == "[DONE]"
    assert_key_only_in_header(fake)


def test_tool_call_round_trip(gemini):
    fake, _, sdk = gemini
    call = {"functionCall": {"id": "fc-1", "name": "weather", "args": {"city": "Oslo"}}}
    path = f"/v1beta/models/{MODEL}:generateContent"
    fake.push(path, Reply(json=answer(call)), Reply(json=answer({"text": "Sunny."})))
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    first = sdk.chat.completions.create(model=MODEL, messages=USER, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    tool_call = choice.message.tool_calls[0]
    assert tool_call.function.name == "weather"
    assert orjson.loads(tool_call.function.arguments) == {"city": "Oslo"}

    messages = [
        *USER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": '{"sky": "clear"}'},
    ]
    second = sdk.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    assert second.choices[0].message.content == "Sunny."
    sent = [r.json for r in fake.generate("generateContent")]
    assert sent[1]["contents"][1:] == [
        {"role": "model", "parts": [call]},
        {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "id": "fc-1",
                        "name": "weather",
                        "response": {"sky": "clear"},
                    }
                }
            ],
        },
    ]


def test_streamed_tool_call_round_trip(gemini):
    # Gemini sends a call whole: one fragment with index, id, name and all the arguments.
    fake, _, sdk = gemini
    call = {"functionCall": {"id": "fc-7", "name": "weather", "args": {"city": "Oslo"}}}
    path = f"/v1beta/models/{MODEL}:streamGenerateContent"
    fake.push(
        path,
        Reply(events=[sse(answer({"text": "Checking."}, call))]),
        Reply(events=[sse(answer({"text": "Sunny."}))]),
    )
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=USER, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    (tool_call,) = streamed_tool_calls(chunks)
    assert tool_call["id"] == "fc-7" and tool_call["function"]["name"] == "weather"
    assert orjson.loads(tool_call["function"]["arguments"]) == {"city": "Oslo"}

    messages: list[Any] = [
        *USER,
        {"role": "assistant", "content": "Checking.", "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": "fc-7", "content": "sunny"},
    ]
    second = sdk.chat.completions.create(model=MODEL, messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in second if c.choices) == "Sunny."
    sent = fake.generate("streamGenerateContent")[1].json
    assert sent["contents"][1:] == [
        {"role": "model", "parts": [{"text": "Checking."}, call]},
        {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "id": "fc-7",
                        "name": "weather",
                        "response": {"result": "sunny"},
                    }
                }
            ],
        },
    ]


def test_json_mode(gemini):
    fake, _, sdk = gemini
    path = f"/v1beta/models/{MODEL}:generateContent"
    fake.push(path, Reply(json=answer({"text": '{"ok": true}'})))
    completion = sdk.chat.completions.create(
        model=MODEL, messages=USER, response_format={"type": "json_object"}
    )
    assert orjson.loads(completion.choices[0].message.content or "") == {"ok": True}
    sent = fake.generate("generateContent")[0].json
    assert sent["generationConfig"]["responseMimeType"] == "application/json"
    assert "responseSchema" not in sent["generationConfig"]


def test_json_schema_mode(gemini):
    fake, _, sdk = gemini
    path = f"/v1beta/models/{MODEL}:generateContent"
    fake.push(path, Reply(json=answer({"text": '{"city": "Oslo"}'})))
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    completion = sdk.chat.completions.create(
        model=MODEL,
        messages=USER,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": schema, "strict": True},
        },
    )
    assert orjson.loads(completion.choices[0].message.content or "") == {"city": "Oslo"}
    config = fake.generate("generateContent")[0].json["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"] == {
        "type": "OBJECT",
        "properties": {"city": {"type": "STRING"}},
        "required": ["city"],
    }


def test_embeddings(gemini):
    fake, _, sdk = gemini
    path = "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    fake.push(path, Reply(json={"embeddings": [{"values": [0.1, 0.2]}, {"values": [0.3, 0.4]}]}))
    result = sdk.embeddings.create(model="gemini-embedding-001", input=["a", "b"])
    assert [d.embedding for d in result.data] == [[0.1, 0.2], [0.3, 0.4]]
    gemini_discovery.validate("BatchEmbedContentsRequest", fake.calls(path)[0].json)
    assert_key_only_in_header(fake)


def test_google_error_becomes_openai_envelope(gemini):
    fake, _, sdk = gemini
    error = {"error": {"code": 403, "message": "Permission denied", "status": "PERMISSION_DENIED"}}
    fake.push(f"/v1beta/models/{MODEL}:generateContent", Reply(status=403, json=error))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=USER)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["message"] == "Permission denied"
    assert body["code"] == "permission_denied"
    assert body["type"] == "permission_error"
    assert len(fake.generate("generateContent")) == 1


def test_bad_key_makes_backend_unhealthy_with_reason(start_fake, start_nexus, client, monkeypatch):
    monkeypatch.setenv("NEXUS_TEST_GEMINI_KEY", KEY)
    fake = start_fake(FakeGemini())
    fake.bad_key = True
    nexus = start_nexus(
        settings_for(
            backends=[
                {
                    "name": "gemini",
                    "url": fake.url,
                    "type": "google",
                    "api_key_env": "NEXUS_TEST_GEMINI_KEY",
                }
            ]
        )
    )

    def reason() -> str:
        rows = client.get(f"{nexus.url}/v1/backends").json()["data"]
        row = next(r for r in rows if r["name"] == "gemini")
        return str(row.get("last_error") or "") if row["status"] == "unhealthy" else ""

    assert wait_for(lambda: "API key not valid" in reason())
    assert KEY not in client.get(f"{nexus.url}/v1/backends").text
    assert {r.path for r in fake.requests} == {"/v1beta/models"}


def test_request_without_faithful_gemini_form_excludes_the_backend(gemini, checked):
    fake, nexus, _ = gemini
    client = checked.http()
    body = {"model": MODEL, "messages": USER, "n": 2}
    resp = client.post(f"{nexus.url}/v1/chat/completions", json=body)
    assert resp.status_code in (400, 503)
    assert "n > 1" in resp.text  # the capability stage says why, nothing is cut
    assert fake.generate("generateContent") == []


def test_untranslatable_request_goes_to_another_backend(
    start_fake, start_nexus, monkeypatch, checked
):
    monkeypatch.setenv("NEXUS_TEST_GEMINI_KEY", KEY)
    fake = start_fake(FakeGemini())
    other = start_fake(FakeOpenAI([MODEL]))
    nexus = start_nexus(
        settings_for(
            backends=[
                {
                    "name": "gemini",
                    "url": fake.url,
                    "type": "google",
                    "api_key_env": "NEXUS_TEST_GEMINI_KEY",
                    "priority": 1,
                },
                {"name": "local", "url": other.url, "type": "vllm", "priority": 99},
            ]
        )
    )
    sdk = checked.sdk(nexus.url, CLIENT_KEY)
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=USER, n=2)
    assert raw.headers["x-nexus-backend"] == "local"
    assert fake.generate("generateContent") == []


def test_url_defaults_to_google():
    settings = settings_for(
        backends=[{"name": "g", "type": "Google", "api_key_env": "NEXUS_TEST_GEMINI_KEY"}]
    )
    assert settings.backends[0].url == "https://generativelanguage.googleapis.com"


def test_stream_of_tool_calls_in_one_write(gemini):
    fake, _, sdk = gemini
    first = {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}
    second = {"functionCall": {"name": "weather", "args": {"city": "Bergen"}}}
    together = sse({"candidates": [{"content": {"role": "model", "parts": [first]}}]}) + sse(
        answer(second)
    )
    fake.push(f"/v1beta/models/{MODEL}:streamGenerateContent", Reply(events=[together]))
    stream = sdk.chat.completions.create(model=MODEL, messages=USER, stream=True)
    chunks = list(stream)
    calls = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or [])]
    assert [c.index for c in calls] == [0, 1]
    assert [orjson.loads(c.function.arguments or "") for c in calls if c.function] == [
        {"city": "Oslo"},
        {"city": "Bergen"},
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c["id"] for c in streamed_tool_calls(chunks))  # made up where Gemini has none
    assert len(fake.generate("streamGenerateContent")) == 1


def test_image_goes_inline(gemini):
    fake, _, sdk = gemini
    path = f"/v1beta/models/{MODEL}:generateContent"
    fake.push(path, Reply(json=answer({"text": "a cat"})))
    content: list[Any] = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    completion = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}]
    )
    assert completion.choices[0].message.content == "a cat"
    sent = fake.generate("generateContent")[0].json
    assert sent["contents"][0]["parts"] == [
        {"text": "what is this?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
    ]

    # A remote URL would need a download: the backend is left out with the reason.
    content[1] = {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}])
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "capability_mismatch"
    (excluded,) = caught.value.response.json()["context"]["excluded"]
    assert "base64 data: URLs" in excluded["reason"]
    assert len(fake.generate("generateContent")) == 1


@pytest.mark.parametrize(
    "failure", [Reply(status=503), Reply(status=429), Reply(events=[b": hi\n\n"])]
)
def test_overloaded_or_empty_gemini_fails_over(
    start_fake, start_nexus, monkeypatch, checked, failure
):
    monkeypatch.setenv("NEXUS_TEST_GEMINI_KEY", KEY)
    fake = start_fake(FakeGemini())
    other = start_fake(FakeOpenAI([MODEL]))
    nexus = start_nexus(
        settings_for(
            backends=[
                {
                    "name": "gemini",
                    "url": fake.url,
                    "type": "google",
                    "api_key_env": "NEXUS_TEST_GEMINI_KEY",
                    "priority": 1,
                },
                {"name": "local", "url": other.url, "type": "vllm", "priority": 99},
            ]
        )
    )
    if failure.status != 200:
        failure.json = {
            "error": {"code": failure.status, "message": "busy", "status": "UNAVAILABLE"}
        }
    fake.push(f"/v1beta/models/{MODEL}:streamGenerateContent", failure)
    sdk = checked.sdk(nexus.url, CLIENT_KEY)
    with sdk.chat.completions.with_streaming_response.create(
        model=MODEL, messages=USER, stream=True
    ) as resp:
        assert resp.headers["x-nexus-backend"] == "local"
        assert data_events(resp.read().decode())[-1] == "[DONE]"
    assert len(fake.generate("streamGenerateContent")) == 1


def test_last_backend_429_keeps_retry_after_as_openai_envelope(gemini):
    fake, _, sdk = gemini
    error = {"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}}
    reply = Reply(status=429, json=error, headers={"Retry-After": "7"})
    fake.push(f"/v1beta/models/{MODEL}:generateContent", reply)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.response.headers["retry-after"] == "7"
    body = caught.value.body
    assert isinstance(body, dict) and body["message"] == "Quota exceeded"
    assert len(fake.generate("generateContent")) == 1
