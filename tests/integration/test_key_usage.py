"""Usage per client key (issue 12, point 4) where it is shown: ``/v1/stats`` (the month per key,
restarts included), ``/metrics`` (``nexus_key_*`` series, labelled only with names the key set
holds), ``/v1/history`` (each entry's key), the dashboard's feed, and ``GET /v1/models`` listing
only what a key may use. Keys are made through ``POST /admin/keys`` with ``[auth]`` on; traffic
goes to a fake priced upstream that reports usage (5 prompt and 2 completion tokens a call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from nexus.cost.ledger import month_of, next_month_start
from nexus.telemetry.outcomes import Outcome
from tests.fakes import FakeOpenAI
from tests.harness import NexusServer, settings_for, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
KEY_VAR = "KEY_USAGE_TEST_OPENAI_KEY"
# 5 prompt and 2 completion tokens at these prices: 0.005 + 0.004 = $0.009 a call
PRICING = [{"model_pattern": "*", "input_per_mtok": 1000, "output_per_mtok": 2000}]
COST = 0.009


def keyed_settings(cloud: FakeOpenAI, **sections: Any) -> Any:
    backend = {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": KEY_VAR}
    return settings_for(backends=[backend], pricing=PRICING, auth={"enabled": True}, **sections)


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch, start_fake: Any) -> FakeOpenAI:
    monkeypatch.setenv(KEY_VAR, "sk-upstream")
    fake: FakeOpenAI = start_fake(FakeOpenAI(["m", "mini", "big"]))
    return fake


def create(client: Any, nexus: NexusServer, **settings: Any) -> str:
    resp = client.post(nexus.url + "/admin/keys", json=settings)
    assert resp.status_code == 201, resp.text
    secret: str = resp.json()["key"]
    return secret


def chat(client: Any, nexus: NexusServer, secret: str, request_id: str, model: str = "m") -> int:
    headers = {"Authorization": f"Bearer {secret}", "X-Request-Id": request_id}
    body = {"model": model, "messages": HI, "max_tokens": 10}  # a small worst case to reserve
    resp = client.post(nexus.url + CHAT, json=body, headers=headers)
    return int(resp.status_code)


def key_rows(client: Any, nexus: NexusServer) -> dict[str, dict[str, Any]]:
    rows = client.get(nexus.url + "/v1/stats").json()["keys"]
    return {row["name"]: row for row in rows}


def this_month(client: Any, nexus: NexusServer) -> str:
    month: str = client.get(nexus.url + "/v1/stats").json()["budget"]["month"]
    return month


class Scrape:
    """One ``GET /metrics``, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        return found[0] if found else None

    def key_labels(self) -> set[str]:
        return {s.labels["key"] for s in self.samples if "key" in s.labels}


def traffic(client: Any, nexus: NexusServer) -> tuple[str, str]:
    """alice: two answered calls; bob: one answered, one refused (a model his key may not use)."""
    alice = create(client, nexus, name="alice", owner="alice@lab", rpm=100, monthly_budget_usd=1)
    bob = create(client, nexus, name="bob", models=["m"], max_concurrent=4)
    assert chat(client, nexus, alice, "a-1") == 200
    assert chat(client, nexus, alice, "a-2") == 200
    assert chat(client, nexus, bob, "b-1") == 200
    assert chat(client, nexus, bob, "b-2", model="big") == 403
    return alice, bob


def test_stats_metrics_and_history_show_each_keys_usage(cloud, start_nexus, client):
    nexus = start_nexus(keyed_settings(cloud))
    alice, bob = traffic(client, nexus)
    # the cost of a call is settled as it ends; wait for the last one rather than race it
    assert wait_for(lambda: key_rows(client, nexus)["bob"]["requests"] == 2)

    rows = key_rows(client, nexus)
    assert set(rows) == {"alice", "bob"}
    a, b = rows["alice"], rows["bob"]
    assert (a["requests"], a["prompt_tokens"], a["completion_tokens"], a["total_tokens"]) == (
        2,
        10,
        4,
        14,
    )
    assert a["cost_usd"] == pytest.approx(2 * COST)
    assert (b["requests"], b["prompt_tokens"], b["completion_tokens"]) == (2, 5, 2)
    assert b["cost_usd"] == pytest.approx(COST)  # the refused call cost nothing
    assert a["prefix"] == alice[:8] and b["prefix"] == bob[:8]
    assert (a["source"], a["status"], a["in_flight"]) == ("api", "active", 0)
    assert "owner" not in a  # /v1/stats is open to whoever reaches the port: no owners there
    assert a["limits"] == {"rpm": 100, "tpm": None, "max_concurrent": None, "monthly_budget_usd": 1}
    assert b["limits"]["max_concurrent"] == 4

    scrape = Scrape(client.get(nexus.url + "/metrics").text)
    assert scrape.value("nexus_key_requests_total", key="alice", status="200") == 2
    assert scrape.value("nexus_key_requests_total", key="bob", status="200") == 1
    assert scrape.value("nexus_key_requests_total", key="bob", status="403") == 1
    assert scrape.value("nexus_key_tokens_total", key="alice", type="prompt") == 10
    assert scrape.value("nexus_key_tokens_total", key="alice", type="completion") == 4
    assert scrape.value("nexus_key_tokens_total", key="bob", type="prompt") == 5
    assert scrape.value("nexus_key_cost_usd_total", key="alice") == pytest.approx(2 * COST)
    assert scrape.value("nexus_key_cost_usd_total", key="bob") == pytest.approx(COST)
    month = this_month(client, nexus)
    spent = scrape.value("nexus_key_spending_usd", key="alice", billing_month=month)
    assert spent == pytest.approx(2 * COST)
    assert scrape.value("nexus_key_budget_limit_usd", key="alice") == 1
    assert scrape.value("nexus_key_budget_limit_usd", key="bob") is None  # bob has no budget
    assert scrape.value("nexus_key_in_flight", key="bob") == 0
    assert scrape.key_labels() == {"alice", "bob"}
    # the per-model series did not grow a key label
    assert all("key" not in s.labels for s in scrape.samples if s.name == "nexus_requests_total")

    history = client.get(nexus.url + "/v1/history").json()["data"]
    assert [(e["request_id"], e["key"]) for e in history] == [
        ("a-1", "alice"),
        ("a-2", "alice"),
        ("b-1", "bob"),
        ("b-2", "bob"),
    ]
    assert history[-1]["status"] == 403

    # names and prefixes only: no secret anywhere these are shown
    for path in ("/v1/stats", "/metrics", "/v1/history", "/admin/keys"):
        text = client.get(nexus.url + path).text
        assert alice not in text and bob not in text, path


def test_a_revoked_key_keeps_its_row_and_a_new_key_starts_at_zero(cloud, start_nexus, client):
    nexus = start_nexus(keyed_settings(cloud))
    traffic(client, nexus)
    assert client.delete(nexus.url + "/admin/keys/bob").status_code == 200
    create(client, nexus, name="carol")
    rows = key_rows(client, nexus)
    assert rows["bob"]["status"] == "revoked" and rows["bob"]["requests"] == 2
    assert rows["carol"]["status"] == "active"
    assert (rows["carol"]["requests"], rows["carol"]["cost_usd"]) == (0, 0)
    scrape = Scrape(client.get(nexus.url + "/metrics").text)
    assert (
        scrape.value("nexus_key_spending_usd", key="carol", billing_month=this_month(client, nexus))
        == 0
    )
    assert scrape.value("nexus_key_requests_total", key="carol", status="200") is None


def test_the_month_per_key_survives_a_restart(cloud, start_nexus, client, tmp_path: Path):
    state = {"path": str(tmp_path / "state.db"), "flush_interval_seconds": 0.05}
    first = start_nexus(keyed_settings(cloud, state=state))
    alice, _ = traffic(client, first)
    assert wait_for(lambda: key_rows(client, first)["bob"]["requests"] == 2)
    before = key_rows(client, first)
    first.stop()  # the key set writes what it has not yet written on the way out

    again = start_nexus(keyed_settings(cloud, state=state))
    after = key_rows(client, again)
    for name in ("alice", "bob"):
        keep = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
        assert {k: after[name][k] for k in keep} == {k: before[name][k] for k in keep}
        assert after[name]["cost_usd"] == pytest.approx(before[name]["cost_usd"])
    scrape = Scrape(client.get(again.url + "/metrics").text)
    month = this_month(client, again)
    # the month's spend is a gauge read from the key set: restarts included
    spent = scrape.value("nexus_key_spending_usd", key="alice", billing_month=month)
    assert spent == pytest.approx(2 * COST)
    # the counters count since this start, as Prometheus counters do
    assert scrape.value("nexus_key_requests_total", key="alice", status="200") is None
    assert chat(client, again, alice, "a-3") == 200
    assert wait_for(lambda: key_rows(client, again)["alice"]["requests"] == 3)
    scrape = Scrape(client.get(again.url + "/metrics").text)
    assert scrape.value("nexus_key_requests_total", key="alice", status="200") == 1


def test_a_new_month_shows_each_key_from_zero_before_its_first_request(cloud, start_nexus, client):
    nexus = start_nexus(keyed_settings(cloud))
    alice, _ = traffic(client, nexus)
    assert wait_for(lambda: key_rows(client, nexus)["bob"]["requests"] == 2)
    ring = nexus.gateway.keys
    assert ring is not None
    real = ring.clock
    ring.clock = lambda: next_month_start(real()) + 60  # a minute into next month (UTC)
    next_month = month_of(ring.clock())

    rows = key_rows(client, nexus)  # no request yet this month: nothing used
    assert [(r["requests"], r["total_tokens"], r["cost_usd"]) for r in rows.values()] == [
        (0, 0, 0),
        (0, 0, 0),
    ]
    scrape = Scrape(client.get(nexus.url + "/metrics").text)
    assert scrape.value("nexus_key_spending_usd", key="alice", billing_month=next_month) == 0
    assert chat(client, nexus, alice, "a-next") == 200
    assert wait_for(lambda: key_rows(client, nexus)["alice"]["requests"] == 1)
    assert key_rows(client, nexus)["alice"]["total_tokens"] == 7


def test_a_key_name_the_key_set_does_not_hold_makes_no_label(
    cloud, loop_thread, start_nexus, client
):
    nexus = start_nexus(keyed_settings(cloud))
    traffic(client, nexus)
    gateway = nexus.gateway

    async def record(name: str) -> None:
        outcome = Outcome(
            time=0.0, request_id=f"made-up-{name}", kind="chat", model="m", backend="cloud",
            status=200, duration_ms=1.0, ttft_ms=None, upstream_ms=0.5, prompt_tokens=7,
            completion_tokens=1, route_reason=None, attempts=1, stream=False,
            fallback_model=None, error_type=None, stage_ns={}, exclusions={}, cost_usd=0.5,
            key=name,
        )  # fmt: skip
        gateway.telemetry.record(outcome)
        gateway.telemetry.drain()

    for name in ("never-made", "nx-looks-like-a-secret", "x" * 300):
        loop_thread.run(record(name))
    scrape = Scrape(client.get(nexus.url + "/metrics").text)
    assert scrape.key_labels() == {"alice", "bob", "other"}
    assert scrape.value("nexus_key_requests_total", key="other", status="200") == 3
    assert scrape.value("nexus_key_tokens_total", key="other", type="prompt") == 21
    assert scrape.value("nexus_key_cost_usd_total", key="other") == pytest.approx(1.5)
    assert "never-made" not in scrape.text and "looks-like" not in scrape.text
    # /v1/stats lists the key set's keys, never a name an outcome brought along
    assert set(key_rows(client, nexus)) == {"alice", "bob"}


def test_the_dashboard_feed_carries_each_keys_usage(cloud, start_nexus, client):
    nexus = start_nexus(keyed_settings(cloud))
    alice = create(client, nexus, name="alice", monthly_budget_usd=1)
    assert chat(client, nexus, alice, "before") == 200
    ws_url = nexus.url.replace("http://", "ws://") + "/ws"
    with connect(ws_url, max_size=None, open_timeout=10) as ws:
        snapshot = orjson.loads(ws.recv(timeout=15))
        assert snapshot["type"] == "snapshot"
        (row,) = snapshot["data"]["stats"]["keys"]
        assert (row["name"], row["requests"], row["total_tokens"]) == ("alice", 1, 7)
        assert [e["key"] for e in snapshot["data"]["history"]] == ["alice"]

        assert chat(client, nexus, alice, "after") == 200
        while True:  # the request, then a stats message that counts it
            message = orjson.loads(ws.recv(timeout=15))
            if message["type"] == "request":
                assert (message["data"]["request_id"], message["data"]["key"]) == ("after", "alice")
            if message["type"] == "stats" and message["data"]["keys"][0]["requests"] == 2:
                break
        (row,) = message["data"]["keys"]
        assert row["cost_usd"] == pytest.approx(2 * COST)
        assert alice not in orjson.dumps(message).decode()


def test_models_lists_only_what_the_key_may_use(cloud, start_fake, start_nexus, client):
    local = start_fake(FakeOpenAI(["m", "on-the-gpu"]))  # a restricted-zone (local) backend
    nexus = start_nexus(
        settings_for(
            backends=[
                {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": KEY_VAR},
                {"name": "gpu", "url": local.url, "type": "vllm"},
            ],
            pricing=PRICING,
            auth={"enabled": True},
            routing={"aliases": {"fast": "mini", "large": "big"}},
        )
    )
    small = create(client, nexus, name="small", models=["m", "mini"])
    everything = create(client, nexus, name="everything")
    inside = create(client, nexus, name="inside", max_zone="restricted")

    def listed(secret: str) -> list[str]:
        resp = client.get(nexus.url + "/v1/models", headers={"x-api-key": secret})
        assert resp.status_code == 200, resp.text
        return [row["id"] for row in resp.json()["data"]]

    assert listed(small) == ["m", "mini"]
    assert listed(everything) == ["big", "m", "mini", "on-the-gpu"]
    # a restricted key sees what restricted-zone backends serve, and only there
    resp = client.get(nexus.url + "/v1/models", headers={"x-api-key": inside})
    assert {row["id"]: row["backends"] for row in resp.json()["data"]} == {
        "m": ["gpu"],
        "on-the-gpu": ["gpu"],
    }
    assert chat(client, nexus, inside, "inside-gpu", model="on-the-gpu") == 200
    assert chat(client, nexus, inside, "inside-big", model="big") != 200
    # what is listed is what the key may use, aliases resolved as the router resolves them
    for model in ("m", "mini", "fast"):
        assert chat(client, nexus, small, f"ok-{model}", model=model) == 200
    for model in ("big", "large"):
        assert chat(client, nexus, small, f"no-{model}", model=model) == 403
    assert client.get(nexus.url + "/v1/models").status_code == 401


def test_models_without_auth_are_unchanged(cloud, start_nexus, client):
    backend = {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": KEY_VAR}
    nexus = start_nexus(settings_for(backends=[backend], pricing=PRICING))
    create(client, nexus, name="small", models=["m"])  # keys may be made with [auth] off
    resp = client.get(nexus.url + "/v1/models", headers={"Authorization": "Bearer whatever"})
    assert [row["id"] for row in resp.json()["data"]] == ["big", "m", "mini"]
