"""The model list, the health endpoints and the health state machine, through a real Nexus."""

from __future__ import annotations

from typing import Any

import pytest

from nexus import __version__
from nexus.registry import Status
from tests.fakes import FakeOllama, FakeOpenAI, Reply
from tests.harness import settings_for

CHAT_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
}


def chat(client, url: str, model: str) -> Any:
    return client.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )


def status_of(nexus, name: str) -> Status:
    backend = nexus.gateway.registry.get(name)
    assert backend is not None
    return Status(backend.status)


# --- /v1/models ------------------------------------------------------------------------------


def test_models_merge_backends_into_one_entry_per_model(start_fake, start_nexus, client):
    first = start_fake(FakeOpenAI(["shared", "first-only"], max_model_len=8192))
    second = start_fake(FakeOpenAI(["shared", "second-only"], max_model_len=32768))
    backends = [
        {"name": "b-second", "url": second.url, "type": "vllm", "priority": 20},
        {"name": "a-first", "url": first.url, "type": "vllm", "priority": 10},
    ]
    nexus = start_nexus(settings_for(backends=backends))
    resp = client.get(f"{nexus.url}/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    ids = [row["id"] for row in body["data"]]
    assert ids == ["first-only", "second-only", "shared"]  # once each
    rows = {row["id"]: row for row in body["data"]}
    shared = rows["shared"]
    assert shared["object"] == "model"
    assert isinstance(shared["created"], int)
    assert shared["owned_by"] == "a-first"  # the preferred (lowest priority) backend
    assert shared["backends"] == ["a-first", "b-second"]
    assert shared["context_length"] == 32768  # the largest any backend offers
    assert rows["first-only"]["backends"] == ["a-first"]
    assert rows["first-only"]["context_length"] == 8192
    assert rows["second-only"]["owned_by"] == "b-second"


def test_models_of_unhealthy_backends_are_not_listed(start_fake, start_nexus, loop_thread, client):
    good = start_fake(FakeOpenAI(["shared", "good-only"]))
    bad = start_fake(FakeOpenAI(["shared", "bad-only"]))
    nexus = start_nexus(
        settings_for(
            ("good", good, "vllm"), ("bad", bad, "vllm"), health_check={"failure_threshold": 1}
        )
    )
    before = {row["id"] for row in client.get(f"{nexus.url}/v1/models").json()["data"]}
    assert before == {"shared", "good-only", "bad-only"}

    bad.push("/v1/models", Reply(status=500))
    loop_thread.run(nexus.gateway.health.check_all())
    assert status_of(nexus, "bad") is Status.UNHEALTHY

    rows = {row["id"]: row for row in client.get(f"{nexus.url}/v1/models").json()["data"]}
    assert set(rows) == {"shared", "good-only"}
    assert rows["shared"]["backends"] == ["good"]
    assert rows["shared"]["owned_by"] == "good"


def test_backend_that_fails_at_startup_lists_nothing(start_fake, start_nexus, client):
    down = start_fake(FakeOpenAI(["ghost"]))
    down.push("/v1/models", Reply(status=503))
    nexus = start_nexus(settings_for(("down", down, "vllm")))
    assert client.get(f"{nexus.url}/v1/models").json() == {"object": "list", "data": []}


def test_vllm_max_model_len_and_capabilities(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI(["qwen2.5-7b-instruct", "bge-small"], max_model_len=32768))
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    rows = {row["id"]: row for row in client.get(f"{nexus.url}/v1/models").json()["data"]}
    assert rows["qwen2.5-7b-instruct"]["context_length"] == 32768
    assert rows["qwen2.5-7b-instruct"]["capabilities"] == {
        "vision": False,
        "tools": True,
        "json_mode": True,  # vLLM honours response_format for every model
        "embeddings": False,
    }
    assert rows["bge-small"]["capabilities"]["embeddings"] is True
    assert rows["bge-small"]["capabilities"]["tools"] is False
    assert fake.calls("/props") == []  # only llama.cpp has /props


def test_llamacpp_props_n_ctx_is_the_context_length(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI(["smollm2"]))
    fake.push(
        "/props",
        Reply(
            json={"default_generation_settings": {"n_ctx": 4096}, "modalities": {"vision": True}}
        ),
    )
    nexus = start_nexus(settings_for(("llamacpp-1", fake, "llamacpp")))
    rows = client.get(f"{nexus.url}/v1/models").json()["data"]
    assert len(rows) == 1
    assert rows[0]["id"] == "smollm2"
    assert rows[0]["context_length"] == 4096
    assert rows[0]["capabilities"]["vision"] is True
    assert rows[0]["capabilities"]["json_mode"] is True
    assert [c.method for c in fake.calls("/props")] == ["GET"]


def test_llamacpp_without_props_still_lists_models(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI(["smollm2"]))  # /props answers 404
    nexus = start_nexus(settings_for(("llamacpp-1", fake, "llamacpp")))
    rows = client.get(f"{nexus.url}/v1/models").json()["data"]
    assert [row["id"] for row in rows] == ["smollm2"]
    assert rows[0]["context_length"] is None
    assert len(fake.calls("/props")) == 1


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/"])
def test_trailing_v1_in_backend_url_is_not_doubled(start_fake, start_nexus, client, suffix):
    fake = start_fake(FakeOpenAI())
    backends = [{"name": "vllm-1", "url": fake.url + suffix, "type": "vllm"}]
    nexus = start_nexus(settings_for(backends=backends))
    assert chat(client, nexus.url, "mock-model").status_code == 200
    resp = client.post(f"{nexus.url}/v1/embeddings", json={"model": "mock-model", "input": "x"})
    assert resp.status_code == 200
    paths = {call.path for call in fake.requests}
    assert paths == {"/v1/models", "/v1/chat/completions", "/v1/embeddings"}
    assert not any(path.startswith("/v1/v1") for path in paths)


# --- /health, /livez, /readyz ------------------------------------------------------------------


def test_health_all_healthy(start_fake, start_nexus, client):
    one = start_fake(FakeOpenAI(["m1", "shared"]))
    two = start_fake(FakeOpenAI(["m2", "shared"]))
    nexus = start_nexus(settings_for(("one", one, "vllm"), ("two", two, "vllm")))
    resp = client.get(f"{nexus.url}/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "healthy"
    assert body["backends"] == {"total": 2, "healthy": 2, "unhealthy": 0}
    assert body["models"] == 3  # distinct model ids
    assert body["version"] == __version__
    assert isinstance(body["uptime_seconds"], int) and body["uptime_seconds"] >= 0


def test_health_degraded(start_fake, start_nexus, client):
    up = start_fake(FakeOpenAI(["m1"]))
    down = start_fake(FakeOpenAI(["m2"]))
    down.push("/v1/models", Reply(status=500))
    nexus = start_nexus(settings_for(("up", up, "vllm"), ("down", down, "vllm")))
    body = client.get(f"{nexus.url}/health").json()
    assert body["status"] == "degraded"
    assert body["backends"] == {"total": 2, "healthy": 1, "unhealthy": 1}
    assert body["models"] == 1


def test_health_unhealthy_and_readyz_503(start_fake, start_nexus, client):
    down = start_fake(FakeOpenAI(["m1"]))
    down.push("/v1/models", Reply(status=500))
    nexus = start_nexus(settings_for(("down", down, "vllm")))
    health = client.get(f"{nexus.url}/health")
    assert health.status_code == 200
    assert health.json()["status"] == "unhealthy"
    assert health.json()["backends"] == {"total": 1, "healthy": 0, "unhealthy": 1}
    assert health.json()["models"] == 0

    live = client.get(f"{nexus.url}/livez")
    assert live.status_code == 200
    assert live.json() == {"status": "ok"}

    ready = client.get(f"{nexus.url}/readyz")
    assert ready.status_code == 503
    error = ready.json()["error"]
    assert error["type"] == "service_unavailable"
    assert error["code"] == "service_unavailable"
    assert isinstance(error["message"], str) and error["message"]
    assert "param" in error


def test_health_with_no_backends_at_all(start_nexus, client):
    nexus = start_nexus(settings_for())
    body = client.get(f"{nexus.url}/health").json()
    assert body["status"] == "unhealthy"
    assert body["backends"] == {"total": 0, "healthy": 0, "unhealthy": 0}
    assert client.get(f"{nexus.url}/livez").status_code == 200
    assert client.get(f"{nexus.url}/readyz").status_code == 503


def test_readyz_200_when_a_backend_is_healthy(start_fake, start_nexus, client):
    up = start_fake(FakeOpenAI())
    down = start_fake(FakeOpenAI())
    down.push("/v1/models", Reply(status=500))
    nexus = start_nexus(settings_for(("up", up, "vllm"), ("down", down, "vllm")))
    resp = client.get(f"{nexus.url}/readyz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ready", "healthy_backends": 1}


def test_backend_with_missing_key_is_unhealthy_and_never_probed(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI(["gpt-4o"]))
    backends = [
        {"name": "cloud", "url": fake.url, "type": "openai", "api_key_env": "NEXUS_TEST_UNSET_KEY"}
    ]
    nexus = start_nexus(settings_for(backends=backends))
    assert fake.requests == []
    body = client.get(f"{nexus.url}/health").json()
    assert body["backends"] == {"total": 1, "healthy": 0, "unhealthy": 1}
    backend = nexus.gateway.registry.get("cloud")
    assert backend is not None and backend.unavailable is not None
    assert "NEXUS_TEST_UNSET_KEY" in backend.unavailable


# --- health probes -----------------------------------------------------------------------------


def test_probes_never_call_a_completion_endpoint(start_fake, start_nexus, loop_thread):
    vllm = start_fake(FakeOpenAI())
    llamacpp = start_fake(FakeOpenAI())
    ollama = start_fake(FakeOllama())
    nexus = start_nexus(
        settings_for(
            ("vllm", vllm, "vllm"), ("llamacpp", llamacpp, "llamacpp"), ("ollama", ollama, "ollama")
        )
    )
    loop_thread.run(nexus.gateway.health.check_all())
    for fake in (vllm, llamacpp, ollama):
        assert fake.requests, "the backend was never probed"
        assert not {call.path for call in fake.requests} & CHAT_PATHS
    assert {(c.method, c.path) for c in vllm.requests} == {("GET", "/v1/models")}
    assert len(vllm.requests) == 2  # one per round
    assert {(c.method, c.path) for c in llamacpp.requests} == {
        ("GET", "/v1/models"),
        ("GET", "/props"),
    }
    assert {(c.method, c.path) for c in ollama.requests} <= {
        ("GET", "/api/tags"),
        ("POST", "/api/show"),
    }
    assert len(ollama.calls("/api/tags")) == 2


def test_failure_threshold_then_recovery_threshold(start_fake, start_nexus, loop_thread, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(
            ("vllm-1", fake, "vllm"),
            health_check={"failure_threshold": 3, "recovery_threshold": 2},
        )
    )
    health = nexus.gateway.health
    assert status_of(nexus, "vllm-1") is Status.HEALTHY

    fake.push("/v1/models", Reply(status=500), Reply(status=500), Reply(status=500))
    loop_thread.run(health.check_all())
    loop_thread.run(health.check_all())
    assert status_of(nexus, "vllm-1") is Status.HEALTHY  # two failures are below the threshold
    assert chat(client, nexus.url, "mock-model").status_code == 200

    loop_thread.run(health.check_all())
    assert status_of(nexus, "vllm-1") is Status.UNHEALTHY
    resp = chat(client, nexus.url, "mock-model")
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "service_unavailable"
    assert client.get(f"{nexus.url}/readyz").status_code == 503
    assert client.get(f"{nexus.url}/v1/models").json()["data"] == []

    loop_thread.run(health.check_all())
    assert status_of(nexus, "vllm-1") is Status.UNHEALTHY  # one success is below recovery
    assert chat(client, nexus.url, "mock-model").status_code == 503

    loop_thread.run(health.check_all())
    assert status_of(nexus, "vllm-1") is Status.HEALTHY
    assert chat(client, nexus.url, "mock-model").status_code == 200
    assert client.get(f"{nexus.url}/readyz").status_code == 200


def test_a_success_resets_the_failure_count(start_fake, start_nexus, loop_thread):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(("vllm-1", fake, "vllm"), health_check={"failure_threshold": 2})
    )
    fake.push(
        "/v1/models",
        Reply(status=500),
        Reply(
            json={
                "object": "list",
                "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "x"}],
            }
        ),
        Reply(status=500),
    )
    for _ in range(3):
        loop_thread.run(nexus.gateway.health.check_all())
    assert status_of(nexus, "vllm-1") is Status.HEALTHY  # failure, success, failure
    fake.push("/v1/models", Reply(status=500))
    loop_thread.run(nexus.gateway.health.check_all())
    assert status_of(nexus, "vllm-1") is Status.UNHEALTHY


def test_backend_down_at_startup_needs_recovery_threshold(start_fake, start_nexus, loop_thread):
    fake = start_fake(FakeOpenAI())
    fake.push("/v1/models", Reply(status=500))
    nexus = start_nexus(
        settings_for(("vllm-1", fake, "vllm"), health_check={"recovery_threshold": 3})
    )
    assert status_of(nexus, "vllm-1") is Status.UNHEALTHY  # unknown -> unhealthy at once
    loop_thread.run(nexus.gateway.health.check_all())
    loop_thread.run(nexus.gateway.health.check_all())
    assert status_of(nexus, "vllm-1") is Status.UNHEALTHY
    loop_thread.run(nexus.gateway.health.check_all())
    assert status_of(nexus, "vllm-1") is Status.HEALTHY


def test_invalid_model_list_counts_as_a_failure(start_fake, start_nexus, loop_thread):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(("vllm-1", fake, "vllm"), health_check={"failure_threshold": 1})
    )
    fake.push("/v1/models", Reply(json={"models": []}))
    loop_thread.run(nexus.gateway.health.check_all())
    assert status_of(nexus, "vllm-1") is Status.UNHEALTHY
    backend = nexus.gateway.registry.get("vllm-1")
    assert backend is not None and backend.last_error and "data" in backend.last_error
