"""Cost where people look for it (issue 10): ``/v1/stats`` (per backend, per model, month to
date, and the ``budget`` object), ``/metrics`` (``nexus_cost_usd_total`` and the budget gauges),
the access log, ``/v1/history``, and each model's price in ``/v1/models`` and ``nexus models``.
A fake OpenAI-compatible server stands for the cloud (type ``openai``), priced by ``[[pricing]]``;
a local one next to it costs nothing."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from nexus.telemetry.logging import JSONFormatter
from tests.fakes import FakeOpenAI
from tests.harness import settings_for, wait_for
from tests.integration.test_cli_live import run_ok
from tests.integration.test_observability import Scrape

CHAT = "/v1/chat/completions"
KEY_VAR = "COST_TEST_OPENAI_KEY"
# FakeOpenAI's answers use 5 prompt and 2 completion tokens: 5 * $1000/Mtok + 2 * $2000/Mtok.
PRICING = [{"model_pattern": "mock-model", "input_per_mtok": 1000, "output_per_mtok": 2000}]
ONE_CALL = 5 * 0.001 + 2 * 0.002  # $0.009


def this_month() -> str:
    """The UTC month now (read when asserting: the suite may run across a month's end)."""
    return time.strftime("%Y-%m", time.gmtime())


def priced_settings(tmp_path: Path | None = None, **sections: Any) -> Any:
    """``cloud`` (type openai, priced) serving mock-model and gpt-4o-mini; ``gpu`` (local)."""
    cloud = sections.pop("cloud")
    gpu = sections.pop("gpu")
    if tmp_path is not None:
        sections["state"] = {"path": str(tmp_path / "state.db")}
    return settings_for(
        backends=[
            {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": KEY_VAR},
            {"name": "gpu", "url": gpu.url, "type": "vllm"},
        ],
        pricing=PRICING,
        **sections,
    )


@pytest.fixture
def fakes(start_fake, monkeypatch) -> dict[str, FakeOpenAI]:
    monkeypatch.setenv(KEY_VAR, "sk-test-cost")
    return {
        "cloud": start_fake(FakeOpenAI(models=["mock-model", "gpt-4o-mini"])),
        "gpu": start_fake(FakeOpenAI(models=["local-model"])),
    }


def chat(client, url: str, model: str, request_id: str) -> None:
    resp = client.post(
        url + CHAT,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Request-Id": request_id},
    )
    assert resp.status_code == 200, resp.text


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def test_stats_metrics_history_and_the_log_show_what_requests_cost(
    fakes, start_nexus, client, caplog
):
    budget = {"monthly_limit_usd": 0.02, "soft_limit_percent": 75}
    nexus = start_nexus(priced_settings(routing={"budget": budget}, **fakes))
    with caplog.at_level(logging.INFO, logger="nexus.access"):
        chat(client, nexus.url, "mock-model", "cost-1")
        chat(client, nexus.url, "mock-model", "cost-2")
        chat(client, nexus.url, "local-model", "free-1")
        assert wait_for(lambda: len(access_records(caplog)) == 3)

    # /v1/stats: month to date overall, per backend, per model; the budget object
    stats = client.get(nexus.url + "/v1/stats").json()
    assert stats["cost_usd"] == pytest.approx(2 * ONE_CALL)
    assert stats["budget"] == {
        "month": this_month(),
        "current_spending_usd": pytest.approx(2 * ONE_CALL),
        "reserved_usd": 0.0,
        "status": "SoftLimit",  # $0.018 of $0.02: past 75 %
        "monthly_limit_usd": 0.02,
        "remaining_usd": pytest.approx(0.02 - 2 * ONE_CALL),
        "utilization_percent": pytest.approx(90.0),
        "soft_limit_percent": 75.0,
        "hard_limit_action": "warn",
    }
    backends = by_name(stats["backends"])
    assert backends["cloud"]["cost_usd"] == pytest.approx(2 * ONE_CALL)
    assert backends["gpu"]["cost_usd"] == 0.0
    models = by_name(stats["models"])
    assert models["mock-model"]["cost_usd"] == pytest.approx(2 * ONE_CALL)
    assert models["local-model"]["cost_usd"] == 0.0

    table = run_ok("stats", "--url", nexus.url).stdout  # `nexus stats` says it too
    assert f"Spend {this_month()}" in table and "$0.0180 of $0.02 (90.0%, SoftLimit)" in table

    # /metrics: the cost counter from each priced request, the budget gauges from the ledger
    scrape = Scrape(client.get(nexus.url + "/metrics").text)
    assert scrape.value("nexus_cost_usd_total", backend="cloud", model="mock-model") == (
        pytest.approx(2 * ONE_CALL)
    )
    assert scrape.value("nexus_cost_usd_total", backend="gpu", model="local-model") is None
    assert scrape.value("nexus_cost_per_request_usd_count", model="mock-model") == 2
    assert scrape.value("nexus_cost_per_request_usd_sum", model="mock-model") == (
        pytest.approx(2 * ONE_CALL)
    )
    month = {"billing_month": this_month()}
    assert scrape.value("nexus_budget_spending_usd", **month) == pytest.approx(2 * ONE_CALL)
    assert scrape.value("nexus_budget_utilization_percent", **month) == pytest.approx(90.0)
    assert scrape.value("nexus_budget_status", **month) == 1  # SoftLimit
    assert scrape.value("nexus_budget_reserved_usd", **month) == 0
    assert scrape.value("nexus_budget_limit_usd") == 0.02
    assert scrape.value("nexus_budget_events_total", event_type="month_rollover") == 0

    # /v1/history has each request's cost; the free one has none
    history = {e["request_id"]: e for e in client.get(nexus.url + "/v1/history").json()["data"]}
    assert history["cost-1"]["cost_usd"] == pytest.approx(ONE_CALL)
    assert history["free-1"]["cost_usd"] is None

    # the access log line: in the text and as a field (what the JSON format writes)
    records = {r.request_id: r for r in access_records(caplog)}  # type: ignore[attr-defined]
    priced, free = records["cost-1"], records["free-1"]
    assert "tokens=5+2 cost=$0.009000 request_id=cost-1" in priced.getMessage()
    assert priced.cost_usd == pytest.approx(ONE_CALL)  # type: ignore[attr-defined]
    assert json.loads(JSONFormatter().format(priced))["cost_usd"] == pytest.approx(ONE_CALL)
    assert "cost=" not in free.getMessage()
    assert "cost_usd" not in json.loads(JSONFormatter().format(free))


def test_without_a_limit_the_budget_is_normal_and_has_no_limit_keys(fakes, start_nexus, client):
    nexus = start_nexus(priced_settings(**fakes))
    chat(client, nexus.url, "mock-model", "one")
    stats = client.get(nexus.url + "/v1/stats").json()
    assert stats["budget"] == {
        "month": this_month(),
        "current_spending_usd": pytest.approx(ONE_CALL),
        "reserved_usd": 0.0,
        "status": "Normal",
    }
    scrape = Scrape(client.get(nexus.url + "/metrics").text)
    month = {"billing_month": this_month()}
    assert scrape.value("nexus_budget_spending_usd", **month) == pytest.approx(ONE_CALL)
    assert scrape.value("nexus_budget_status", **month) == 0
    assert "nexus_budget_limit_usd" not in scrape.text  # no limit, no gauge for it
    assert "nexus_budget_utilization_percent" not in scrape.text


def test_month_to_date_spend_is_in_stats_after_a_restart(fakes, start_nexus, client, tmp_path):
    first = start_nexus(priced_settings(tmp_path, **fakes))
    chat(client, first.url, "mock-model", "before-restart")
    first.stop()

    again = start_nexus(priced_settings(tmp_path, **fakes))
    stats = client.get(again.url + "/v1/stats").json()
    assert stats["cost_usd"] == pytest.approx(ONE_CALL)
    assert by_name(stats["backends"])["cloud"]["cost_usd"] == pytest.approx(ONE_CALL)
    # no request since the start, but this month's spend: the model still has its row
    row = by_name(stats["models"])["mock-model"]
    assert (row["requests"], row["cost_usd"]) == (0, pytest.approx(ONE_CALL))


def test_models_show_their_price_when_known(fakes, start_nexus, client):
    nexus = start_nexus(priced_settings(**fakes))
    rows = {m["id"]: m for m in client.get(nexus.url + "/v1/models").json()["data"]}
    assert rows["mock-model"]["pricing"] == {
        "input_per_mtok": 1000.0,
        "output_per_mtok": 2000.0,
        "cached_input_per_mtok": 1000.0,
        "source": "config (mock-model)",
    }
    # a cloud model priced by the bundled genai-prices snapshot
    snapshot = rows["gpt-4o-mini"]["pricing"]
    assert snapshot["source"].startswith("genai-prices (")
    assert 0 < snapshot["input_per_mtok"] < snapshot["output_per_mtok"]
    assert "pricing" not in rows["local-model"]  # a local backend, not priced: free

    # `nexus models`: the server's JSON as it is, and a price column in the table
    listed = json.loads(run_ok("models", "--json", "--url", nexus.url).stdout)
    by_id = {m["id"]: m for m in listed["data"]}
    assert by_id["mock-model"]["pricing"]["input_per_mtok"] == 1000.0
    assert "pricing" not in by_id["local-model"]
    table = run_ok("models", "--url", nexus.url).stdout
    assert "$/Mtok in / out" in table
    line = next(line for line in table.splitlines() if "mock-model" in line)
    assert "1,000.00 / 2,000.00" in line
    local = next(line for line in table.splitlines() if "local-model" in line)
    assert local.rstrip(" │|").endswith("-")


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nexus.access"]
