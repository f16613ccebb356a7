"""Cost and the monthly budget through the running app (issue 10, points 2 to 4 and 6): a priced
OpenAI-type cloud fake (a ``[[pricing]]`` entry gives it a known price) next to a free local fake
serving the same model. The month's spend so far is seeded in the state database before Nexus
starts, as a restart would find it; what reached each fake is read from the fake's own records.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from nexus.config import settings_from_dict
from nexus.cost.ledger import month_of
from nexus.registry import Status
from nexus.routing.requirements import chat_requirements
from nexus.state.sqlite import SQLiteStore
from nexus.state.store import Spend
from tests.fakes import DONE, FakeOpenAI, Reply, chunk, completion, sse
from tests.harness import NexusServer, data_events, wait_for

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
SHARED = "shared-model"  # served by the cloud and the local backend
CLOUD_ONLY = "cloud-only"
LOCAL_ONLY = "local-only"
KEY_VAR = "NEXUS_TEST_BUDGET_OPENAI"
IN_USD, OUT_USD, CACHED_USD = 0.01, 0.02, 0.001  # per token
PRICE = {
    "model_pattern": "*",
    "backend": "cloud",
    "input_per_mtok": IN_USD * 1e6,
    "output_per_mtok": OUT_USD * 1e6,
    "cached_input_per_mtok": CACHED_USD * 1e6,
}
LIMIT = 10.0
HELLO = [{"role": "user", "content": "hi"}]


class PricedOpenAI(FakeOpenAI):
    """An OpenAI-compatible fake that bills ``usage`` on every answer (streams too, in the usage
    chunk when asked for one), optionally after ``delay`` seconds, counting what it answered."""

    def __init__(self, models: list[str], usage: dict[str, Any] | None = None) -> None:
        super().__init__(models)
        default = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        self.usage = default if usage is None else usage
        self.delay = 0.0
        self.answered = 0

    def generations(self) -> int:
        return len(self.calls(CHAT)) + len(self.calls(EMBEDDINGS))

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if path != CHAT:
            return super().default(method, path, raw)
        body = orjson.loads(raw)
        model = body.get("model", "m")
        self.answered += 1
        if not body.get("stream"):
            return Reply(json=completion(model, usage=self.usage), delay=self.delay)
        final = chunk(model)
        final["choices"][0]["finish_reason"] = "stop"
        events = [sse(chunk(model, role="assistant", content="Hi")), sse(final)]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(sse({**chunk(model), "choices": [], "usage": self.usage}))
        return Reply(events=[*events, DONE], delay=self.delay)


class Fleet:
    def __init__(self, nexus: NexusServer, cloud: PricedOpenAI, local: FakeOpenAI | None):
        self.nexus, self.cloud, self.local = nexus, cloud, local

    def post(
        self, http: httpx2.Client, model: str, path: str = CHAT, **fields: Any
    ) -> httpx2.Response:
        return http.post(self.nexus.url + path, content=body_of(model, path, **fields),
                         headers={"content-type": "application/json"})  # fmt: skip

    def budget(self, http: httpx2.Client) -> dict[str, Any]:
        view: dict[str, Any] = http.get(self.nexus.url + "/v1/stats").json()["budget"]
        return view

    def spent(self) -> float:
        meter = self.nexus.gateway.meter
        assert meter is not None
        return meter.ledger.spent


def body_of(model: str, path: str = CHAT, **fields: Any) -> bytes:
    if path == EMBEDDINGS:
        return orjson.dumps({"model": model, **fields})
    return orjson.dumps({"model": model, "messages": HELLO, **fields})


def worst_case(raw: bytes, max_tokens: int) -> float:
    """What the gateway reserves for a chat request: its prompt bound in, ``max_tokens`` out."""
    prompt = chat_requirements(orjson.loads(raw), {}, len(raw)).prompt_bound
    return prompt * IN_USD + max_tokens * OUT_USD


def seed(path: Path, usd: float) -> None:
    """The month's spend so far, as a previous run of Nexus left it."""
    store = SQLiteStore(path)
    try:
        store.add([Spend(month_of(time.time()), "cloud", SHARED, usd, 1, 0, 0)])
    finally:
        store.close()


Start = Callable[..., Fleet]


@pytest.fixture
def fleet(start_fake, start_nexus, monkeypatch, tmp_path) -> Start:
    monkeypatch.setenv(KEY_VAR, "sk-budget-test")

    def start(
        *,
        budget: dict[str, Any] | None = None,
        spent: float = 0.0,
        local: bool = True,
        pricing: list[dict[str, Any]] | None = None,
        extra_backends: list[dict[str, Any]] | None = None,
        usage: dict[str, Any] | None = None,
        **routing: Any,
    ) -> Fleet:
        cloud = start_fake(PricedOpenAI([SHARED, CLOUD_ONLY, "embed-model"], usage))
        backends: list[dict[str, Any]] = [
            # The cloud has the better priority: only money keeps a request away from it.
            {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": KEY_VAR,
             "priority": 1, "max_concurrent": 1000},
        ]  # fmt: skip
        local_fake = None
        if local:
            local_fake = start_fake(FakeOpenAI([SHARED, LOCAL_ONLY]))
            backends.append({"name": "local", "url": local_fake.url, "type": "vllm",
                             "priority": 90, "max_concurrent": 1000})  # fmt: skip
        backends += extra_backends or []
        state = tmp_path / "state.db"
        if spent:
            seed(state, spent)
        settings = settings_from_dict(
            {
                "discovery": {"enabled": False},
                "health_check": {"interval_seconds": 3600},
                "embedded": {"enabled": False},
                "state": {"path": str(state)},
                "pricing": [*(pricing or []), PRICE],
                "routing": {"strategy": "priority_only", "budget": budget or {}, **routing},
                "backends": backends,
            }
        )
        nexus = start_nexus(settings)
        registry = nexus.gateway.registry
        assert wait_for(lambda: all(b.status is Status.HEALTHY for b in registry)), [
            b.last_error for b in registry
        ]
        return Fleet(nexus, cloud, local_fake)

    return start


def served(resp: httpx2.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.headers["x-nexus-backend"]


def budget_headers(resp: httpx2.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.startswith("x-nexus-budget-")}


def excluded(resp: httpx2.Response, stage: str = "budget") -> list[dict[str, Any]]:
    """The actionable 503: every exclusion of ``stage``, with its reason and action."""
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["type"] == "service_unavailable"
    context = resp.json()["context"]
    found = [e for e in context["excluded"] if e["stage"] == stage]
    assert found, context
    for entry in found:
        assert entry["reason"] and entry["suggested_action"]
    assert stage in resp.headers["x-nexus-rejection-reasons"]
    assert json.loads(resp.headers["x-nexus-rejection-details"]) == context["excluded"]
    return found


# --- cost of a request -------------------------------------------------------------------------


def test_a_non_streaming_answer_carries_its_real_cost(fleet, client):
    usage = {
        "prompt_tokens": 123,
        "completion_tokens": 45,
        "total_tokens": 168,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    f = fleet(usage=usage)
    resp = f.post(client, CLOUD_ONLY, max_tokens=50)
    assert served(resp) == "cloud"
    cost = 23 * IN_USD + 100 * CACHED_USD + 45 * OUT_USD  # fresh, cached and output tokens
    assert resp.headers["x-nexus-cost-estimated"] == f"{cost:.6f}"
    assert resp.json()["usage"] == usage  # the client's body is untouched
    assert "x-nexus-budget-status" not in resp.headers  # no budget: never a status
    assert wait_for(lambda: f.budget(client)["current_spending_usd"] == pytest.approx(cost))


def test_a_stream_carries_its_worst_case_and_settles_its_real_cost(fleet, client):
    f = fleet(budget={"monthly_limit_usd": LIMIT})
    raw = body_of(CLOUD_ONLY, stream=True, max_tokens=16)
    resp = client.post(
        f.nexus.url + CHAT, content=raw, headers={"content-type": "application/json"}
    )
    assert served(resp) == "cloud"
    assert data_events(resp.text)[-1] == "[DONE]"
    assert resp.headers["x-nexus-cost-estimated"] == f"{worst_case(raw, 16):.6f}"
    real = 5 * IN_USD + 2 * OUT_USD  # the usage chunk Nexus asked the backend for
    assert wait_for(lambda: f.spent() == pytest.approx(real))
    assert wait_for(lambda: f.budget(client)["reserved_usd"] == 0.0)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "5", "completion_tokens": "2"},
        {"prompt_tokens": -5, "completion_tokens": -2},
        {"prompt_tokens": True, "completion_tokens": 2},
        {"prompt_tokens": 5, "completion_tokens": 2.5},
        {},
    ],
    ids=["strings", "negatives", "bool", "float", "empty"],
)
def test_a_usage_that_cannot_be_read_is_charged_the_worst_case(fleet, client, usage):
    """A priced backend whose usage is garbage is not free: the call costs its worst case."""
    f = fleet(usage=usage)
    raw = body_of(CLOUD_ONLY, max_tokens=16)
    resp = client.post(
        f.nexus.url + CHAT, content=raw, headers={"content-type": "application/json"}
    )
    assert served(resp) == "cloud"
    assert resp.headers["x-nexus-cost-estimated"] == f"{worst_case(raw, 16):.6f}"
    assert wait_for(lambda: f.spent() == pytest.approx(worst_case(raw, 16)))


def test_embeddings_are_priced_by_their_prompt_tokens(fleet, client):
    f = fleet()
    resp = f.post(client, "embed-model", EMBEDDINGS, input=["one", "two", "three"])
    assert served(resp) == "cloud"
    tokens = resp.json()["usage"]["prompt_tokens"]
    assert tokens == 9
    assert resp.headers["x-nexus-cost-estimated"] == f"{tokens * IN_USD:.6f}"
    assert wait_for(lambda: f.spent() == pytest.approx(tokens * IN_USD))


def test_a_local_backend_is_free_unless_priced(fleet, client, start_fake):
    gpu = start_fake(FakeOpenAI(["gpu-model"]))
    power = {"model_pattern": "*", "backend": "gpu-*", "input_per_mtok": 100.0,
             "output_per_mtok": 400.0}  # fmt: skip
    f = fleet(
        pricing=[power],
        extra_backends=[{"name": "gpu-box", "url": gpu.url, "type": "vllm", "priority": 95}],
    )
    resp = f.post(client, "gpu-model")
    assert served(resp) == "gpu-box"
    cost = (5 * 100.0 + 2 * 400.0) / 1e6  # the fake's usage at the configured power price
    assert resp.headers["x-nexus-cost-estimated"] == f"{cost:.6f}"
    resp = f.post(client, LOCAL_ONLY)
    assert served(resp) == "local"
    assert "x-nexus-cost-estimated" not in resp.headers  # no price known: no cost claimed
    assert wait_for(lambda: f.spent() == pytest.approx(cost))


def test_the_model_list_shows_a_price_where_one_is_known(fleet, client):
    f = fleet()
    rows = {row["id"]: row for row in client.get(f.nexus.url + "/v1/models").json()["data"]}
    assert rows[CLOUD_ONLY]["pricing"] == {
        "input_per_mtok": IN_USD * 1e6,
        "output_per_mtok": OUT_USD * 1e6,
        "cached_input_per_mtok": CACHED_USD * 1e6,
        "source": "config (*)",
    }
    assert rows[LOCAL_ONLY].get("pricing") is None


def test_no_budget_headers_while_the_spend_is_normal(fleet, client):
    f = fleet(budget={"monthly_limit_usd": LIMIT}, spent=1.0)
    resp = f.post(client, SHARED, max_tokens=16)
    assert served(resp) == "cloud"
    assert budget_headers(resp) == {}
    assert f.budget(client)["status"] == "Normal"


# --- the soft limit ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["priority_only", "smart", "round_robin", "random",
                                      "least_loaded"])  # fmt: skip
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_past_the_soft_limit_local_backends_go_first(fleet, client, stream, strategy):
    f = fleet(
        budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "block_cloud"},
        spent=8.0,
        strategy=strategy,
    )
    resp = f.post(client, SHARED, max_tokens=16, stream=stream)
    assert served(resp) == "local"
    # The reason names the budget when it changed the choice (random may have picked local).
    reasons = {"budget-soft-limit:prefer-local"} | ({"random"} if strategy == "random" else set())
    assert resp.headers["x-nexus-route-reason"] in reasons
    for _ in range(3):  # whatever the strategy's turn
        assert served(f.post(client, SHARED, max_tokens=16, stream=stream)) == "local"
    assert budget_headers(resp) == {
        "x-nexus-budget-status": "SoftLimit",
        "x-nexus-budget-utilization": "80.00",
        "x-nexus-budget-remaining": "2.00",
    }
    assert f.cloud.generations() == 0
    # The cloud still serves what only it has: the soft limit is a preference, not a block.
    resp = f.post(client, CLOUD_ONLY, max_tokens=16)
    assert served(resp) == "cloud"
    assert resp.headers["x-nexus-budget-status"] == "SoftLimit"
    view = f.budget(client)
    assert view["status"] == "SoftLimit"
    assert view["soft_limit_percent"] == 75.0


def test_crossing_the_soft_limit_moves_a_conversation_off_the_cloud(fleet, client):
    """Affinity keeps a conversation on the backend that has its prompt cached, but not on the
    cloud once the soft limit is passed and a local backend can serve it."""
    usage = {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35}  # $0.65
    f = fleet(budget={"monthly_limit_usd": LIMIT}, spent=7.0, usage=usage)
    first = f.post(client, SHARED, max_tokens=32)
    assert served(first) == "cloud"
    assert budget_headers(first)["x-nexus-budget-status"] == "SoftLimit"  # 76.5% after it
    again = f.post(client, SHARED, max_tokens=32)
    assert served(again) == "local"
    assert again.headers["x-nexus-route-reason"] == "budget-soft-limit:prefer-local"


# --- the hard limit ----------------------------------------------------------------------------


def test_block_cloud_at_the_hard_limit_keeps_the_cloud_out(fleet, client):
    f = fleet(budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "block_cloud"}, spent=LIMIT)
    resp = f.post(client, SHARED, max_tokens=16)
    assert served(resp) == "local"
    assert budget_headers(resp) == {
        "x-nexus-budget-status": "HardLimit",
        "x-nexus-budget-utilization": "100.00",
        "x-nexus-budget-remaining": "0.00",
    }
    # A model only the cloud serves: the actionable 503, naming the budget.
    resp = f.post(client, CLOUD_ONLY, max_tokens=16)
    [entry] = excluded(resp)
    assert entry["backend"] == "cloud"
    assert "hard limit" in entry["reason"] and "block" not in entry["suggested_action"]
    assert "monthly_limit_usd" in entry["suggested_action"]
    assert f.cloud.generations() == 0
    view = f.budget(client)
    assert (view["status"], view["hard_limit_action"]) == ("HardLimit", "block_cloud")
    assert view["current_spending_usd"] == LIMIT


@pytest.mark.parametrize("action", ["block_cloud", "block_all"])
def test_a_refusal_by_the_budget_says_the_budgets_status(fleet, client, action):
    """The 503 the budget causes carries the budget headers too: the answer a client most
    needs them on."""
    f = fleet(budget={"monthly_limit_usd": LIMIT, "hard_limit_action": action}, spent=LIMIT)
    resp = f.post(client, CLOUD_ONLY, max_tokens=16)
    assert excluded(resp)
    assert budget_headers(resp) == {
        "x-nexus-budget-status": "HardLimit",
        "x-nexus-budget-utilization": "100.00",
        "x-nexus-budget-remaining": "0.00",
    }


def test_block_all_refuses_everything_priced_and_serves_what_is_free(fleet, client, start_fake):
    gpu = start_fake(FakeOpenAI([SHARED]))
    priced_local = {"name": "gpu-box", "url": gpu.url, "type": "vllm", "priority": 2}
    power = {"model_pattern": "*", "backend": "gpu-*", "input_per_mtok": 1.0,
             "output_per_mtok": 1.0}  # fmt: skip
    f = fleet(
        budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "block_all"},
        spent=LIMIT,
        pricing=[power],
        extra_backends=[priced_local],
    )
    for stream in (False, True):
        resp = f.post(client, SHARED, max_tokens=16, stream=stream)
        assert served(resp) == "local"  # the free one, although the last by priority
        assert resp.headers["x-nexus-budget-status"] == "HardLimit"
    assert f.cloud.generations() == 0
    assert not gpu.calls(CHAT)
    resp = f.post(client, CLOUD_ONLY, max_tokens=16)
    assert {e["backend"] for e in excluded(resp)} == {"cloud"}


def test_block_all_without_anything_free_is_the_actionable_503(fleet, client):
    f = fleet(
        budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "block_all"},
        spent=LIMIT,
        local=False,
    )
    resp = f.post(client, SHARED, max_tokens=16)
    assert {e["backend"] for e in excluded(resp)} == {"cloud"}
    assert f.cloud.generations() == 0


def test_warn_serves_past_the_limit_and_says_so(fleet, client):
    f = fleet(budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "warn"}, spent=LIMIT + 1)
    resp = f.post(client, CLOUD_ONLY, max_tokens=16)
    assert served(resp) == "cloud"
    cost = 5 * IN_USD + 2 * OUT_USD
    assert resp.headers["x-nexus-cost-estimated"] == f"{cost:.6f}"
    # The headers count the answer they come with.
    assert budget_headers(resp) == {
        "x-nexus-budget-status": "HardLimit",
        "x-nexus-budget-utilization": f"{(LIMIT + 1 + cost) / LIMIT * 100:.2f}",
        "x-nexus-budget-remaining": "0.00",
    }
    # What is also served locally is still served locally first.
    resp = f.post(client, SHARED, max_tokens=16)
    assert served(resp) == "local"
    assert resp.headers["x-nexus-budget-status"] == "HardLimit"


def test_a_worst_case_the_budget_cannot_hold_is_refused_before_the_limit(fleet, client):
    """Normal status, but the call's worst case does not fit in what is left: not sent."""
    f = fleet(budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "block_cloud"}, spent=1.0)
    # No max_tokens: the output bound is the default limit, dollars of worst case.
    resp = f.post(client, CLOUD_ONLY)
    [entry] = excluded(resp)
    assert entry["backend"] == "cloud"
    assert "worst-case" in entry["reason"] and "max_tokens" in entry["suggested_action"]
    assert f.cloud.generations() == 0
    # The same model with a small max_tokens fits.
    assert served(f.post(client, CLOUD_ONLY, max_tokens=16)) == "cloud"
    # A model the local backend also serves goes there, saying why.
    resp = f.post(client, SHARED)
    assert served(resp) == "local"
    assert resp.headers["x-nexus-route-reason"] == "budget-limit"
    assert f.cloud.generations() == 1


def test_steps_the_budget_refuses_do_not_use_up_the_retries(fleet, client, start_fake):
    """Three priced clouds before the free local backend, none with room for the call's worst
    case: they are skipped (not tried, nothing failed) and the local backend serves; with
    max_retries = 2 only three attempts are allowed, and none was made."""
    clouds = [start_fake(PricedOpenAI([SHARED])) for _ in range(2)]
    more = [
        {"name": f"cloud-{i}", "url": fake.url, "type": "openai", "api_key_env": KEY_VAR,
         "priority": 2 + i}
        for i, fake in enumerate(clouds)
    ]  # fmt: skip
    extra_price = {**PRICE, "backend": "cloud-*"}
    f = fleet(
        budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "block_cloud"},
        spent=1.0,
        pricing=[extra_price],
        extra_backends=more,
        max_retries=2,
    )
    resp = f.post(client, SHARED)  # no max_tokens: a worst case of dollars
    assert served(resp) == "local"
    assert resp.headers["x-nexus-route-reason"] == "budget-limit"
    assert f.cloud.generations() == 0
    assert all(fake.generations() == 0 for fake in clouds)


# --- policies ----------------------------------------------------------------------------------


def test_max_cost_per_request_excludes_a_backend_whose_worst_case_is_above_it(fleet, client):
    policy = {"model_pattern": "*", "max_cost_per_request": 1.0}
    f = fleet(policies=[policy])
    resp = f.post(client, CLOUD_ONLY)  # no max_tokens: the default output limit, far above $1
    [entry] = excluded(resp)
    assert entry["backend"] == "cloud"
    assert "max_cost_per_request" in entry["reason"]
    assert "max_tokens" in entry["suggested_action"]
    # A small max_tokens brings the worst case under the cap.
    raw = body_of(CLOUD_ONLY, max_tokens=16)
    assert worst_case(raw, 16) < 1.0
    resp = f.post(client, CLOUD_ONLY, max_tokens=16)
    assert served(resp) == "cloud"
    # A free backend is never above a cost cap.
    assert served(f.post(client, SHARED)) == "local"
    assert f.cloud.generations() == 1


def test_max_cost_per_request_applies_to_the_models_its_pattern_matches(fleet, client):
    f = fleet(policies=[{"model_pattern": "shared-*", "max_cost_per_request": 0.5}])
    assert served(f.post(client, CLOUD_ONLY)) == "cloud"  # no policy: no cap
    assert served(f.post(client, SHARED)) == "local"


@pytest.mark.parametrize("allowed", [True, False])
def test_fallback_allowed_false_stops_the_fallback_chain(fleet, client, allowed):
    policy = {"model_pattern": CLOUD_ONLY, "fallback_allowed": allowed}
    f = fleet(policies=[policy], fallbacks={CLOUD_ONLY: [SHARED]})
    f.cloud.push(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))
    resp = f.post(client, CLOUD_ONLY, max_tokens=16)
    assert f.local is not None
    if allowed:
        assert served(resp) in {"cloud", "local"}
        assert resp.headers["x-nexus-fallback-model"] == SHARED
    else:
        assert resp.status_code >= 500, resp.text
        assert "x-nexus-fallback-model" not in resp.headers
        assert not f.local.calls(CHAT)


# --- concurrency -------------------------------------------------------------------------------


ROOM = 20  # worst-case requests the budget has room for
CONCURRENT = 500


async def fire(url: str, raw: bytes, count: int) -> list[httpx2.Response]:
    limits = httpx2.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as http:
        return await asyncio.gather(
            *(
                http.post(url + CHAT, content=raw, headers={"content-type": "application/json"})
                for _ in range(count)
            )
        )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("local", [True, False], ids=["local-too", "cloud-only"])
def test_concurrent_requests_never_spend_past_the_limit(fleet, client, local, stream):
    """500 requests at once, room for 20 worst cases: the cloud gets at most 20, the rest are
    served locally (or refused), and the spend never passes the limit. A stream holds its
    reservation until it ends."""
    max_tokens = 8
    raw = body_of(SHARED, max_tokens=max_tokens, stream=stream)
    worst = worst_case(raw, max_tokens)
    prompt = chat_requirements(orjson.loads(raw), {}, len(raw)).prompt_bound
    # The fake bills the worst case itself: a settled call frees no room for another.
    usage = {"prompt_tokens": prompt, "completion_tokens": max_tokens,
             "total_tokens": prompt + max_tokens}  # fmt: skip
    limit = worst * (ROOM + 0.5)
    f = fleet(
        budget={"monthly_limit_usd": limit, "hard_limit_action": "block_cloud"},
        local=local,
        usage=usage,
    )
    f.cloud.delay = 0.05  # requests overlap while the first ones are in flight

    responses = asyncio.run(fire(f.nexus.url, raw, CONCURRENT))

    ok = [r for r in responses if r.status_code == 200]
    for resp in ok:
        assert not stream or data_events(resp.text)[-1] == "[DONE]"
    cloud = [r for r in ok if r.headers["x-nexus-backend"] == "cloud"]
    assert 0 < len(cloud) <= ROOM
    assert f.cloud.answered == len(cloud) == len(f.cloud.calls(CHAT))
    if local:
        assert len(ok) == CONCURRENT, {r.status_code for r in responses}
        assert len(ok) - len(cloud) == sum(1 for r in ok if r.headers["x-nexus-backend"] == "local")
    else:
        refused = [r for r in responses if r.status_code != 200]
        assert len(refused) == CONCURRENT - len(cloud)
        for resp in refused:
            assert {e["backend"] for e in excluded(resp)} == {"cloud"}
    assert wait_for(lambda: f.budget(client)["reserved_usd"] == 0.0)
    view = f.budget(client)
    assert f.spent() <= limit
    assert view["current_spending_usd"] <= round(limit, 6)
    assert f.spent() == pytest.approx(len(cloud) * worst)


# --- what a failed or abandoned call costs ---------------------------------------------------


def test_a_failed_call_releases_its_reservation_and_costs_nothing(fleet, client):
    f = fleet(budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "block_cloud"})
    f.cloud.push(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))
    resp = f.post(client, CLOUD_ONLY, max_tokens=16)
    assert resp.status_code == 502, resp.text
    assert "x-nexus-cost-estimated" not in resp.headers
    view = f.budget(client)
    assert (view["current_spending_usd"], view["reserved_usd"]) == (0.0, 0.0)


def test_a_client_that_leaves_pays_for_the_prompt_sent(fleet):
    """The backend got the prompt (and bills it); its answer never came back: the reservation
    is settled at the prompt's cost, not kept and not dropped."""
    f = fleet(budget={"monthly_limit_usd": LIMIT, "hard_limit_action": "block_cloud"})
    f.cloud.push(CHAT, Reply(json=completion(CLOUD_ONLY), delay=30))
    raw = body_of(CLOUD_ONLY, max_tokens=16)
    leaving = httpx2.Client(timeout=httpx2.Timeout(30, read=0.5))
    with leaving, pytest.raises(httpx2.ReadTimeout):
        leaving.post(f.nexus.url + CHAT, content=raw, headers={"content-type": "application/json"})
    assert f.cloud.wait_disconnect(10)  # Nexus let go of the upstream call
    prompt = chat_requirements(orjson.loads(raw), {}, len(raw)).prompt_bound
    with httpx2.Client(timeout=10) as http:
        assert wait_for(lambda: f.budget(http)["reserved_usd"] == 0.0)
        assert f.budget(http)["current_spending_usd"] == pytest.approx(prompt * IN_USD)


def test_a_stream_cut_short_by_its_client_settles_what_it_used(fleet, client):
    f = fleet(budget={"monthly_limit_usd": 100.0, "hard_limit_action": "block_cloud"})
    events = [sse(chunk(CLOUD_ONLY, content=f"w{i} ")) for i in range(200)]
    f.cloud.push(CHAT, Reply(events=[*events, DONE], event_delay=0.02))
    raw = body_of(CLOUD_ONLY, max_tokens=1000, stream=True)
    headers = {"content-type": "application/json"}
    with client.stream("POST", f.nexus.url + CHAT, content=raw, headers=headers) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # The client went away after one event: neither nothing nor the worst case is counted.
    assert f.cloud.wait_disconnect(10)
    assert wait_for(lambda: f.budget(client)["reserved_usd"] == 0.0)
    spent = f.budget(client)["current_spending_usd"]
    assert 0 < spent < worst_case(raw, 1000)
