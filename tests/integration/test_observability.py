"""Observability: Prometheus metrics (/metrics), totals (/v1/stats) and the request history
(/v1/history), fed by real chat, streaming and failed requests; and a real Prometheus server
scraping Nexus."""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from nexus.routing.planner import STAGES
from tests.fakes import DONE, FakeOpenAI, Reply, chunk, sse, text_stream
from tests.harness import settings_for, wait_for

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]
GUARD = httpx2.Timeout(10.0)  # a hang fails the test instead of blocking it
STREAM_USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
CHAT_USAGE = {"prompt_tokens": 5, "completion_tokens": 2}  # what FakeOpenAI's completion() says
UPSTREAM_500 = Reply(
    status=500, json={"error": {"message": "boom", "type": "server_error", "code": None}}
)


# --- helpers --------------------------------------------------------------------------------


class Scrape:
    """One ``GET /metrics``, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly these labels, or None when there is none."""
        for sample in self.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
        return None

    def total(self, name: str, **labels: str) -> float:
        """The sum of every ``name`` sample whose labels include these."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def series(self, name: str) -> set[tuple[tuple[str, str], ...]]:
        return {tuple(sorted(s.labels.items())) for s in self.samples if s.name == name}


def scrape(client: httpx2.Client, nexus: Any) -> Scrape:
    resp = client.get(nexus.url + "/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return Scrape(resp.text)


def stats(client: httpx2.Client, nexus: Any) -> dict[str, Any]:
    resp = client.get(nexus.url + "/v1/stats")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def history(client: httpx2.Client, nexus: Any, query: str = "") -> list[dict[str, Any]]:
    resp = client.get(nexus.url + "/v1/history" + query)
    assert resp.status_code == 200, resp.text
    entries: list[dict[str, Any]] = resp.json()["data"]
    return entries


def requests_seen(client: httpx2.Client, nexus: Any) -> int:
    """How many requests /v1/stats has counted (the outcome is recorded just after the answer)."""
    count: int = stats(client, nexus)["requests"]["requests"]
    return count


def chat(
    client: httpx2.Client,
    nexus: Any,
    model: str = "mock-model",
    content: str = "hi",
    request_id: str | None = None,
) -> httpx2.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return client.post(nexus.url + CHAT, json=body, headers=headers, timeout=GUARD)


def stream(
    client: httpx2.Client,
    nexus: Any,
    model: str = "mock-model",
    content: str = "hi",
    request_id: str | None = None,
) -> httpx2.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = client.post(nexus.url + CHAT, json=body, headers=headers, timeout=GUARD)
    assert resp.status_code == 200, resp.text
    assert resp.text.endswith("data: [DONE]\n\n")
    return resp


def stream_with_usage(model: str = "mock-model") -> Reply:
    """A stream whose last chunk before [DONE] carries usage (``include_usage``)."""
    usage_chunk = {**chunk(model), "choices": [], "usage": STREAM_USAGE}
    return Reply(events=[*text_stream(["a", "b", "c"], model)[:-1], sse(usage_chunk), DONE])


def assert_percentiles(block: dict[str, Any]) -> None:
    p50, p95, p99 = block["p50"], block["p95"], block["p99"]
    assert all(isinstance(p, int | float) and p >= 0 for p in (p50, p95, p99)), block
    assert p50 <= p95 <= p99, block


def no_percentiles(block: dict[str, Any]) -> bool:
    return block == {"p50": None, "p95": None, "p99": None}


def row(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [r for r in rows if r["name"] == name]
    assert len(found) == 1, (name, rows)
    return found[0]


# --- /metrics -------------------------------------------------------------------------------


def test_counters_move_for_chat_stream_and_failed_requests(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))

    assert chat(client, nexus).status_code == 200  # usage 5 + 2
    fake.push(CHAT, stream_with_usage())
    stream(client, nexus)  # usage 11 + 3
    fake.push(CHAT, UPSTREAM_500)
    failed = chat(client, nexus)
    assert failed.status_code == 502, failed.text
    unknown = chat(client, nexus, model="no-such-model")
    assert unknown.status_code == 404, unknown.text
    assert wait_for(lambda: requests_seen(client, nexus) == 4)
    assert wait_for(
        lambda: scrape(client, nexus).value("nexus_backend_in_flight", backend="vllm-1") == 0
    )

    m = scrape(client, nexus)
    # requests by model, backend and status
    labels = {"model": "mock-model", "backend": "vllm-1", "api": "chat"}
    assert m.value("nexus_requests_total", **labels, status="200") == 2
    assert m.total("nexus_requests_total", model="mock-model", status="502") == 1
    pooled = {"model": "other", "backend": "none", "status": "404", "api": "chat"}
    assert m.value("nexus_requests_total", **pooled) == 1
    assert m.total("nexus_requests_total") == 4
    # errors: the failed upstream and the unknown model, which is labelled "other"
    assert m.value("nexus_errors_total", error_type="model_not_found", model="other") == 1
    assert m.total("nexus_errors_total", model="mock-model") == 1
    assert m.total("nexus_errors_total") == 2
    assert "no-such-model" not in m.text
    # durations, time to first token (the stream only), tokens from the upstream usage
    labels = {"model": "mock-model", "backend": "vllm-1"}
    assert m.value("nexus_request_duration_seconds_count", **labels) == 2
    assert (m.value("nexus_request_duration_seconds_sum", **labels) or 0) > 0
    assert m.value("nexus_time_to_first_token_seconds_count", **labels) == 1
    prompt, completion = (CHAT_USAGE[k] + STREAM_USAGE[k] for k in CHAT_USAGE)
    assert m.value("nexus_tokens_total", **labels, type="prompt") == prompt
    assert m.value("nexus_tokens_total", **labels, type="completion") == completion
    assert m.total("nexus_overhead_seconds_count") >= 2
    # the fleet gauges, read at scrape time
    assert m.value("nexus_backends_total") == 1
    assert m.value("nexus_backends_healthy") == 1
    assert m.value("nexus_models_available") == 1
    assert m.value("nexus_queue_depth") == 0
    assert m.value("nexus_backend_in_flight", backend="vllm-1") == 0
    # one observation per planner stage for each request that was planned (the 404 was not)
    for stage in STAGES:
        assert m.value("nexus_reconciler_duration_seconds_count", reconciler=stage) == 3, stage
    assert "# TYPE nexus_reconciler_exclusions_total counter" in m.text


def test_exclusions_and_fleet_gauges_with_a_tier_policy_and_a_dead_backend(
    start_fake, start_nexus, client
):
    low, high = start_fake(FakeOpenAI()), start_fake(FakeOpenAI())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:  # bound, never listening
        held.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{held.getsockname()[1]}"
        backends = [
            {"name": "low", "url": low.url, "type": "vllm", "tier": 1},
            {"name": "high", "url": high.url, "type": "vllm", "tier": 2},
            {"name": "dead", "url": dead_url, "type": "vllm"},
        ]
        policy = {"model_pattern": "mock-model", "min_tier": 2}
        nexus = start_nexus(settings_for(backends=backends, routing={"policies": [policy]}))

        for _ in range(3):
            resp = chat(client, nexus)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-nexus-backend"] == "high"
        assert wait_for(lambda: requests_seen(client, nexus) == 3)

        m = scrape(client, nexus)
    high = {"model": "mock-model", "backend": "high", "status": "200", "api": "chat"}
    assert m.value("nexus_requests_total", **high) == 3
    assert m.value("nexus_reconciler_exclusions_total", reconciler="tier") == 3  # "low", each time
    assert m.value("nexus_reconciler_duration_seconds_count", reconciler="tier") == 3
    assert m.value("nexus_backends_total") == 3
    assert m.value("nexus_backends_healthy") == 2
    assert m.value("nexus_models_available") == 1  # one model, listed by two backends
    for name in ("low", "high", "dead"):
        assert m.value("nexus_backend_in_flight", backend=name) == 0, name


def test_stream_without_usage_counts_no_tokens_but_its_time_to_first_token(
    start_fake, start_nexus, client
):
    fake = start_fake(FakeOpenAI())  # its default stream has no usage chunk
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))

    stream(client, nexus)
    assert wait_for(lambda: requests_seen(client, nexus) == 1)

    m = scrape(client, nexus)
    labels = {"model": "mock-model", "backend": "vllm-1"}
    assert m.value("nexus_requests_total", **labels, status="200", api="chat") == 1
    assert m.value("nexus_time_to_first_token_seconds_count", **labels) == 1
    assert m.value("nexus_request_duration_seconds_count", **labels) == 1
    assert m.total("nexus_tokens_total") == 0


def test_streams_that_break_or_lose_their_client_count_as_errors(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    body = {"model": "mock-model", "messages": HELLO, "stream": True}

    fake.push(CHAT, Reply(events=text_stream(["a", "b", "c"]), drop_after=2))
    broken = client.post(nexus.url + CHAT, json=body, timeout=GUARD)
    assert broken.status_code == 200 and '"code":"bad_gateway"' in broken.text
    fake.push(CHAT, Reply(events=text_stream(["held", "never"]), hang_after=1))
    with client.stream("POST", nexus.url + CHAT, json=body, timeout=GUARD) as held:
        assert held.status_code == 200
        next(held.iter_raw())  # the first event, then the client leaves
    assert wait_for(lambda: requests_seen(client, nexus) == 2)
    assert wait_for(lambda: stats(client, nexus)["in_flight"] == 0)

    m = scrape(client, nexus)
    labels = {"model": "mock-model", "backend": "vllm-1"}
    assert m.value("nexus_errors_total", error_type="stream_broken", model="mock-model") == 1
    assert m.value("nexus_errors_total", error_type="client_gone", model="mock-model") == 1
    assert m.total("nexus_requests_total", **labels) == 2
    assert m.value("nexus_time_to_first_token_seconds_count", **labels) == 2
    assert m.value("nexus_backend_in_flight", backend="vllm-1") == 0
    total = stats(client, nexus)["requests"]
    assert (total["requests"], total["success"], total["errors"]) == (2, 0, 2)
    errors = [(e["stream"], e["error_type"]) for e in history(client, nexus)]
    assert errors == [(True, "stream_broken"), (True, "client_gone")]


def test_a_failed_upstream_is_counted_against_the_backend_that_failed(
    start_fake, start_nexus, client
):
    fake = start_fake(FakeOpenAI())
    fake.push(CHAT, UPSTREAM_500)
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))

    resp = chat(client, nexus)
    assert resp.status_code == 502, resp.text
    assert wait_for(lambda: requests_seen(client, nexus) == 1)

    # An operator must see which backend fails: in the metrics, the stats and the history.
    vllm = row(stats(client, nexus)["backends"], "vllm-1")
    observed = {
        "nexus_requests_total": scrape(client, nexus).series("nexus_requests_total"),
        "/v1/stats vllm-1": (vllm["requests"], vllm["success"], vllm["errors"]),
        "/v1/history backend": [e["backend"] for e in history(client, nexus)],
    }
    assert observed == {
        "nexus_requests_total": {
            (("api", "chat"), ("backend", "vllm-1"), ("model", "mock-model"), ("status", "502"))
        },
        "/v1/stats vllm-1": (1, 0, 1),
        "/v1/history backend": ["vllm-1"],
    }


@pytest.mark.parametrize("failure", ["upstream-500", "unknown-model"])
def test_error_type_is_the_error_code_the_client_got(start_fake, start_nexus, client, failure):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    if failure == "upstream-500":
        fake.push(CHAT, UPSTREAM_500)
        resp, model = chat(client, nexus), "mock-model"
    else:
        resp, model = chat(client, nexus, model="no-such-model"), "other"
    assert resp.status_code in (404, 502), resp.text
    code = resp.json()["error"]["code"]
    assert code in ("bad_gateway", "model_not_found")
    assert wait_for(lambda: requests_seen(client, nexus) == 1)

    observed = {
        "nexus_errors_total": scrape(client, nexus).series("nexus_errors_total"),
        "/v1/history error_type": [e["error_type"] for e in history(client, nexus)],
    }
    assert observed == {
        "nexus_errors_total": {(("error_type", code), ("model", model))},
        "/v1/history error_type": [code],
    }


def test_error_types_are_nexus_codes_never_a_backends_text(start_fake, start_nexus, client):
    """A backend's own error code reaches the client, but never a metric label or the history:
    it is text the backend chose, so its values would be unbounded."""
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    codes = [f"made-up-code-{uuid.uuid4().hex}" for _ in range(3)]
    for code in codes:
        fake.push(CHAT, Reply(status=400, json={"error": {"message": "no", "code": code}}))
    got = [chat(client, nexus).json()["error"]["code"] for _ in codes]
    assert got == codes  # the client still sees what the backend said
    assert wait_for(lambda: requests_seen(client, nexus) == 3)

    observed = {
        "nexus_errors_total": scrape(client, nexus).series("nexus_errors_total"),
        "/v1/history error_type": [e["error_type"] for e in history(client, nexus)],
    }
    assert observed == {
        "nexus_errors_total": {(("error_type", "upstream_error"), ("model", "mock-model"))},
        "/v1/history error_type": ["upstream_error"] * 3,
    }


def test_model_labels_are_bounded(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    assert chat(client, nexus).status_code == 200
    assert wait_for(lambda: requests_seen(client, nexus) == 1)
    before = scrape(client, nexus).series("nexus_requests_total")

    invented = [f"invented-{uuid.uuid4().hex}" for _ in range(50)]
    for model in invented:
        assert chat(client, nexus, model=model).status_code == 404
    assert wait_for(lambda: requests_seen(client, nexus) == 51)

    m = scrape(client, nexus)
    added = m.series("nexus_requests_total") - before
    assert added == {(("api", "chat"), ("backend", "none"), ("model", "other"), ("status", "404"))}
    unknown = {"model": "other", "backend": "none", "status": "404", "api": "chat"}
    assert m.value("nexus_requests_total", **unknown) == 50
    assert {dict(s)["model"] for s in m.series("nexus_errors_total")} == {"other"}
    assert not [model for model in invented if model in m.text]


def test_stats_per_model_rows_are_bounded_too(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))

    invented = [f"invented-{uuid.uuid4().hex}" for _ in range(50)]
    for model in invented:
        assert chat(client, nexus, model=model).status_code == 404
    assert wait_for(lambda: requests_seen(client, nexus) == 50)

    body = stats(client, nexus)
    assert body["requests"]["errors"] == 50
    # a client inventing model names must not grow /v1/stats (nor the memory behind it)
    names = [m["name"] for m in body["models"]]
    assert len(names) <= 2, f"{len(names)} per-model rows, e.g. {names[:3]}"


# --- /v1/stats ------------------------------------------------------------------------------


def test_stats_totals_per_backend_and_per_model(start_fake, start_nexus, client):
    one = start_fake(FakeOpenAI(models=["mock-model"]))
    two = start_fake(FakeOpenAI(models=["other-model"]))
    nexus = start_nexus(settings_for(("vllm-1", one, "vllm"), ("vllm-2", two, "vllm")))

    assert chat(client, nexus).status_code == 200
    one.push(CHAT, stream_with_usage())
    stream(client, nexus)
    assert chat(client, nexus, model="other-model").status_code == 200
    assert chat(client, nexus, model="no-such-model").status_code == 404
    assert wait_for(lambda: requests_seen(client, nexus) == 4)

    body = stats(client, nexus)
    total = body["requests"]
    assert (total["requests"], total["success"], total["errors"]) == (4, 3, 1)
    assert total["tokens"] == {
        "prompt": 2 * CHAT_USAGE["prompt_tokens"] + STREAM_USAGE["prompt_tokens"],
        "completion": 2 * CHAT_USAGE["completion_tokens"] + STREAM_USAGE["completion_tokens"],
    }
    assert_percentiles(total["latency_ms"])
    assert_percentiles(total["ttft_ms"])
    assert body["in_flight"] == 0
    assert body["queue_depth"] == 0
    assert isinstance(body["uptime_seconds"], int) and body["uptime_seconds"] >= 0

    vllm1, vllm2 = row(body["backends"], "vllm-1"), row(body["backends"], "vllm-2")
    assert (vllm1["requests"], vllm1["success"], vllm1["errors"]) == (2, 2, 0)
    assert (vllm2["requests"], vllm2["success"], vllm2["errors"]) == (1, 1, 0)
    assert vllm1["status"] == vllm2["status"] == "healthy"
    assert vllm1["in_flight"] == vllm2["in_flight"] == 0
    assert_percentiles(vllm1["latency_ms"])
    assert_percentiles(vllm1["ttft_ms"])  # it served the stream
    assert_percentiles(vllm2["latency_ms"])
    assert no_percentiles(vllm2["ttft_ms"])  # no stream: no time to first token

    mock, other = row(body["models"], "mock-model"), row(body["models"], "other-model")
    assert (mock["requests"], mock["success"], mock["errors"]) == (2, 2, 0)
    assert (other["requests"], other["success"], other["errors"]) == (1, 1, 0)
    assert mock["tokens"] == {
        "prompt": CHAT_USAGE["prompt_tokens"] + STREAM_USAGE["prompt_tokens"],
        "completion": CHAT_USAGE["completion_tokens"] + STREAM_USAGE["completion_tokens"],
    }
    assert_percentiles(mock["ttft_ms"])
    assert no_percentiles(other["ttft_ms"])


def test_stats_and_gauges_show_in_flight_and_queue_depth(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(
            backends=[{"name": "vllm-1", "url": fake.url, "type": "vllm", "max_concurrent": 1}]
        )
    )
    fake.push(CHAT, Reply(events=text_stream(["held", "never"]), hang_after=1))
    body = {"model": "mock-model", "messages": HELLO, "stream": True}

    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        httpx2.Client(timeout=GUARD) as other,
    ):
        with client.stream("POST", nexus.url + CHAT, json=body, timeout=GUARD) as held:
            assert held.status_code == 200
            waiting = pool.submit(chat, other, nexus)  # no free slot: it waits in the queue
            assert wait_for(lambda: stats(client, nexus)["queue_depth"] == 1), "never queued"

            now = stats(client, nexus)
            assert now["in_flight"] == 1
            assert row(now["backends"], "vllm-1")["in_flight"] == 1
            m = scrape(client, nexus)
            assert m.value("nexus_backend_in_flight", backend="vllm-1") == 1
            assert m.value("nexus_queue_depth") == 1
        # the held stream is closed: its slot goes to the queued request
        assert waiting.result(timeout=15).status_code == 200

    assert wait_for(lambda: stats(client, nexus)["in_flight"] == 0)
    after = stats(client, nexus)
    assert after["queue_depth"] == 0
    m = scrape(client, nexus)
    assert m.value("nexus_backend_in_flight", backend="vllm-1") == 0
    assert m.value("nexus_queue_depth") == 0


# --- /v1/history ----------------------------------------------------------------------------


def test_history_entries_streams_included_and_never_content(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    secret = f"secret-{uuid.uuid4().hex}"
    began = time.time()

    plain = chat(client, nexus, content=f"my password is {secret}", request_id="obs-plain-1")
    assert plain.status_code == 200, plain.text
    fake.push(CHAT, stream_with_usage())
    streamed = stream(client, nexus, content=f"again: {secret}", request_id="obs-stream-2")
    assert plain.headers["x-request-id"] == "obs-plain-1"
    assert streamed.headers["x-request-id"] == "obs-stream-2"
    assert wait_for(lambda: len(history(client, nexus)) == 2)
    ended = time.time()

    resp = client.get(nexus.url + "/v1/history")
    assert resp.status_code == 200
    assert secret not in resp.text
    first, second = resp.json()["data"]  # newest last
    for entry, sent in ((first, plain), (second, streamed)):
        assert entry["request_id"] == sent.headers["x-request-id"]
        assert began <= entry["time"] <= ended
        assert entry["model"] == "mock-model"
        assert entry["backend"] == sent.headers["x-nexus-backend"] == "vllm-1"
        assert entry["route_reason"] == sent.headers["x-nexus-route-reason"]
        assert entry["status"] == 200
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0
        assert entry["error_type"] is None
        assert "messages" not in entry and "content" not in entry
    assert first["stream"] is False and first["ttft_ms"] is None
    assert (first["prompt_tokens"], first["completion_tokens"]) == (5, 2)
    assert second["stream"] is True
    assert isinstance(second["ttft_ms"], float) and second["ttft_ms"] >= 0
    assert (second["prompt_tokens"], second["completion_tokens"]) == (11, 3)
    # nor anywhere else Nexus reports on requests
    assert secret not in client.get(nexus.url + "/v1/stats").text
    assert secret not in client.get(nexus.url + "/metrics").text


def test_history_limit_returns_the_last_entries(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    ids = [f"obs-limit-{i}" for i in range(4)]
    for index, request_id in enumerate(ids):
        if index == 2:
            stream(client, nexus, request_id=request_id)
        else:
            assert chat(client, nexus, request_id=request_id).status_code == 200
    assert wait_for(lambda: len(history(client, nexus)) == 4)

    assert [e["request_id"] for e in history(client, nexus)] == ids
    assert [e["request_id"] for e in history(client, nexus, "?limit=2")] == ids[-2:]
    assert [e["request_id"] for e in history(client, nexus, "?limit=10")] == ids


def test_history_size_comes_from_the_settings(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm"), history={"max_entries": 3}))
    ids = [f"obs-cap-{i}" for i in range(5)]
    for request_id in ids:
        assert chat(client, nexus, request_id=request_id).status_code == 200
    assert wait_for(lambda: requests_seen(client, nexus) == 5)

    assert [e["request_id"] for e in history(client, nexus)] == ids[-3:]
    assert [e["request_id"] for e in history(client, nexus, "?limit=3")] == ids[-3:]
    # Past the ring's size is a client's mistake, not a silent cap (issue 8).
    assert client.get(nexus.url + "/v1/history?limit=4").status_code == 400


@pytest.mark.parametrize("query", ["?limit=abc", "?limit=-1", "?limit=", "?limit=2.5", "?limit=0"])
def test_history_bad_limit_is_a_400_envelope(start_fake, start_nexus, client, query):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))

    resp = client.get(nexus.url + "/v1/history" + query)

    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "limit"
    assert isinstance(error["message"], str) and "limit" in error["message"]


# --- a real Prometheus server ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrometheusServer:
    """``prometheus`` as a subprocess on loopback, scraping one target every second."""

    def __init__(self, binary: str, workdir: Path, target_port: int) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: nexus\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        (workdir / "data").mkdir()
        self.log_path = workdir / "prometheus.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def ready(self, client: httpx2.Client) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.output()}")
        try:
            return client.get(self.url + "/-/ready").status_code == 200
        except httpx2.TransportError:
            return False

    def query(self, client: httpx2.Client, promql: str) -> list[dict[str, Any]]:
        resp = client.get(self.url + "/api/v1/query", params={"query": promql})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        """Ends the process by its PID (SIGTERM, then SIGKILL if it lingers)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the `prometheus` binary is not on PATH (scripts/test installs Debian's "
            "`prometheus` package); the real-Prometheus scrape test cannot run"
        )
    return binary


@pytest.fixture
def start_prometheus(prometheus_binary: str, tmp_path: Path) -> Iterator[Any]:
    servers: list[PrometheusServer] = []

    def start(target_port: int) -> PrometheusServer:
        workdir = tmp_path / f"prometheus-{len(servers)}"
        workdir.mkdir()
        server = PrometheusServer(prometheus_binary, workdir, target_port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_a_real_prometheus_scrapes_nexus(start_fake, start_nexus, start_prometheus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    prometheus = start_prometheus(nexus.port)
    assert wait_for(lambda: prometheus.ready(client), timeout=30), prometheus.output()

    sent = 3
    for _ in range(sent):
        assert chat(client, nexus).status_code == 200
    fake.push(CHAT, stream_with_usage())
    stream(client, nexus)
    sent += 1

    def served() -> float | None:
        for series in prometheus.query(client, "nexus_requests_total"):
            labels = series["metric"]
            if (labels.get("model"), labels.get("backend"), labels.get("status")) == (
                "mock-model",
                "vllm-1",
                "200",
            ):
                return float(series["value"][1])
        return None

    assert wait_for(lambda: served() == sent, timeout=30), (
        f"Prometheus shows {served()} requests, {sent} were sent;\n"
        f"targets: {orjson.dumps(client.get(prometheus.url + '/api/v1/targets').json())!r}\n"
        f"{prometheus.output()}"
    )
    [series] = [
        s
        for s in prometheus.query(client, 'nexus_requests_total{model="mock-model"}')
        if s["metric"]["status"] == "200"
    ]
    assert series["metric"]["job"] == "nexus"
    assert series["metric"]["instance"] == f"127.0.0.1:{nexus.port}"
    tokens = prometheus.query(client, 'sum(nexus_tokens_total{type="completion"})')
    assert float(tokens[0]["value"][1]) == 3 * CHAT_USAGE["completion_tokens"] + 3
    [up] = prometheus.query(client, 'up{job="nexus"}')
    assert up["value"][1] == "1"
