"""The planner's budget stage and the policies' cost keys: hard-limit exclusions by action,
``max_cost_per_request`` against the worst case, local-first past the soft limit, and
``fallback_allowed``. A stand-in budget view; no I/O."""

from __future__ import annotations

import pytest

from nexus.config import RoutingSettings, TrafficPolicy
from nexus.errors import NoHealthyBackend
from nexus.registry import Backend, Model, Registry, Status
from nexus.routing.budget import HARD_LIMIT, NORMAL, SOFT_LIMIT
from nexus.routing.planner import STAGES, Router, RouteRequest
from nexus.routing.policy import Policies
from nexus.routing.requirements import Requirements


class View:
    """A budget in a given state; cloud calls cost ``per_token`` per token, local ones nothing
    unless listed in ``priced``."""

    def __init__(self, status: str = NORMAL, action: str = "warn", priced: tuple[str, ...] = ()):
        self.state = status
        self.action = action
        self.priced = priced
        self.asked: list[tuple[str, int, int | None]] = []

    def status(self) -> str:
        return self.state

    def cost(self, backend: Backend) -> float | None:
        return 1e-6 if backend.zone == "open" or backend.name in self.priced else None

    def blocks(self, backend: Backend, model: str) -> bool:
        if self.action == "block_cloud":
            return backend.zone == "open"
        return self.action == "block_all" and (
            backend.zone == "open" or self.cost(backend) is not None
        )

    def worst_case(
        self, backend: Backend, model: str, prompt: int, max_tokens: int | None, embeddings: bool
    ) -> float | None:
        self.asked.append((backend.name, prompt, max_tokens))
        rate = self.cost(backend)
        return None if rate is None else rate * (prompt + (max_tokens or 100_000))


def backend(name: str, zone: str, priority: int = 50, *models: str) -> Backend:
    b = Backend(name=name, url=f"http://{name}", type="vllm", priority=priority, zone=zone)
    b.status = Status.HEALTHY
    b.models = {m: Model(m) for m in (models or ("m",))}
    return b


def fleet() -> list[Backend]:
    # The cloud is preferred by priority: only the budget may put the local one first.
    return [backend("cloud", "open", 1), backend("local", "restricted", 90)]


def router(view: View, *backends: Backend, **routing: object) -> Router:
    return Router(Registry(backends or fleet()), RoutingSettings(**routing), budget=view)


def plan_for(r: Router, model: str = "m", **needs: object):
    return r.plan(RouteRequest(model, Requirements(**needs)))  # type: ignore[arg-type]


def test_budget_runs_after_privacy_and_before_tier() -> None:
    assert STAGES.index("privacy") < STAGES.index("budget") < STAGES.index("tier")


def test_normal_budget_leaves_the_order_to_the_strategy() -> None:
    plan = plan_for(router(View(NORMAL), strategy="priority_only"))
    assert [s.backend.name for s in plan.steps] == ["cloud", "local"]


@pytest.mark.parametrize("status", [SOFT_LIMIT, HARD_LIMIT])
def test_past_the_soft_limit_local_goes_first_and_says_why(status: str) -> None:
    plan = plan_for(router(View(status, action="warn"), strategy="priority_only"))
    assert [s.backend.name for s in plan.steps] == ["local", "cloud"]  # cloud kept for failover
    assert plan.route_reason(0) == "budget-soft-limit:prefer-local"
    assert not plan.exclusions


def test_hard_limit_block_cloud_excludes_open_zone_with_reason_and_action() -> None:
    plan = plan_for(router(View(HARD_LIMIT, action="block_cloud")))
    assert [s.backend.name for s in plan.steps] == ["local"]
    (exclusion,) = plan.exclusions
    assert (exclusion.backend, exclusion.stage) == ("cloud", "budget")
    assert "hard limit" in exclusion.reason and "monthly_limit_usd" in exclusion.suggested_action


def test_a_model_only_the_cloud_serves_gets_the_actionable_503_at_the_hard_limit() -> None:
    r = router(View(HARD_LIMIT, action="block_cloud"), backend("cloud", "open", 1))
    with pytest.raises(NoHealthyBackend) as caught:
        plan_for(r)
    (entry,) = caught.value.context["excluded"]
    assert entry["stage"] == "budget" and entry["suggested_action"]


def test_block_all_refuses_what_is_priced_but_serves_what_is_free() -> None:
    free = backend("free", "restricted", 50)
    gpu = backend("gpu", "restricted", 10)  # priced through [[pricing]]
    view = View(HARD_LIMIT, action="block_all", priced=("gpu",))
    plan = plan_for(router(view, backend("cloud", "open", 1), gpu, free))
    assert [s.backend.name for s in plan.steps] == ["free"]
    assert {e.backend for e in plan.exclusions if e.stage == "budget"} == {"cloud", "gpu"}


def test_warn_excludes_nothing_at_the_hard_limit() -> None:
    plan = plan_for(router(View(HARD_LIMIT, action="warn")))
    assert {s.backend.name for s in plan.steps} == {"cloud", "local"}


def test_max_cost_per_request_excludes_a_worst_case_above_it() -> None:
    policy = TrafficPolicy(model_pattern="m", max_cost_per_request=0.01)
    view = View()
    r = router(view, policies=[policy])
    # 20,000 prompt tokens and no max_tokens: the worst case is 0.12 USD on the cloud.
    plan = plan_for(r, estimated_tokens=20_000)
    assert [s.backend.name for s in plan.steps] == ["local"]
    (exclusion,) = plan.exclusions
    assert exclusion.stage == "budget" and "max_cost_per_request" in exclusion.reason
    assert "max_tokens" in exclusion.suggested_action
    # The prompt bound counts the whole request (a token per three bytes), and max_tokens is used.
    plan = plan_for(r, estimated_tokens=100, request_bytes=3000, max_tokens=500)
    assert {s.backend.name for s in plan.steps} == {"cloud", "local"}
    assert ("cloud", 1000, 500) in view.asked


def test_fallback_allowed_false_stops_the_chain() -> None:
    only = backend("only", "restricted", 50, "big")
    spare = backend("spare", "restricted", 50, "small")
    only.status = Status.UNHEALTHY
    allowed = router(View(), only, spare, fallbacks={"big": ["small"]})
    assert [s.fallback for s in plan_for(allowed, "big").steps] == ["small"]
    policy = TrafficPolicy(model_pattern="big", fallback_allowed=False)
    stopped = router(View(), only, spare, fallbacks={"big": ["small"]}, policies=[policy])
    with pytest.raises(NoHealthyBackend) as caught:
        plan_for(stopped, "big")
    assert caught.value.context.get("fallbacks_tried") == []


def test_the_strictest_cost_rules_win_across_an_alias() -> None:
    policies = Policies(
        [
            TrafficPolicy(model_pattern="alias", max_cost_per_request=0.5),
            TrafficPolicy(model_pattern="target", max_cost_per_request=0.1, fallback_allowed=False),
        ]
    )
    rule = policies.strictest(["alias", "target"])
    assert rule is not None and rule.max_cost == 0.1 and rule.fallback_allowed is False
