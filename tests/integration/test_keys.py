"""Client keys (issue 12): a key is required on every inference route once [auth] is on, keys
are made and revoked through the admin API, and each key's limits hold."""

from __future__ import annotations

from typing import Any

import pytest

from nexus.keys.tokens import hash_of
from tests.fakes import FakeOpenAI
from tests.harness import settings_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def keyed_nexus(start_fake: Any, start_nexus: Any, models: list[str] | None = None, **auth: Any):
    fake = start_fake(FakeOpenAI(models or ["m"]))
    backends = [{"name": "local", "url": fake.url, "type": "vllm"}]
    settings = settings_for(backends=backends, auth={"enabled": True, **auth})
    return start_nexus(settings), fake


def create(client: Any, nexus: Any, **settings: Any) -> dict[str, Any]:
    resp = client.post(nexus.url + "/admin/keys", json=settings)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def chat(client: Any, nexus: Any, key: str | None, model: str = "m", via: str = "bearer"):
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if via == "bearer" else {"x-api-key": key}
    return client.post(nexus.url + CHAT, json={"model": model, "messages": HI}, headers=headers)


def test_every_inference_route_needs_a_key(start_fake, start_nexus, client):
    nexus, _ = keyed_nexus(start_fake, start_nexus)
    for path, body in [
        (CHAT, {"model": "m", "messages": HI}),
        ("/v1/embeddings", {"model": "m", "input": "x"}),
        ("/v1/responses", {"model": "m", "input": "x"}),
    ]:
        resp = client.post(nexus.url + path, json=body)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"
    resp = client.post(
        nexus.url + "/v1/messages", json={"model": "m", "max_tokens": 5, "messages": HI}
    )
    assert resp.status_code == 401
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "authentication_error"
    assert client.get(nexus.url + "/v1/models").status_code == 401
    assert client.get(nexus.url + "/health").status_code == 200  # not an inference route


def test_a_created_key_works_either_way_and_is_shown_once(start_fake, start_nexus, client):
    nexus, fake = keyed_nexus(start_fake, start_nexus)
    made = create(client, nexus, name="alice", owner="alice@lab")
    secret = made["key"]
    assert secret.startswith("nx-") and len(secret) >= 46
    assert made["prefix"] == secret[:8]
    assert chat(client, nexus, secret).status_code == 200
    assert chat(client, nexus, secret, via="x-api-key").status_code == 200
    assert chat(client, nexus, secret + "x").status_code == 401
    listing = client.get(nexus.url + "/admin/keys").text
    assert secret not in listing and "alice" in listing
    # The client's Nexus key never goes upstream.
    calls = fake.calls(CHAT)
    assert len(calls) == 2 and all(secret not in repr(c.headers) for c in calls)


def test_a_revoked_key_is_refused_at_once(start_fake, start_nexus, client):
    nexus, _ = keyed_nexus(start_fake, start_nexus)
    secret = create(client, nexus, name="bob")["key"]
    assert chat(client, nexus, secret).status_code == 200
    assert client.delete(nexus.url + "/admin/keys/bob").status_code == 200
    resp = chat(client, nexus, secret)
    assert resp.status_code == 401 and "revoked" in resp.json()["error"]["message"]


def test_a_config_key_by_hash_and_its_expiry(start_fake, start_nexus, client):
    secret = "nx-config-declared-key-for-the-test-0123456789"
    entries = [
        {"name": "ops", "hash": hash_of(secret)},
        {"name": "old", "hash": hash_of(secret + "old"), "expires_at": "2020-01-01T00:00:00Z"},
    ]
    nexus, _ = keyed_nexus(start_fake, start_nexus, keys=entries)
    assert chat(client, nexus, secret).status_code == 200
    resp = chat(client, nexus, secret + "old")
    assert resp.status_code == 401 and "expired" in resp.json()["error"]["message"]


def test_rpm_is_exact_and_answers_429_with_headers(start_fake, start_nexus, client):
    nexus, _ = keyed_nexus(start_fake, start_nexus)
    secret = create(client, nexus, name="ci", rpm=3, tpm=100000)["key"]
    answers = [chat(client, nexus, secret) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    first = answers[0].headers
    assert first["x-ratelimit-limit-requests"] == "3"
    assert first["x-ratelimit-remaining-requests"] == "2"
    assert first["x-ratelimit-limit-tokens"] == "100000"
    assert "x-ratelimit-reset-requests" in first and "x-ratelimit-reset-tokens" in first
    refused = answers[3]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_models_outside_the_keys_globs_are_403_with_what_it_may_use(
    start_fake, start_nexus, client
):
    nexus, _ = keyed_nexus(start_fake, start_nexus, models=["m", "big"])
    secret = create(client, nexus, name="small", models=["m*"])["key"]
    assert chat(client, nexus, secret, "m").status_code == 200
    resp = chat(client, nexus, secret, "big")
    assert resp.status_code == 403, resp.text
    message = resp.json()["error"]["message"]
    assert "'big'" in message and "m*" in message


@pytest.mark.parametrize("via_alias", [False, True])
def test_a_restricted_key_never_reaches_the_open_zone(
    start_fake, start_nexus, client, via_alias, monkeypatch
):
    monkeypatch.setenv("NEXUS_TEST_CLOUD_KEY", "sk-cloud")
    cloud = start_fake(FakeOpenAI(["m"]))
    backends = [
        {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": "NEXUS_TEST_CLOUD_KEY"}
    ]
    routing = {"aliases": {"fast": "m"}} if via_alias else {}
    nexus = start_nexus(settings_for(backends=backends, auth={"enabled": True}, routing=routing))
    secret = create(client, nexus, name="private", max_zone="restricted")["key"]
    resp = chat(client, nexus, secret, "fast" if via_alias else "m")
    assert resp.status_code == 503, resp.text
    assert "max_zone 'restricted'" in resp.text
    assert cloud.calls(CHAT) == []


def test_a_refused_request_is_in_the_keys_history(start_fake, start_nexus, client):
    nexus, _ = keyed_nexus(start_fake, start_nexus)
    secret = create(client, nexus, name="ci", rpm=1)["key"]
    assert [chat(client, nexus, secret).status_code for _ in range(2)] == [200, 429]
    nexus.gateway.telemetry.drain()
    entries = client.get(nexus.url + "/v1/history").json()["data"]
    assert [(e["status"], e["key"]) for e in entries] == [(200, "ci"), (429, "ci")]
    assert entries[1]["error_type"] == "rate_limit_exceeded"


def test_a_new_key_under_a_revoked_name_keeps_the_names_month(start_fake, start_nexus, client):
    """Rotating a key (revoke, create again under the name) is not a new monthly budget."""
    nexus, _ = keyed_nexus(start_fake, start_nexus)
    old = create(client, nexus, name="carol")["key"]
    assert chat(client, nexus, old).status_code == 200
    assert client.delete(nexus.url + "/admin/keys/carol").status_code == 200
    new = create(client, nexus, name="carol")["key"]
    assert new != old and chat(client, nexus, old).status_code == 401
    assert client.get(nexus.url + "/admin/keys/carol").json()["usage"]["requests"] == 1
    assert chat(client, nexus, new).status_code == 200
    assert client.get(nexus.url + "/admin/keys/carol").json()["usage"]["requests"] == 2


def test_patch_null_clears_a_setting(start_fake, start_nexus, client):
    nexus, _ = keyed_nexus(start_fake, start_nexus)
    create(client, nexus, name="dan", rpm=5, max_zone="restricted")
    resp = client.patch(nexus.url + "/admin/keys/dan", json={"rpm": None, "max_zone": None})
    assert resp.status_code == 200, resp.text
    assert resp.json()["rpm"] is None and resp.json()["max_zone"] == "open"
