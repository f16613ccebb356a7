"""Ordering the survivors: smart's score with worked numbers, the other strategies and the route
reasons. Plain records, a seeded random source and an injected clock."""

from __future__ import annotations

import random

import pytest

from nexus.config import BackendSettings, QualitySettings, RoutingSettings, RoutingWeights
from nexus.registry import Backend, Model, Registry, Status
from nexus.routing.planner import Plan, Router, RouteRequest
from nexus.routing.requirements import Requirements
from nexus.routing.strategies import REASONS, Candidate, Strategies, smart_score

DEFAULT = RoutingWeights()  # priority 50, load 30, latency 20


def backend(name, *models, priority=50, in_flight=0, max_concurrent=None, **timings):
    b = Backend(
        name=name,
        url=f"http://{name}",
        type="vllm",
        priority=priority,
        max_concurrent=max_concurrent,
    )
    b.status = Status.HEALTHY
    b.in_flight = in_flight
    b.models = {m: Model(m) for m in models or ("m",)}
    for key, value in timings.items():  # latency_ms, ewma_latency_ms, ewma_ttft_ms
        setattr(b, key, value)
    return b


def candidate(b: Backend, capacity: int = 8, ttft_penalty: float = 0.0) -> Candidate:
    return Candidate(b, "m", None, capacity, ttft_penalty=ttft_penalty)


def router(*backends, strategies=None, quality=None, **routing):
    return Router(
        Registry(backends),
        RoutingSettings(**routing),
        quality,
        clock=lambda: 1000.0,
        strategies=strategies,
    )


def order(plan: Plan) -> list[str]:
    return [step.backend.name for step in plan.steps]


def reasons(plan: Plan) -> list[str]:
    return [plan.route_reason(i) for i in range(len(plan.steps))]


# --- smart's score ------------------------------------------------------------------------------


def test_smart_score_worked_example():
    # priority 100 - 20 = 80; load 100 * (1 - 2/8) = 75; latency 100 - 300/10 = 70
    b = backend("a", priority=20, in_flight=2, ewma_latency_ms=300.0)
    score = smart_score(candidate(b), DEFAULT, stream=False)
    assert score == pytest.approx((80 * 50 + 75 * 30 + 70 * 20) / 100)  # 76.5


def test_smart_score_uses_time_to_first_token_for_streams():
    b = backend("a", priority=20, in_flight=2, ewma_latency_ms=300.0, ewma_ttft_ms=800.0)
    # latency part 100 - 800/10 = 20
    assert smart_score(candidate(b), DEFAULT, stream=True) == pytest.approx(66.5)
    assert smart_score(candidate(b), DEFAULT, stream=False) == pytest.approx(76.5)


def test_smart_score_uses_the_probe_latency_until_real_requests_were_measured():
    b = backend("a", priority=20, in_flight=2, latency_ms=50.0)
    # latency part 100 - 50/10 = 95
    assert smart_score(candidate(b), DEFAULT, stream=False) == pytest.approx(81.5)
    b.ewma_latency_ms = 300.0  # a measured average replaces the probe's figure
    assert smart_score(candidate(b), DEFAULT, stream=False) == pytest.approx(76.5)


def test_smart_score_without_any_latency_counts_it_as_best():
    b = backend("a", priority=20, in_flight=2)
    assert smart_score(candidate(b), DEFAULT, stream=False) == pytest.approx(82.5)


def test_smart_score_weights_are_normalised():
    b = backend("a", priority=20, in_flight=2, ewma_latency_ms=300.0)
    weights = RoutingWeights(priority=1, load=1, latency=2)
    expected = (80 * 1 + 75 * 1 + 70 * 2) / 4  # 73.75
    assert smart_score(candidate(b), weights, stream=False) == pytest.approx(expected)
    doubled = RoutingWeights(priority=2, load=2, latency=4)
    assert smart_score(candidate(b), doubled, stream=False) == pytest.approx(expected)
    only_load = RoutingWeights(priority=0, load=1, latency=0)
    assert smart_score(candidate(b), only_load, stream=False) == pytest.approx(75)


def test_smart_score_parts_are_clamped_to_0_100():
    b = backend("a", priority=250, in_flight=12, ewma_latency_ms=5000.0)
    assert smart_score(candidate(b), DEFAULT, stream=False) == pytest.approx(0)
    b = backend("a", priority=-5, in_flight=0, ewma_latency_ms=0.0)
    assert smart_score(candidate(b), DEFAULT, stream=False) == pytest.approx(100)


def test_ttft_penalty_takes_its_share_of_the_score():
    b = backend("a", priority=20, in_flight=2, ewma_latency_ms=300.0)
    assert smart_score(candidate(b, ttft_penalty=0.5), DEFAULT, stream=False) == pytest.approx(
        38.25
    )
    assert smart_score(candidate(b, ttft_penalty=1.0), DEFAULT, stream=False) == 0


# --- smart through the router -------------------------------------------------------------------


def test_priority_changes_the_smart_order():
    first = router(backend("a", priority=10), backend("b", priority=90))
    assert order(first.plan(RouteRequest("m"))) == ["a", "b"]
    swapped = router(backend("a", priority=90), backend("b", priority=10))
    assert order(swapped.plan(RouteRequest("m"))) == ["b", "a"]


def test_configured_priority_reaches_the_plan():
    from nexus.gateway import backend_from  # the config -> Backend path the gateway uses

    def configured(name, priority):
        spec = BackendSettings(name=name, url=f"http://{name}:1", type="vllm", priority=priority)
        b = backend_from(spec, environ={})
        b.status = Status.HEALTHY
        b.models = {"m": Model("m")}
        return b

    plan = router(configured("a", 80), configured("b", 5)).plan(RouteRequest("m"))
    assert order(plan) == ["b", "a"]
    assert [s.backend.priority for s in plan.steps] == [5, 80]


def test_smart_prefers_less_load_and_lower_latency():
    busy = router(backend("a", in_flight=6), backend("b", in_flight=1))
    assert order(busy.plan(RouteRequest("m"))) == ["b", "a"]
    slow = router(backend("a", ewma_latency_ms=900.0), backend("b", ewma_latency_ms=100.0))
    assert order(slow.plan(RouteRequest("m"))) == ["b", "a"]


def test_stream_requests_are_ordered_by_time_to_first_token():
    r = router(
        backend("a", ewma_latency_ms=100.0, ewma_ttft_ms=900.0),
        backend("b", ewma_latency_ms=900.0, ewma_ttft_ms=100.0),
    )
    assert order(r.plan(RouteRequest("m"))) == ["a", "b"]
    assert order(r.plan(RouteRequest("m", Requirements(stream=True)))) == ["b", "a"]


def test_a_slow_first_token_lowers_a_backend_below_a_worse_priority():
    quality = QualitySettings(ttft_penalty_threshold_ms=1000)
    r = router(backend("fast", priority=10), backend("steady", priority=50), quality=quality)
    assert order(r.plan(RouteRequest("m"))) == ["fast", "steady"]  # 95 against 75
    for _ in range(3):
        r.quality.record("fast", "m", True, 1500.0, 1000.0)  # penalty (1500 - 1000) / 1000
    assert order(r.plan(RouteRequest("m"))) == ["steady", "fast"]  # 47.5 against 75


def test_equal_scores_break_ties_by_priority_then_name():
    no_priority = RoutingWeights(priority=0, load=1, latency=1)
    r = router(
        backend("c", priority=50),
        backend("b", priority=50),
        backend("z", priority=5),
        backend("a", priority=50),
        weights=no_priority,
    )
    assert order(r.plan(RouteRequest("m"))) == ["z", "a", "b", "c"]


def test_smart_reasons():
    plan = router(backend("a", priority=1), backend("b")).plan(RouteRequest("m"))
    assert reasons(plan) == ["highest-score", "failover"]
    assert reasons(router(backend("a")).plan(RouteRequest("m"))) == ["only-candidate"]


# --- the other strategies -----------------------------------------------------------------------


def test_round_robin_rotates_through_the_backends():
    r = router(backend("c"), backend("a"), backend("b"), strategy="round_robin")
    orders = [order(r.plan(RouteRequest("m"))) for _ in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert reasons(r.plan(RouteRequest("m"))) == ["round-robin", "failover", "failover"]


def test_round_robin_keeps_a_turn_per_model():
    r = router(backend("a", "m1", "m2"), backend("b", "m1", "m2"), strategy="round_robin")
    assert order(r.plan(RouteRequest("m1")))[0] == "a"
    assert order(r.plan(RouteRequest("m1")))[0] == "b"
    assert order(r.plan(RouteRequest("m2")))[0] == "a"  # m2's own first turn
    assert order(r.plan(RouteRequest("m1")))[0] == "a"
    assert order(r.plan(RouteRequest("m2")))[0] == "b"


def test_priority_only_ignores_load_and_latency():
    r = router(
        backend("a", priority=20, in_flight=7, ewma_latency_ms=990.0),
        backend("b", priority=30),
        strategy="priority_only",
    )
    plan = r.plan(RouteRequest("m"))
    assert order(plan) == ["a", "b"]
    assert reasons(plan) == ["priority", "failover"]


def seeded_router(seed):
    strategies = Strategies(DEFAULT, random.Random(seed))
    return router(
        backend("a"), backend("b"), backend("c"), strategy="random", strategies=strategies
    )


def test_random_with_a_seed_is_reproducible_and_reaches_every_backend():
    first, second = seeded_router(7), seeded_router(7)
    runs = [order(first.plan(RouteRequest("m"))) for _ in range(60)]
    assert runs == [order(second.plan(RouteRequest("m"))) for _ in range(60)]
    assert {run[0] for run in runs} == {"a", "b", "c"}
    assert all(sorted(run) == ["a", "b", "c"] for run in runs)
    assert reasons(first.plan(RouteRequest("m"))) == ["random", "failover", "failover"]


def test_least_loaded_compares_in_flight_against_capacity():
    r = router(
        backend("a", in_flight=3, max_concurrent=4),  # 0.75
        backend("b", in_flight=4, max_concurrent=16),  # 0.25
        backend("c", in_flight=1, max_concurrent=2),  # 0.5
        strategy="least_loaded",
    )
    plan = r.plan(RouteRequest("m"))
    assert order(plan) == ["b", "c", "a"]
    assert reasons(plan) == ["least-loaded", "failover", "failover"]


@pytest.mark.parametrize("strategy", sorted(REASONS))
def test_a_single_survivor_is_the_only_candidate_for_every_strategy(strategy):
    r = router(backend("a"), strategy=strategy)
    assert reasons(r.plan(RouteRequest("m"))) == ["only-candidate"]


def test_the_reason_names():
    assert REASONS == {
        "smart": "highest-score",
        "round_robin": "round-robin",
        "priority_only": "priority",
        "random": "random",
        "least_loaded": "least-loaded",
    }


def test_strategies_order_candidates_directly():
    strategies = Strategies(DEFAULT, random.Random(1))
    low = candidate(backend("low", priority=90))
    high = candidate(backend("high", priority=10))
    assert strategies.order("priority_only", [low, high], "m", False) == [high, low]
    assert strategies.order("smart", [low, high], "m", False) == [high, low]
    assert high.score > low.score  # smart leaves its scores on the candidates
