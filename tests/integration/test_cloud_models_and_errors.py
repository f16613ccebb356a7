"""Issue 9, points 1, 4 and 5 through the running app, where the backend tests leave gaps: what
the providers' model lists report (every Anthropic page, the context window, image support, the
largest ``max_tokens``) decides routing and the Messages default, and provider errors reach the
client as OpenAI envelopes with the provider's status, message and ``Retry-After``."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from nexus.registry import Status
from tests.cloud_fakes import FakeClaude, FakeGoogle
from tests.contract import openapi
from tests.fakes import FakeUpstream, Recorded, Reply
from tests.harness import NexusServer, settings_for, wait_for

KEY_VARS = {"anthropic": "NEXUS_TEST_AUDIT_ANTHROPIC", "google": "NEXUS_TEST_AUDIT_GEMINI"}
USER: list[Any] = [{"role": "user", "content": "hi"}]
MESSAGES = "/v1/messages"


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in KEY_VARS.values():
        monkeypatch.setenv(var, "test-key-" + var.lower())


def cloud(name: str, fake: FakeUpstream, kind: str, priority: int = 50) -> dict[str, Any]:
    return {
        "name": name,
        "url": fake.url,
        "type": kind,
        "api_key_env": KEY_VARS[kind],
        "priority": priority,
    }


def serve(start_nexus: Any, *backends: dict[str, Any]) -> tuple[NexusServer, openai.OpenAI]:
    nexus = start_nexus(settings_for(backends=list(backends), routing={"max_retries": 3}))
    records = [nexus.gateway.registry.get(b["name"]) for b in backends]
    assert wait_for(lambda: all(r.status is Status.HEALTHY for r in records)), [
        r.last_error for r in records
    ]
    return nexus, openai.OpenAI(base_url=nexus.url + "/v1", api_key="client", max_retries=0)


# --- models: what the lists report ------------------------------------------------------------


class PagedClaude(FakeClaude):
    """A model list in pages of one, chained by ``after_id`` as Anthropic's is."""

    def __init__(self, models: list[str]) -> None:
        super().__init__(models)
        self.queries: list[str] = []
        self.max_input_tokens = 1_000_000
        self.max_tokens = 128_000

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != "/v1/models":
            return await super()._handle(request)
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), b""))
        self.queries.append(request.query_string)
        after = request.query.get("after_id")
        index = self.models.index(after) + 1 if after else 0
        entry = {
            "type": "model",
            "id": self.models[index],
            "display_name": self.models[index],
            "created_at": "2025-01-01T00:00:00Z",
            "max_input_tokens": self.max_input_tokens,
            "max_tokens": self.max_tokens,
            "capabilities": None,
        }
        more = index + 1 < len(self.models)
        page = {"data": [entry], "has_more": more, "first_id": entry["id"], "last_id": entry["id"]}
        return web.json_response(page)


def test_anthropic_models_from_every_page_with_their_reported_limits(
    start_fake, start_nexus, client
):
    fake = start_fake(PagedClaude(["claude-a", "claude-b", "claude-c"]))
    nexus, sdk = serve(start_nexus, cloud("claude", fake, "anthropic"))

    rows = {row["id"]: row for row in client.get(nexus.url + "/v1/models").json()["data"]}
    assert set(rows) == {"claude-a", "claude-b", "claude-c"}
    assert {row["context_length"] for row in rows.values()} == {1_000_000}  # max_input_tokens
    assert [q for q in fake.queries if "after_id=claude-b" in q]
    assert fake.calls(MESSAGES) == []  # listing models is never a billed call

    # No max_tokens from the client: the model's own largest, as the list reports it.
    sdk.chat.completions.create(model="claude-b", messages=USER)
    sdk.chat.completions.create(model="claude-b", messages=USER, max_completion_tokens=77)
    assert [c.json["max_tokens"] for c in fake.calls(MESSAGES)] == [128_000, 77]


def test_anthropic_default_max_tokens_leaves_the_prompt_its_room(start_fake, start_nexus):
    """Anthropic refuses a prompt plus max_tokens past the window: a long prompt gets what is
    left of the context (its estimate a quarter larger, plus room for what it does not count)."""
    fake = PagedClaude(["claude-a"])
    fake.max_input_tokens, fake.max_tokens = 200_000, 64_000
    _, sdk = serve(start_nexus, cloud("claude", start_fake(fake), "anthropic"))
    long: Any = [{"role": "user", "content": "word " * 120_000}]  # 600,000 chars: ~150,000 tokens
    sdk.chat.completions.create(model="claude-a", messages=long)
    sdk.chat.completions.create(model="claude-a", messages=USER)
    sent = [c.json["max_tokens"] for c in fake.calls(MESSAGES)]
    assert sent == [200_000 - 150_000 * 5 // 4 - 2048, 64_000]


def test_anthropic_default_max_tokens_is_4096_when_the_list_does_not_say(start_fake, start_nexus):
    fake = start_fake(FakeClaude(["claude-old"]))  # its entries carry max_tokens: null
    _, sdk = serve(start_nexus, cloud("claude", fake, "anthropic"))
    sdk.chat.completions.create(model="claude-old", messages=USER)
    assert fake.calls(MESSAGES)[0].json["max_tokens"] == 4096


class TextOnlyClaude(FakeClaude):
    """A model whose list entry says it takes no images."""

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        reply = super().default(method, path, raw)
        if reply is not None and path == "/v1/models":
            for entry in reply.json["data"]:
                entry["capabilities"] = {"image_input": {"supported": False}}
        return reply


def test_anthropic_image_support_comes_from_the_list(start_fake, start_nexus, client):
    fake = start_fake(TextOnlyClaude(["claude-text"]))
    nexus, _ = serve(start_nexus, cloud("claude", fake, "anthropic"))
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}
    body = {"model": "claude-text", "messages": [{"role": "user", "content": [image]}]}

    resp = client.post(nexus.url + "/v1/chat/completions", json=body)

    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "capability_mismatch"
    assert "vision" in resp.text
    assert fake.calls(MESSAGES) == []


# --- errors: the provider's status and message, as OpenAI envelopes ---------------------------


def claude_error(status: int, kind: str, message: str, **headers: str) -> Reply:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return Reply(status=status, json=body, headers=headers)


def google_error(status: int, state: str, message: str, **headers: str) -> Reply:
    return Reply(
        status=status,
        json={"error": {"code": status, "message": message, "status": state}},
        headers=headers,
    )


CLIENT_ERRORS = [
    (400, openai.BadRequestError, "invalid_request_error", "INVALID_ARGUMENT"),
    (401, openai.AuthenticationError, "authentication_error", "UNAUTHENTICATED"),
    (403, openai.PermissionDeniedError, "permission_error", "PERMISSION_DENIED"),
]


@pytest.mark.parametrize("kind", ["anthropic", "google"])
@pytest.mark.parametrize(("status", "exception", "error_type", "state"), CLIENT_ERRORS)
def test_client_errors_keep_the_provider_status_and_message(
    start_fake, start_nexus, kind, status, exception, error_type, state
):
    if kind == "anthropic":
        fake: FakeUpstream = start_fake(FakeClaude(["m-1"]))
        fake.push(MESSAGES, claude_error(status, error_type, f"provider says {status}"))
    else:
        fake = start_fake(FakeGoogle(["m-1"]))
        fake.push(
            "/v1beta/models/m-1:generateContent",
            google_error(status, state, f"provider says {status}"),
        )
    spare = start_fake(FakeClaude(["m-1"]))  # a 4xx is the request's fault: never retried
    _, sdk = serve(
        start_nexus, cloud("first", fake, kind, 1), cloud("spare", spare, "anthropic", 99)
    )

    with pytest.raises(exception) as caught:
        sdk.chat.completions.create(model="m-1", messages=USER)

    assert caught.value.status_code == status
    openapi.validate("ErrorResponse", caught.value.response.json())
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["message"] == f"provider says {status}"
    assert body["type"] == error_type
    assert spare.calls(MESSAGES) == []


@pytest.mark.parametrize(
    ("kind", "reply", "status"),
    [
        (
            "anthropic",
            claude_error(429, "rate_limit_error", "slow down", **{"Retry-After": "7"}),
            429,
        ),
        (
            "anthropic",
            claude_error(529, "overloaded_error", "Overloaded", **{"Retry-After": "9"}),
            502,
        ),
        ("google", google_error(503, "UNAVAILABLE", "overloaded", **{"Retry-After": "5"}), 502),
    ],
    ids=["anthropic-429", "anthropic-529", "google-503"],
)
def test_retryable_errors_fail_over_and_the_last_keeps_retry_after(
    start_fake, start_nexus, kind, reply, status
):
    path = MESSAGES if kind == "anthropic" else "/v1beta/models/m-1:generateContent"
    make = FakeClaude if kind == "anthropic" else FakeGoogle
    first, last = start_fake(make(["m-1"])), start_fake(make(["m-1"]))
    first.push(path, reply)
    last.push(path, reply)
    nexus, sdk = serve(start_nexus, cloud("first", first, kind, 1), cloud("last", last, kind, 99))

    # Both overloaded: the client gets the last one's answer, with its Retry-After.
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model="m-1", messages=USER)
    assert caught.value.status_code == status
    assert caught.value.response.headers["retry-after"] == reply.headers["Retry-After"]
    openapi.validate("ErrorResponse", caught.value.response.json())
    assert len(first.calls(path)) == 1 and len(last.calls(path)) == 1

    # Only the first overloaded: the next one serves.
    first.push(path, reply)
    answer = sdk.chat.completions.with_raw_response.create(model="m-1", messages=USER)
    assert answer.headers["x-nexus-backend"] == "last"
    assert answer.headers["x-nexus-route-reason"] == "failover"
    assert orjson.loads(answer.content)["choices"][0]["message"]["content"]


# --- Gemini: chat models for chat, embedding models for embeddings -----------------------------

GEMINI_METHODS = {
    "gem-chat": ["generateContent", "countTokens"],
    "gem-embed": ["embedContent", "batchEmbedContents"],
    "gem-both": ["generateContent", "embedContent"],
}


class KindsGoogle(FakeGoogle):
    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if path == "/v1beta/models":
            models = [
                {"name": f"models/{name}", "inputTokenLimit": 2048, "supportedGenerationMethods": m}
                for name, m in GEMINI_METHODS.items()
            ]
            return Reply(json={"models": models})
        if path.endswith(":batchEmbedContents"):
            return Reply(json={"embeddings": [{"values": [0.5, 0.25]}]})
        return super().default(method, path, raw)


def test_gemini_chat_and_embedding_models_each_serve_their_own_kind(
    start_fake, start_nexus, client
):
    fake = start_fake(KindsGoogle(list(GEMINI_METHODS)))
    nexus, sdk = serve(start_nexus, cloud("gemini", fake, "google"))
    rows = {row["id"]: row for row in client.get(nexus.url + "/v1/models").json()["data"]}
    assert {k: rows[k]["capabilities"]["embeddings"] for k in rows} == {
        "gem-chat": False,
        "gem-embed": True,
        "gem-both": True,
    }

    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="/v1/embeddings") as caught:
            sdk.chat.completions.create(model="gem-embed", messages=USER, stream=stream)
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="/v1/chat/completions"):
        sdk.embeddings.create(model="gem-chat", input="x")
    generated = [r.path for r in fake.requests if r.method == "POST"]
    assert generated == []  # refused before any call to Google

    assert sdk.chat.completions.create(model="gem-both", messages=USER).choices
    assert sdk.embeddings.create(model="gem-both", input="x").data[0].embedding == [0.5, 0.25]
    assert sdk.embeddings.create(model="gem-embed", input="x").data
