"""Privacy policies keep restricted models off the cloud backends (``type = "anthropic"`` and
``type = "google"``, zone ``open`` by default), failover, aliases and fallbacks included.

A local OpenAI-compatible fake and both cloud fakes serve the same model; the cloud ones have the
better priority, so only the policy keeps a restricted request away from them. "Zero generation
calls" is checked on the cloud fakes' own records of what reached them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from nexus.registry import Status
from tests.cloud_fakes import FakeClaude, FakeGoogle
from tests.fakes import FakeOpenAI, Reply
from tests.harness import NexusServer, data_events, settings_for, wait_for

CHAT = "/v1/chat/completions"
SECRET = "secret-model"
PUBLIC = "public-model"
CLOUD_ONLY = "claude-cloud-only"
POLICY = [{"model_pattern": "secret-*", "privacy": "restricted"}]
KEYS = {"NEXUS_TEST_PRIVACY_ANTHROPIC": "sk-ant-privacy", "NEXUS_TEST_PRIVACY_GEMINI": "AIza-p"}


class Fleet:
    """Nexus with a local backend and both cloud types, each serving ``models``."""

    def __init__(
        self, nexus: NexusServer, local: FakeOpenAI, claude: FakeClaude, gemini: FakeGoogle
    ):
        self.nexus, self.local, self.claude, self.gemini = nexus, local, claude, gemini

    def post(self, http: httpx2.Client, model: str, *, stream: bool = False) -> httpx2.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        return http.post(self.nexus.url + CHAT, json=body)

    def cloud_generations(self) -> int:
        return len(self.claude.generations()) + len(self.gemini.generations())


Start = Callable[..., Fleet]


@pytest.fixture
def fleet(start_fake, start_nexus, monkeypatch) -> Start:
    for var, value in KEYS.items():
        monkeypatch.setenv(var, value)

    def start(
        *,
        local_first: bool = False,
        claude_zone: str | None = None,
        cloud_models: tuple[str, ...] = (SECRET, PUBLIC),
        **routing: Any,
    ) -> Fleet:
        local = start_fake(FakeOpenAI([SECRET, PUBLIC]))
        claude = start_fake(FakeClaude(list(cloud_models)))
        gemini = start_fake(FakeGoogle(list(cloud_models)))
        claude_entry: dict[str, Any] = {
            "name": "claude",
            "url": claude.url,
            "type": "anthropic",
            "api_key_env": "NEXUS_TEST_PRIVACY_ANTHROPIC",
            "priority": 10,
        }
        if claude_zone is not None:
            claude_entry["zone"] = claude_zone
        backends = [
            # The cloud has the better priority unless the test says otherwise: only the
            # policy keeps a restricted request away from it.
            {
                "name": "local",
                "url": local.url,
                "type": "vllm",
                "priority": 1 if local_first else 90,
            },
            claude_entry,
            {
                "name": "gemini",
                "url": gemini.url,
                "type": "google",
                "api_key_env": "NEXUS_TEST_PRIVACY_GEMINI",
                "priority": 20,
            },
        ]
        settings = settings_for(
            backends=backends,
            routing={"strategy": "priority_only", "policies": POLICY, **routing},
        )
        nexus = start_nexus(settings)
        records = [nexus.gateway.registry.get(name) for name in ("local", "claude", "gemini")]
        assert wait_for(lambda: all(b is not None and b.status is Status.HEALTHY for b in records))
        return Fleet(nexus, local, claude, gemini)

    return start


def served_by(resp: httpx2.Response) -> str:
    assert resp.status_code == 200, resp.text
    if resp.headers["content-type"].startswith("text/event-stream"):
        assert data_events(resp.text)[-1] == "[DONE]"
    return resp.headers["x-nexus-backend"]


def privacy_refusal(resp: httpx2.Response) -> dict[str, Any]:
    """The actionable 503: nothing may serve; the policy is named, and each cloud backend."""
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["type"] == "service_unavailable"
    return names_the_policy(resp)


def local_failure(resp: httpx2.Response) -> dict[str, Any]:
    """The local backend's failure (502), saying too why the cloud backends were not tried."""
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["type"] == "server_error"
    assert "x-nexus-backend" not in resp.headers
    return names_the_policy(resp)


def names_the_policy(resp: httpx2.Response) -> dict[str, Any]:
    assert resp.headers["content-type"].startswith("application/json")
    context: dict[str, Any] = resp.json()["context"]
    assert context["privacy_zone_required"] == "restricted"
    privacy = {d["backend"] for d in context["excluded"] if d["stage"] == "privacy"}
    assert privacy == {"claude", "gemini"}
    details = json.loads(resp.headers["x-nexus-rejection-details"])
    assert details == context["excluded"]
    assert "privacy" in resp.headers["x-nexus-rejection-reasons"]
    return context


def test_cloud_types_default_to_the_open_zone(fleet, client):
    fleet_ = fleet()
    rows = client.get(fleet_.nexus.url + "/v1/backends").json()["data"]
    zones = {row["name"]: row["zone"] for row in rows}
    assert zones == {"local": "restricted", "claude": "open", "gemini": "open"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_restricted_model_is_served_by_the_local_backend_only(fleet, client, stream):
    fleet_ = fleet()
    for _ in range(3):
        resp = fleet_.post(client, SECRET, stream=stream)
        assert served_by(resp) == "local"
        assert resp.headers["x-nexus-privacy-zone"] == "restricted"
    assert fleet_.cloud_generations() == 0
    # The same fleet serves an unrestricted model from the cloud (it has the better priority).
    public = fleet_.post(client, PUBLIC, stream=stream)
    assert served_by(public) == "claude"
    assert public.headers["x-nexus-privacy-zone"] == "open"


LOCAL_FAILURES = {
    "status-500": (Reply(status=500, json={"error": {"message": "boom"}}), False),
    "status-503-stream": (Reply(status=503, json={"error": {"message": "busy"}}), True),
    "empty-stream": (Reply(events=[b": nothing\n\n"]), True),
    "dropped-stream": (Reply(events=[b"data: {"], drop_after=1), True),
}


@pytest.mark.parametrize("failure", list(LOCAL_FAILURES), ids=list(LOCAL_FAILURES))
def test_a_failing_local_backend_is_not_failed_over_to_the_cloud(fleet, client, failure):
    reply, stream = LOCAL_FAILURES[failure]
    fleet_ = fleet()
    fleet_.local.push(CHAT, reply)

    resp = fleet_.post(client, SECRET, stream=stream)

    # The local backend's failure, as an error envelope: nothing was served, nobody else asked.
    local_failure(resp)
    assert len(fleet_.local.calls(CHAT)) == 1
    assert fleet_.cloud_generations() == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_unreachable_local_backend_gets_the_privacy_503_not_the_cloud(
    fleet, client, kill, stream
):
    fleet_ = fleet()
    kill(fleet_.local)

    local_failure(fleet_.post(client, SECRET, stream=stream))  # connection refused
    local = fleet_.nexus.gateway.registry.get("local")
    assert wait_for(lambda: local is not None and local.status is Status.UNHEALTHY)

    # From now on the plan is empty: the 503 names the local backend's health and the policy.
    again = fleet_.post(client, SECRET, stream=stream)
    context = privacy_refusal(again)
    assert {(d["backend"], d["stage"]) for d in context["excluded"]} >= {("local", "health")}
    assert fleet_.cloud_generations() == 0

    # An unrestricted model in the same state goes to the cloud.
    assert served_by(fleet_.post(client, PUBLIC, stream=stream)) == "claude"


def test_a_restricted_model_only_the_cloud_serves_is_refused_with_the_policy(fleet, client):
    fleet_ = fleet(cloud_models=("secret-cloud-only",))
    resp = fleet_.post(client, "secret-cloud-only")
    privacy_refusal(resp)
    assert fleet_.cloud_generations() == 0


def test_an_alias_cannot_carry_a_restricted_request_to_the_cloud(fleet, client):
    # "secret-chat" is restricted by its own name; what it names only the cloud serves.
    fleet_ = fleet(cloud_models=(CLOUD_ONLY, PUBLIC), aliases={"secret-chat": CLOUD_ONLY})
    privacy_refusal(fleet_.post(client, "secret-chat"))
    privacy_refusal(fleet_.post(client, "secret-chat", stream=True))
    assert fleet_.cloud_generations() == 0
    # The target itself, asked for by its own name, is not restricted.
    assert served_by(fleet_.post(client, CLOUD_ONLY)) == "claude"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_fallback_chain_cannot_carry_a_restricted_request_to_the_cloud(fleet, client, stream):
    fleet_ = fleet(cloud_models=(CLOUD_ONLY, PUBLIC), fallbacks={SECRET: [CLOUD_ONLY]})
    fleet_.local.push(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))

    resp = fleet_.post(client, SECRET, stream=stream)

    context = local_failure(resp)
    assert {d["model"] for d in context["excluded"]} == {CLOUD_ONLY}
    assert "x-nexus-fallback-model" not in resp.headers
    assert len(fleet_.local.calls(CHAT)) == 1
    assert fleet_.cloud_generations() == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_fallback_chain_stays_on_the_restricted_side(fleet, client, stream):
    # The chain's first model only the cloud serves: skipped; the next one the local backend
    # serves too, and it answers there, still restricted, never in the cloud.
    fleet_ = fleet(cloud_models=(CLOUD_ONLY, PUBLIC), fallbacks={SECRET: [CLOUD_ONLY, PUBLIC]})
    fleet_.local.push(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))

    resp = fleet_.post(client, SECRET, stream=stream)

    assert served_by(resp) == "local"
    assert resp.headers["x-nexus-fallback-model"] == PUBLIC
    assert resp.headers["x-nexus-privacy-zone"] == "restricted"
    assert [c.json["model"] for c in fleet_.local.calls(CHAT)] == [SECRET, PUBLIC]
    assert fleet_.cloud_generations() == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_unrestricted_model_fails_over_to_the_cloud(fleet, client, stream):
    fleet_ = fleet(local_first=True)
    fleet_.local.push(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fleet_.claude.push("/v1/messages", Reply(status=529, json=overloaded))

    resp = fleet_.post(client, PUBLIC, stream=stream)

    # local (500) -> claude (529, overloaded) -> gemini answers.
    assert served_by(resp) == "gemini"
    assert resp.headers["x-nexus-route-reason"] == "failover"
    assert resp.headers["x-nexus-privacy-zone"] == "open"
    assert len(fleet_.local.calls(CHAT)) == 1
    assert len(fleet_.claude.generations()) == 1 and len(fleet_.gemini.generations()) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_anthropic_backend_set_to_the_restricted_zone_may_serve_restricted_models(
    fleet, client, stream
):
    # The user's choice (e.g. a contract with the provider): zone = "restricted" is honoured.
    fleet_ = fleet(claude_zone="restricted")
    rows = client.get(fleet_.nexus.url + "/v1/backends").json()["data"]
    assert {row["name"]: row["zone"] for row in rows}["claude"] == "restricted"

    resp = fleet_.post(client, SECRET, stream=stream)

    assert served_by(resp) == "claude"  # the best priority among the restricted ones
    assert resp.headers["x-nexus-privacy-zone"] == "restricted"
    assert fleet_.gemini.generations() == []  # still open: still excluded
    assert fleet_.local.calls(CHAT) == []
