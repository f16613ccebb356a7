"""The agent APIs share the chat pipeline: what each backend is sent of a request in another
API (a reasoning effort only where it is taken; Anthropic's own request, natively, to an
Anthropic backend), the route's own envelope for every refusal, and bounded headers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from nexus.registry import Status
from tests.cloud_fakes import FakeClaude
from tests.fakes import FakeOpenAI, Reply
from tests.harness import settings_for, wait_for

KEY_VAR = "NEXUS_TEST_AGENT_KEY"
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def serve(start_nexus: Any, *backends: dict[str, Any]) -> Any:
    nexus = start_nexus(settings_for(backends=list(backends)))
    records = [nexus.gateway.registry.get(b["name"]) for b in backends]
    assert wait_for(lambda: all(r.status is Status.HEALTHY for r in records)), [
        r.last_error for r in records
    ]
    return nexus


def backend(name: str, fake: Any, kind: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": fake.url, "type": kind, **extra}


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, "sk-test-agent-key")


def test_reasoning_effort_goes_only_where_it_is_taken(keyed, start_fake, start_nexus, client):
    local = start_fake(FakeOpenAI(["m"]))
    cloud = start_fake(FakeOpenAI(["m"]))
    nexus = serve(
        start_nexus,
        backend("local", local, "vllm", priority=1),
        backend("cloud", cloud, "openai", priority=2, api_key_env=KEY_VAR),
    )
    body = {"model": "m", "input": "think hard", "reasoning": {"effort": "high"}}
    resp = client.post(nexus.url + "/v1/responses", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-nexus-backend"] == "local"
    (sent,) = local.calls(CHAT)
    assert "reasoning_effort" not in sent.json  # an unknown server is not sent it

    local_down = nexus.gateway.registry.get("local")
    nexus.gateway.health.mark_down(local_down, "test: down")
    resp = client.post(nexus.url + "/v1/responses", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-nexus-backend"] == "cloud"
    (sent,) = cloud.calls(CHAT)
    assert sent.json["reasoning_effort"] == "high"  # OpenAI takes it


def test_an_effort_does_not_keep_an_anthropic_backend_out(keyed, start_fake, start_nexus, client):
    claude = start_fake(FakeClaude(["claude-x"]))
    nexus = serve(start_nexus, backend("claude", claude, "anthropic", api_key_env=KEY_VAR))
    body = {"model": "claude-x", "input": "hi", "reasoning": {"effort": "medium"}}
    resp = client.post(nexus.url + "/v1/responses", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"][0]["content"][0]["text"] == "from claude"


def test_an_anthropic_backend_gets_the_clients_own_request(keyed, start_fake, start_nexus, client):
    claude = start_fake(FakeClaude(["claude-x"]))
    nexus = serve(start_nexus, backend("claude", claude, "anthropic", api_key_env=KEY_VAR))
    body = {
        "model": "claude-x",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": []},
        "metadata": {"user_id": "u-1"},
    }
    beta = "context-management-2025-06-27,interleaved-thinking-2025-05-14"
    version = "2026-10-21"  # what anthropic SDK 2.14 sends: the request is written for it
    client_headers = {"anthropic-beta": beta, "anthropic-version": version}
    resp = client.post(nexus.url + MESSAGES, json=body, headers=client_headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["content"][0]["text"] == "from claude"
    (sent,) = claude.generations()
    assert sent.json == body  # as it came: never translated twice
    # The features it uses need their beta header at Anthropic; the key is Nexus's own.
    headers = {k.lower(): v for k, v in sent.headers.items()}
    assert headers["anthropic-beta"] == beta and headers["x-api-key"] == "sk-test-agent-key"
    assert headers["anthropic-version"] == version

    resp = client.post(nexus.url + MESSAGES, json={**body, "stream": True})
    assert resp.status_code == 200, resp.text
    assert b"event: message_stop" in resp.content and b"[DONE]" not in resp.content
    assert claude.generations()[-1].json == {**body, "stream": True}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_get_the_routes_own_envelope(start_fake, start_nexus, client, method):
    nexus = serve(start_nexus, backend("local", start_fake(FakeOpenAI(["m"])), "vllm"))
    json_type = {"content-type": "application/json"}  # else the guard refuses it first (415)
    resp = client.request(method, nexus.url + MESSAGES, headers=json_type)
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert resp.json()["type"] == "error" and resp.json()["error"]["message"]
    resp = client.request(method, nexus.url + "/v1/responses", headers=json_type)
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_the_dropped_tools_header_is_bounded(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI(["m"]))
    nexus = serve(start_nexus, backend("local", fake, "vllm"))
    hosted = [{"type": "custom", "name": f"tool_{i:03d}_{'x' * 40}"} for i in range(200)]
    tools = [*hosted, {"type": "function", "name": "f", "parameters": {"type": "object"}}]
    resp = client.post(
        nexus.url + "/v1/responses", json={"model": "m", "input": "hi", "tools": tools}
    )
    assert resp.status_code == 200, resp.text
    dropped = resp.headers["x-nexus-dropped-tools"]
    assert len(dropped) <= 1024 and dropped.endswith("...")
    assert dropped.startswith("tool_000_")
    sent = orjson.loads(fake.calls(CHAT)[0].raw)
    assert [t["function"]["name"] for t in sent["tools"]] == ["f"]


def test_an_agents_max_tokens_is_fitted_to_the_context(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI(["small"], max_model_len=8192))
    nexus = serve(start_nexus, backend("local", fake, "vllm"))
    body = {
        "model": "small",
        "max_tokens": 32000,  # what Claude Code asks for
        "messages": [{"role": "user", "content": "hi"}],
    }
    resp = client.post(nexus.url + MESSAGES, json=body)
    assert resp.status_code == 200, resp.text
    sent = fake.calls(CHAT)[-1]
    assert 0 < sent.json["max_tokens"] <= 8192 - len(sent.raw) // 3 - 256
    # What fits is sent as it came; a plain chat request is never changed.
    client.post(nexus.url + MESSAGES, json={**body, "max_tokens": 500})
    assert fake.calls(CHAT)[-1].json["max_tokens"] == 500
    chat = {"model": "small", "max_tokens": 32000, "messages": body["messages"]}
    assert client.post(nexus.url + CHAT, json=chat).status_code == 200
    assert fake.calls(CHAT)[-1].json["max_tokens"] == 32000


def template_props(supports_tools: bool) -> Reply:
    caps = {"supports_tools": supports_tools, "supports_tool_calls": supports_tools}
    return Reply(json={"default_generation_settings": {"n_ctx": 8192}, "chat_template_caps": caps})


def test_a_template_without_tools_is_an_actionable_error_in_each_api(
    start_fake, start_nexus, client
):
    """llama.cpp answers a request with tools as if it had none when the model's template takes
    no tools: Nexus says so instead, in the API the client spoke (issue 11, point 6)."""
    fake = FakeOpenAI(["small"])
    fake.push("/props", template_props(False))
    nexus = serve(start_nexus, backend("llama", start_fake(fake), "llamacpp"))
    tool = {"name": "Bash", "input_schema": {"type": "object"}}
    turn = [{"role": "user", "content": "list the files"}]
    resp = client.post(
        nexus.url + MESSAGES,
        json={"model": "small", "max_tokens": 64, "messages": turn, "tools": [tool]},
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and "lacks tools" in error["message"]
    resp = client.post(
        nexus.url + "/v1/responses",
        json={
            "model": "small",
            "input": "list the files",
            "tools": [{"type": "function", "name": "ls", "parameters": {}}],
        },
    )
    assert resp.status_code == 400 and "lacks tools" in resp.text, resp.text
    assert fake.calls(CHAT) == []  # never sent where the tools would be ignored
    # Without tools the same model serves.
    plain = {"model": "small", "max_tokens": 64, "messages": turn}
    assert client.post(nexus.url + MESSAGES, json=plain).status_code == 200


def test_a_template_with_tools_serves_them(start_fake, start_nexus, client):
    fake = FakeOpenAI(["small"])
    fake.push("/props", template_props(True))
    nexus = serve(start_nexus, backend("llama", start_fake(fake), "llamacpp"))
    body = {
        "model": "small",
        "input": "hi",
        "tools": [{"type": "function", "name": "ls", "parameters": {}}],
    }
    assert client.post(nexus.url + "/v1/responses", json=body).status_code == 200


def test_a_native_call_is_priced_and_counted_like_any_other(keyed, start_fake, start_nexus, client):
    claude = start_fake(FakeClaude(["claude-x"]))
    pricing = [{"model_pattern": "claude-*", "input_per_mtok": 1000, "output_per_mtok": 2000}]
    spec = backend("claude", claude, "anthropic", api_key_env=KEY_VAR)
    nexus = start_nexus(settings_for(backends=[spec], pricing=pricing))
    record = nexus.gateway.registry.get("claude")
    assert wait_for(lambda: record.status is Status.HEALTHY), record.last_error
    body = {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    one_call = (3 * 1000 + 2 * 2000) / 1e6  # the fake's usage: 3 in, 2 out

    resp = client.post(nexus.url + MESSAGES, json=body)
    assert resp.status_code == 200, resp.text
    assert float(resp.headers["x-nexus-cost-estimated"]) == pytest.approx(one_call)
    resp = client.post(nexus.url + MESSAGES, json={**body, "stream": True})
    assert resp.status_code == 200 and b"event: message_stop" in resp.content

    def entries() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = client.get(nexus.url + "/v1/history").json()["data"]
        return rows

    assert wait_for(lambda: len(entries()) == 2)
    for entry in entries():
        assert entry["api"] == "messages" and entry["backend"] == "claude"
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 2), entry
        assert entry["cost_usd"] == pytest.approx(one_call), entry


def test_privacy_holds_on_the_agent_apis(keyed, start_fake, start_nexus, client):
    claude = start_fake(FakeClaude(["secret-model"]))
    policies = [{"model_pattern": "secret-*", "privacy": "restricted"}]
    spec = backend("claude", claude, "anthropic", api_key_env=KEY_VAR)
    nexus = start_nexus(settings_for(backends=[spec], routing={"policies": policies}))
    record = nexus.gateway.registry.get("claude")
    assert wait_for(lambda: record.status is Status.HEALTHY), record.last_error
    turn = [{"role": "user", "content": "hi"}]
    resp = client.post(
        nexus.url + MESSAGES, json={"model": "secret-model", "max_tokens": 8, "messages": turn}
    )
    assert resp.status_code == 529, resp.text  # nothing may serve it now: Anthropic's overloaded
    assert "requires 'restricted'" in resp.json()["error"]["message"]  # why, and what to do
    resp = client.post(nexus.url + "/v1/responses", json={"model": "secret-model", "input": "hi"})
    assert resp.status_code == 503 and resp.json()["context"]["excluded"][0]["stage"] == "privacy"
    assert claude.generations() == []


def test_what_only_the_translation_lacks_does_not_keep_anthropic_out(
    keyed, start_fake, start_nexus, client
):
    """Structured output and documents are Anthropic's own features: a native request with them
    goes to the Anthropic backend (the chat form of them is what Anthropic's translation lacks)."""
    claude = start_fake(FakeClaude(["claude-x"]))
    nexus = serve(start_nexus, backend("claude", claude, "anthropic", api_key_env=KEY_VAR))
    pdf = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {
        "model": "claude-x",
        "max_tokens": 64,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "document", "source": pdf}, {"type": "text", "text": "sum"}],
            }
        ],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    resp = client.post(nexus.url + MESSAGES, json=body)
    assert resp.status_code == 200, resp.text
    (sent,) = claude.generations()
    assert sent.json == body
