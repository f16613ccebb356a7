"""Client strings are bounded (issue 8, point 3): what a client sends and Nexus keeps or logs has
a size limit, and odd input (deep nesting, query parameters out of range) is a 400 envelope,
never a 500. The real app on a real port, fake upstreams of both dialects."""

from __future__ import annotations

import logging
from typing import Any

import httpx2
import orjson
import pytest

from tests.fakes import FakeOllama, FakeOpenAI
from tests.harness import settings_for

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


def envelope(resp: httpx2.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    return error


def chat(model: str, content: str = '"hi"') -> bytes:
    return f'{{"model":"{model}","messages":[{{"role":"user","content":{content}}}]}}'.encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def fake(start_fake):
    return start_fake(FakeOpenAI(models=["mock-model"]))


@pytest.fixture
def ollama(start_fake):
    return start_fake(FakeOllama(models=["llama3"]))


@pytest.fixture
def nexus(fake, ollama, start_nexus):
    return start_nexus(
        settings_for(
            ("vllm-1", fake, "vllm"),
            ("ollama-1", ollama, "ollama"),
            routing={"aliases": {"fast": "mock-model"}},
            logging={"enable_content_logging": True},
            history={"max_entries": 50},
        )
    )


# --- model names ------------------------------------------------------------------------------


def test_a_model_name_past_256_characters_is_400_and_kept_nowhere(nexus, fake, client, caplog):
    huge = "m" * 5_000_000
    with caplog.at_level(logging.INFO, logger="nexus"):
        for _ in range(3):
            resp = client.post(nexus.url + CHAT, content=chat(huge), headers=JSON)
            error = envelope(resp, 400, "model")
            assert "256" in error["message"] and len(resp.content) < 1000
    assert fake.calls(CHAT) == []
    entries = client.get(nexus.url + "/v1/history").json()["data"]
    assert len(entries) == 3 and all(len(orjson.dumps(e)) < 1000 for e in entries)
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


def test_a_model_name_of_256_characters_is_still_looked_up(nexus, client):
    resp = client.post(nexus.url + CHAT, content=chat("m" * 256), headers=JSON)
    error = envelope(resp, 404, "model")
    assert error["code"] == "model_not_found"
    (entry,) = client.get(nexus.url + "/v1/history?limit=1").json()["data"]
    assert entry["model"] == "m" * 256


@pytest.mark.parametrize("path", [CHAT, "/v1/embeddings"])
def test_the_model_bound_holds_on_every_inference_route(nexus, client, path):
    body = {"model": "x" * 257, "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
    envelope(client.post(nexus.url + path, json=body), 400, "model")


# --- deep nesting -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mock-model", "fast", "llama3"])
@pytest.mark.parametrize("depth", [300, 1_020, 5_000])
@pytest.mark.parametrize("role", ["user", "system"])
def test_deeply_nested_chat_bodies_are_never_a_500(nexus, client, model, depth, role):
    for content in (nested(depth), f'[{{"type":"text","text":{nested(depth)}}}]'):
        body = f'{{"model":"{model}","messages":[{{"role":"{role}","content":{content}}}]}}'
        resp = client.post(nexus.url + CHAT, content=body.encode(), headers=JSON)
        if resp.status_code != 200:  # passed through as bytes when nothing needs re-encoding
            envelope(resp, 400)


def test_a_body_nexus_must_re_encode_is_400_when_too_deep(nexus, fake, client):
    resp = client.post(nexus.url + CHAT, content=chat("fast", nested(300)), headers=JSON)
    error = envelope(resp, 400)
    assert "nested too deeply" in error["message"]
    assert fake.calls(CHAT) == []


def test_a_body_nexus_passes_through_is_served_at_any_depth_orjson_reads(nexus, fake, client):
    resp = client.post(nexus.url + CHAT, content=chat("mock-model", nested(300)), headers=JSON)
    assert resp.status_code == 200, resp.text
    assert fake.calls(CHAT)[0].raw == chat("mock-model", nested(300))


@pytest.mark.parametrize("model", ["mock-model", "llama3"])
@pytest.mark.parametrize("depth", [300, 1_020, 5_000])
def test_deeply_nested_embeddings_are_never_a_500(nexus, client, model, depth):
    body = f'{{"model":"{model}","input":[{nested(depth)}]}}'.encode()
    resp = client.post(nexus.url + "/v1/embeddings", content=body, headers=JSON)
    if resp.status_code != 200:
        envelope(resp, 400)


@pytest.mark.parametrize("depth", [300, 1_020, 5_000])
@pytest.mark.parametrize("field", ["name", "url", "priority", "managed"])
def test_deeply_nested_admin_bodies_are_400(nexus, client, depth, field):
    entry = {"name": "extra", "url": "http://127.0.0.1:9", "type": "vllm"}
    body = orjson.dumps(entry)[:-1] + f',"{field}":{nested(depth)}}}'.encode()
    resp = client.post(nexus.url + "/admin/backends", content=body, headers=JSON)
    error = envelope(resp, 400)
    assert len(error["message"]) < 2000
    assert sorted(b.name for b in nexus.gateway.registry) == ["ollama-1", "vllm-1"]


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"name": "extra", "url": "http://127.0.0.1:9/" + "p" * 5000, "type": "vllm"}, "2048"),
        ({"name": "extra", "url": "http://127.0.0.1:9", "type": "vllm", "k" * 100_000: 1}, "k"),
        ({"name": "extra", "url": "http://127.0.0.1:9", "type": "v" * 100_000}, "vvv"),
    ],
    ids=["long-url", "long-unknown-key", "long-value"],
)
def test_admin_errors_do_not_echo_huge_client_strings(nexus, client, entry, needle):
    resp = client.post(nexus.url + "/admin/backends", json=entry)
    error = envelope(resp, 400)
    assert needle in error["message"] and len(error["message"]) < 2000
    assert "extra" not in [b.name for b in nexus.gateway.registry]


# --- query parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=51",
        "limit=abc",
        "limit=",
        "limit",
        "limit=1.5",
        "limit=" + "9" * 5000,
        "limit=%EF%BC%95",
        "limit=5&limit=x",
    ],
)
def test_history_limits_out_of_range_are_400(nexus, client, query):
    error = envelope(client.get(f"{nexus.url}/v1/history?{query}"), 400, "limit")
    assert "1 to 50" in error["message"]


@pytest.mark.parametrize(
    ("query", "most"),
    [("limit=1", 1), ("limit=50", 50), ("limit=%35", 5), ("", 50), ("other=x", 50)],
)
def test_history_limits_in_range_are_served(nexus, client, query, most):
    for _ in range(6):
        client.post(nexus.url + CHAT, content=chat("mock-model"), headers=JSON)
    resp = client.get(f"{nexus.url}/v1/history?{query}")
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == min(6, most)
