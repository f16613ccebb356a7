"""The planner's stages (health -> capabilities -> privacy -> tier -> quality -> capacity), its
errors and its fallbacks. Plain records and an injected clock; no I/O, no timing."""

from __future__ import annotations

import json

import pytest

from nexus.config import QualitySettings, RoutingSettings, TrafficPolicy
from nexus.errors import NO_BACKENDS_HINT, ModelNotFound, NoHealthyBackend, ServiceUnavailable
from nexus.registry import Backend, Model, Registry, Status
from nexus.routing.planner import STAGES, Plan, Router, RouteRequest
from nexus.routing.requirements import Requirements


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def backend(
    name,
    *models,
    status=Status.HEALTHY,
    priority=50,
    zone="restricted",
    tier=1,
    in_flight=0,
    max_concurrent=None,
    slots=None,
    error=None,
):
    b = Backend(
        name=name,
        url=f"http://{name}",
        type="vllm",
        priority=priority,
        zone=zone,
        tier=tier,
        max_concurrent=max_concurrent,
        slots=slots,
    )
    b.status = status
    b.in_flight = in_flight
    b.last_error = error
    listed = [Model(m) if isinstance(m, str) else m for m in models]
    b.models = {m.id: m for m in listed}
    return b


def router(*backends, clock=None, quality=None, **routing):
    return Router(
        Registry(backends),
        RoutingSettings(**routing),
        quality,
        clock=clock or Clock(),
    )


def names(plan: Plan) -> list[str]:
    return [step.backend.name for step in plan.steps]


def excluded(plan: Plan, stage: str | None = None) -> dict[str, str]:
    """backend -> reason, for the exclusions of ``stage`` (all stages when None)."""
    return {e.backend: e.reason for e in plan.exclusions if stage is None or e.stage == stage}


def needs(**kwargs) -> RouteRequest:
    return RouteRequest("m", Requirements(**kwargs))


def restricted(pattern: str) -> TrafficPolicy:
    return TrafficPolicy(model_pattern=pattern, privacy="restricted")


# --- every exclusion says which stage, why, and what to do ------------------------------------


def test_each_stage_excludes_with_its_name_a_reason_and_an_action():
    clock = Clock()
    tools = Model("m", tools=True)
    r = router(
        backend("down", tools, tier=2, status=Status.UNHEALTHY, error="refused"),
        backend("blind", Model("m", reported=True), tier=2),
        backend("cloud", tools, tier=2, zone="open"),
        backend("low", tools, tier=1),
        backend("flaky", tools, tier=2),
        backend("busy", tools, tier=2, in_flight=100),
        backend("ok", tools, tier=2),
        clock=clock,
        quality=QualitySettings(min_requests=1),
        policies=[TrafficPolicy(model_pattern="m", privacy="restricted", min_tier=2)],
    )
    r.quality.record("flaky", "m", False, None, clock.now)
    request = RouteRequest("m", Requirements(tools=True))
    r.plan(request)  # any half-open trial is used up here
    plan = r.plan(request)
    assert names(plan) == ["ok"]
    assert [(e.backend, e.stage) for e in plan.exclusions] == [
        ("down", "health"),
        ("blind", "capabilities"),
        ("cloud", "privacy"),
        ("low", "tier"),
        ("flaky", "quality"),
        ("busy", "capacity"),
    ]
    for exclusion in plan.exclusions:
        assert exclusion.model == "m"
        assert exclusion.reason
        assert exclusion.suggested_action
    assert set(plan.stage_ns) == set(STAGES)


# --- health -------------------------------------------------------------------------------------


def test_health_excludes_unhealthy_unknown_and_unavailable_backends():
    unusable = backend("cfg", "m")
    unusable.unavailable = "environment variable OPENAI_KEY (api_key_env) is not set"
    r = router(
        backend("up", "m"),
        backend("down", "m", status=Status.UNHEALTHY, error="connection refused"),
        backend("new", "m", status=Status.UNKNOWN),
        unusable,
    )
    plan = r.plan(RouteRequest("m"))
    assert names(plan) == ["up"]
    reasons = excluded(plan, "health")
    assert set(reasons) == {"down", "new", "cfg"}
    assert reasons["down"] == "backend is unhealthy: connection refused"
    assert reasons["new"] == "backend is unknown: not yet checked"
    assert reasons["cfg"].endswith(": environment variable OPENAI_KEY (api_key_env) is not set")
    actions = {e.suggested_action for e in plan.exclusions}
    assert actions == {"check that the backend is running and reachable from Nexus"}


# --- capabilities -------------------------------------------------------------------------------


@pytest.mark.parametrize("capability", ["vision", "tools", "json_mode"])
def test_a_required_capability_excludes_a_model_that_lacks_it(capability):
    has = Model("m", **{capability: True}, reported=True)
    lacks = Model("m", reported=True)
    r = router(backend("has", has), backend("lacks", lacks))
    plan = r.plan(needs(**{capability: True}))
    assert names(plan) == ["has"]
    [exclusion] = plan.exclusions
    assert (exclusion.backend, exclusion.stage) == ("lacks", "capabilities")
    assert exclusion.reason == f"model lacks {capability}"
    assert "drop them from the request" in exclusion.suggested_action


def test_without_requirements_no_capability_is_checked():
    r = router(backend("plain", Model("m", reported=True)))
    assert names(r.plan(RouteRequest("m"))) == ["plain"]


def test_all_missing_capabilities_are_listed_in_one_exclusion():
    r = router(backend("has", Model("m", vision=True, tools=True)), backend("no", "m"))
    plan = r.plan(needs(vision=True, tools=True))
    assert excluded(plan) == {"no": "model lacks vision, tools"}


def test_a_reported_no_is_excluded_even_when_no_other_backend_claims_it():
    r = router(backend("blind", Model("m", reported=True)), backend("guess", "m"))
    plan = r.plan(needs(vision=True))
    assert names(plan) == ["guess"]
    assert excluded(plan, "capabilities") == {"blind": "model lacks vision"}


def test_a_lone_reported_no_leaves_nothing_to_serve():
    r = router(backend("blind", Model("m", reported=True)))
    with pytest.raises(NoHealthyBackend) as info:
        r.plan(needs(vision=True))
    [item] = info.value.context["excluded"]
    assert (item["backend"], item["stage"]) == ("blind", "capabilities")


def test_a_guessed_no_is_kept_when_no_candidate_claims_the_capability():
    r = router(backend("g1", "m"), backend("g2", "m"))
    plan = r.plan(needs(vision=True))
    assert sorted(names(plan)) == ["g1", "g2"]
    assert plan.exclusions == []


def test_a_guessed_no_is_excluded_when_another_candidate_claims_it():
    r = router(backend("guess", "m"), backend("eyes", Model("m", vision=True)))
    plan = r.plan(needs(vision=True))
    assert names(plan) == ["eyes"]
    assert excluded(plan, "capabilities") == {"guess": "model lacks vision"}


def test_an_unhealthy_claimant_does_not_count_against_a_guessed_no():
    eyes = backend("eyes", Model("m", vision=True), status=Status.UNHEALTHY)
    r = router(backend("guess", "m"), eyes)
    plan = r.plan(needs(vision=True))
    assert names(plan) == ["guess"]
    assert set(excluded(plan)) == {"eyes"}


def test_estimated_tokens_over_the_context_length_are_excluded():
    r = router(
        backend("small", Model("m", context_length=4096)),
        backend("exact", Model("m", context_length=5000)),
        backend("large", Model("m", context_length=32768)),
        backend("unknown", Model("m")),
    )
    plan = r.plan(needs(estimated_tokens=5000))
    assert sorted(names(plan)) == ["exact", "large", "unknown"]
    [exclusion] = plan.exclusions
    assert (exclusion.backend, exclusion.stage) == ("small", "capabilities")
    assert exclusion.reason == "model lacks context_length (5000 > 4096 tokens)"


# --- privacy ------------------------------------------------------------------------------------


def test_a_restricted_policy_excludes_open_zone_backends():
    r = router(
        backend("local", "secret-7b", "public-7b"),
        backend("cloud", "secret-7b", "public-7b", zone="open"),
        policies=[restricted("secret-*")],
    )
    plan = r.plan(RouteRequest("secret-7b"))
    assert names(plan) == ["local"]
    assert plan.restricted
    [exclusion] = plan.exclusions
    assert (exclusion.backend, exclusion.stage) == ("cloud", "privacy")
    assert exclusion.reason == "zone 'open' but the policy for 'secret-7b' requires 'restricted'"
    assert "restricted-zone" in exclusion.suggested_action

    public = r.plan(RouteRequest("public-7b"))  # the glob does not match: both may serve
    assert sorted(names(public)) == ["cloud", "local"]
    assert not public.restricted


def test_the_first_matching_policy_wins():
    backends = (
        backend("local", "gpt-4o", "gpt-3.5"),
        backend("cloud", "gpt-4o", "gpt-3.5", zone="open"),
    )
    open_first = [
        TrafficPolicy(model_pattern="gpt-4*", privacy="unrestricted"),
        restricted("gpt-*"),
    ]
    r = router(*backends, policies=open_first)
    assert sorted(names(r.plan(RouteRequest("gpt-4o")))) == ["cloud", "local"]
    assert names(r.plan(RouteRequest("gpt-3.5"))) == ["local"]

    restricted_first = [restricted("gpt-*"), TrafficPolicy(model_pattern="gpt-4*")]
    r = router(*backends, policies=restricted_first)
    assert names(r.plan(RouteRequest("gpt-4o"))) == ["local"]


def test_a_restricted_policy_applies_through_an_alias():
    r = router(
        backend("local", "secret-7b"),
        backend("cloud", "secret-7b", zone="open"),
        aliases={"private": "secret-7b"},
        policies=[restricted("secret-*")],
    )
    plan = r.plan(RouteRequest("private"))
    assert names(plan) == ["local"]
    assert plan.restricted


def test_an_alias_with_a_lenient_policy_cannot_lift_its_targets_restriction():
    r = router(
        backend("local", "secret-7b"),
        backend("cloud", "secret-7b", zone="open"),
        aliases={"fast": "secret-7b"},
        policies=[TrafficPolicy(model_pattern="fast"), restricted("secret-*")],
    )
    plan = r.plan(RouteRequest("fast"))
    assert names(plan) == ["local"]
    assert plan.restricted
    assert set(excluded(plan, "privacy")) == {"cloud"}


def test_a_policy_on_an_alias_or_one_of_its_hops_holds_for_what_it_names():
    backends = (backend("local", "gpt-4o"), backend("cloud", "gpt-4o", zone="open"))
    aliases = {"private": "mid", "mid": "gpt-4o"}
    for pattern in ("private", "mid"):
        r = router(*backends, aliases=aliases, policies=[restricted(pattern)])
        assert names(r.plan(RouteRequest("private"))) == ["local"], pattern
        assert sorted(names(r.plan(RouteRequest("gpt-4o")))) == ["cloud", "local"]


def test_an_alias_gets_the_strictest_of_each_requirement():
    r = router(
        backend("open-t3", "big", zone="open", tier=3),
        backend("local-t1", "big", tier=1),
        backend("local-t3", "big", tier=3),
        aliases={"best": "big"},
        policies=[
            TrafficPolicy(model_pattern="best", privacy="restricted", min_tier=1),
            TrafficPolicy(model_pattern="big", min_tier=3),
        ],
    )
    plan = r.plan(RouteRequest("best"))
    assert names(plan) == ["local-t3"]
    assert (plan.restricted, plan.required_tier) == (True, 3)
    assert excluded(plan) == {
        "open-t3": "zone 'open' but the policy for 'best' requires 'restricted'",
        "local-t1": "tier 1 is below the required 3",
    }


def test_a_fallback_named_by_a_restricted_alias_stays_restricted():
    r = router(
        backend("big", "big", status=Status.UNHEALTHY),
        backend("cloud", "small", zone="open", priority=1),
        backend("local", "small", priority=90),
        aliases={"cheap": "small"},
        policies=[restricted("cheap")],
        fallbacks={"big": ["cheap"]},
    )
    plan = r.plan(RouteRequest("big"))
    assert [(s.backend.name, s.fallback) for s in plan.steps] == [("local", "small")]
    assert set(excluded(plan, "privacy")) == {"cloud"}


def test_fallbacks_of_a_restricted_model_never_use_open_zone_backends():
    r = router(
        backend("vault", "secret-big", status=Status.UNHEALTHY),
        backend("cloud", "small", zone="open", priority=1),
        backend("local", "small", priority=90),
        policies=[restricted("secret-*")],
        fallbacks={"secret-big": ["small"]},
    )
    plan = r.plan(RouteRequest("secret-big"))
    assert [(s.backend.name, s.fallback) for s in plan.steps] == [("local", "small")]
    assert excluded(plan, "privacy") == {
        "cloud": "zone 'open' but the policy for 'secret-big' requires 'restricted'"
    }


def test_a_restricted_model_whose_only_fallback_is_open_fails_with_the_zone_required():
    r = router(
        backend("vault", "secret-big", status=Status.UNHEALTHY),
        backend("cloud", "small", zone="open"),
        policies=[restricted("secret-*")],
        fallbacks={"secret-big": ["small"]},
    )
    with pytest.raises(NoHealthyBackend) as info:
        r.plan(RouteRequest("secret-big"))
    context = info.value.context
    assert context["privacy_zone_required"] == "restricted"
    assert context["fallbacks_tried"] == ["small"]
    assert {(e["backend"], e["stage"]) for e in context["excluded"]} == {
        ("vault", "health"),
        ("cloud", "privacy"),
    }


def test_a_fallback_with_its_own_restricted_policy_is_restricted():
    r = router(
        backend("big", "big", status=Status.UNHEALTHY),
        backend("cloud", "secret-small", zone="open"),
        backend("local", "secret-small"),
        policies=[restricted("secret-*")],
        fallbacks={"big": ["secret-small"]},
    )
    plan = r.plan(RouteRequest("big"))
    assert names(plan) == ["local"]
    assert set(excluded(plan, "privacy")) == {"cloud"}


# --- tier ---------------------------------------------------------------------------------------


def tiered(**routing):
    return router(
        backend("t1", "m", tier=1),
        backend("t2", "m", tier=2),
        backend("t3", "m", tier=3),
        policies=[TrafficPolicy(model_pattern="m*", min_tier=2)],
        **routing,
    )


def test_strict_tier_keeps_only_the_exact_tier():
    plan = tiered().plan(RouteRequest("m"))
    assert names(plan) == ["t2"]
    assert plan.required_tier == 2
    reasons = excluded(plan, "tier")
    assert reasons == {
        "t1": "tier 1 is below the required 2",
        "t3": "tier 3 is not the required 2 (strict)",
    }
    action = next(e.suggested_action for e in plan.exclusions if e.backend == "t3")
    assert "X-Nexus-Flexible" in action


def test_strict_tier_without_an_exact_backend_fails_with_the_required_tier():
    r = tiered()
    r.registry.remove("t2")
    with pytest.raises(NoHealthyBackend) as info:
        r.plan(RouteRequest("m"))
    context = info.value.context
    assert context["required_tier"] == 2
    assert {e["backend"]: e["stage"] for e in context["excluded"]} == {"t1": "tier", "t3": "tier"}


def test_flexible_tier_prefers_the_exact_tier():
    plan = tiered().plan(RouteRequest("m", flexible=True))
    assert names(plan) == ["t2"]
    assert set(excluded(plan, "tier")) == {"t1", "t3"}
    assert excluded(plan)["t3"] == "tier 3: an exact tier-2 backend is available"


def test_flexible_tier_takes_a_higher_tier_only_when_no_exact_one_can_serve():
    r = tiered()
    r.registry.add(backend("t4", "m", tier=4))
    exact = r.registry.get("t2")
    assert exact is not None
    exact.status = Status.UNHEALTHY
    plan = r.plan(RouteRequest("m", flexible=True))
    assert sorted(names(plan)) == ["t3", "t4"]
    assert excluded(plan, "tier") == {"t1": "tier 1 is below the required 2"}


def test_flexible_tier_never_takes_a_lower_tier():
    r = tiered()
    r.registry.remove("t2")
    r.registry.remove("t3")
    with pytest.raises(NoHealthyBackend) as info:
        r.plan(RouteRequest("m", flexible=True))
    assert info.value.context["required_tier"] == 2


def test_without_a_tier_policy_every_tier_serves():
    r = router(backend("t1", "m", tier=1), backend("t3", "m", tier=3))
    plan = r.plan(RouteRequest("m"))
    assert sorted(names(plan)) == ["t1", "t3"]
    assert plan.required_tier is None


# --- quality ------------------------------------------------------------------------------------

QUALITY = QualitySettings(
    error_rate_threshold=0.5, min_requests=4, trial_interval_seconds=30, window_seconds=300
)


def failing_router(clock):
    return router(backend("good", "m"), backend("flaky", "m"), clock=clock, quality=QUALITY)


def fail(r, clock, times, name="flaky"):
    for _ in range(times):
        r.quality.record(name, "m", False, None, clock.now)


def test_quality_judges_only_after_min_requests_outcomes():
    clock = Clock()
    r = failing_router(clock)
    fail(r, clock, 3)
    assert sorted(names(r.plan(RouteRequest("m")))) == ["flaky", "good"]


def test_a_backend_over_the_error_rate_is_excluded_as_soon_as_it_trips():
    clock = Clock()
    r = failing_router(clock)
    fail(r, clock, 4)
    plan = r.plan(RouteRequest("m"))
    assert names(plan) == ["good"]
    [exclusion] = plan.exclusions
    assert (exclusion.backend, exclusion.stage) == ("flaky", "quality")
    assert exclusion.reason == "error rate 100% over its last 4 requests"
    assert exclusion.suggested_action == (
        "it gets a trial request every 30s and returns once one works"
    )


def test_half_open_lets_one_request_through_per_interval_then_a_success_restores():
    clock = Clock()
    r = failing_router(clock)
    fail(r, clock, 4)

    clock.now += 30  # the interval has passed: one trial
    assert "flaky" in names(r.plan(RouteRequest("m")))
    assert names(r.plan(RouteRequest("m"))) == ["good"]  # excluded again at once
    clock.now += 29
    assert names(r.plan(RouteRequest("m"))) == ["good"]

    clock.now += 1  # the next interval: another trial, which fails
    assert "flaky" in names(r.plan(RouteRequest("m")))
    fail(r, clock, 1)
    assert names(r.plan(RouteRequest("m"))) == ["good"]

    clock.now += 30  # a trial that works brings it back for good
    assert "flaky" in names(r.plan(RouteRequest("m")))
    r.quality.record("flaky", "m", True, 100.0, clock.now)
    for _ in range(3):
        plan = r.plan(RouteRequest("m"))
        assert sorted(names(plan)) == ["flaky", "good"]
        assert plan.exclusions == []


def test_the_half_open_trial_request_is_sent_to_the_tripped_backend():
    # Planning uses up the trial; if the tripped backend were only a failover step behind a
    # healthy one, the trial request would never reach it and it could not come back.
    clock = Clock()
    r = router(backend("good", "m"), backend("z-flaky", "m"), clock=clock, quality=QUALITY)
    fail(r, clock, 4, name="z-flaky")
    clock.now += 30
    assert names(r.plan(RouteRequest("m")))[0] == "z-flaky"


def test_quality_is_kept_per_backend_and_model():
    clock = Clock()
    r = router(backend("b", "m", "other"), backend("c", "m", "other"), clock=clock, quality=QUALITY)
    fail(r, clock, 4, name="b")
    r.plan(RouteRequest("m"))  # any half-open trial is used up here
    assert names(r.plan(RouteRequest("m"))) == ["c"]
    assert sorted(names(r.plan(RouteRequest("other")))) == ["b", "c"]


# --- capacity -----------------------------------------------------------------------------------


def test_a_backend_at_capacity_is_excluded():
    r = router(
        backend("full", "m", in_flight=2),
        backend("free", "m", in_flight=1),
        default_max_concurrent=2,
    )
    plan = r.plan(RouteRequest("m"))
    assert names(plan) == ["free"]
    assert not plan.saturated
    [exclusion] = plan.exclusions
    assert (exclusion.backend, exclusion.stage) == ("full", "capacity")
    assert exclusion.reason == "busy: 2 of 2 requests in flight"
    assert exclusion.suggested_action == "wait, or raise max_concurrent"


def test_when_every_capable_backend_is_busy_the_plan_is_saturated():
    a = backend("a", "m", in_flight=2)
    b = backend("b", "m", in_flight=3)
    a.ewma_latency_ms, b.ewma_latency_ms = 2500.0, 1500.0
    r = router(a, b, backend("down", "m", status=Status.UNHEALTHY), default_max_concurrent=2)
    plan = r.plan(RouteRequest("m"))  # no exception
    assert plan.saturated
    assert plan.steps == []
    assert {e.backend: e.stage for e in plan.exclusions} == {
        "down": "health",
        "a": "capacity",
        "b": "capacity",
    }
    assert plan.eta_seconds == 1.5


def test_saturation_is_not_claimed_when_nothing_was_busy():
    r = router(backend("down", "m", status=Status.UNHEALTHY), default_max_concurrent=2)
    with pytest.raises(NoHealthyBackend):
        r.plan(RouteRequest("m"))


@pytest.mark.parametrize(
    ("slots", "max_concurrent", "default", "capacity"),
    [
        (4, 1, 8, 4),  # what the server reports wins
        (None, 3, 8, 3),  # then the configured max_concurrent
        (None, None, 5, 5),  # then routing.default_max_concurrent
    ],
)
def test_capacity_is_reported_slots_else_configured_else_default(
    slots, max_concurrent, default, capacity
):
    def plan_with(in_flight):
        b = backend("b", "m", slots=slots, max_concurrent=max_concurrent, in_flight=in_flight)
        return router(b, default_max_concurrent=default).plan(RouteRequest("m"))

    assert names(plan_with(capacity - 1)) == ["b"]
    full = plan_with(capacity)
    assert full.saturated
    assert full.exclusions[0].reason == f"busy: {capacity} of {capacity} requests in flight"


# --- errors -------------------------------------------------------------------------------------


def test_an_unknown_model_is_model_not_found_listing_the_models():
    r = router(backend("a", "m1", "m2"), backend("b", "m3"), aliases={"fast": "m3"})
    with pytest.raises(ModelNotFound) as info:
        r.plan(RouteRequest("gpt-9"))
    error = info.value
    assert error.status_code == 404
    assert error.available == ["fast", "m1", "m2", "m3"]
    assert "Model 'gpt-9' not found" in error.message
    assert "m1, m2, m3" in error.message
    assert error.envelope()["error"]["code"] == "model_not_found"


def test_a_known_model_with_every_backend_excluded_is_no_healthy_backend():
    r = router(
        backend("down", "m", status=Status.UNHEALTHY, error="timeout"),
        backend("cloud", "m", zone="open", tier=2),
        backend("low", "m", tier=1),
        policies=[TrafficPolicy(model_pattern="m", privacy="restricted", min_tier=2)],
    )
    with pytest.raises(NoHealthyBackend) as info:
        r.plan(RouteRequest("m"))
    error = info.value
    assert error.status_code == 503
    context = error.envelope()["context"]
    assert context["model"] == "m"
    assert context["privacy_zone_required"] == "restricted"
    assert context["required_tier"] == 2
    assert [(e["backend"], e["stage"]) for e in context["excluded"]] == [
        ("down", "health"),
        ("cloud", "privacy"),
        ("low", "tier"),
    ]
    for item in context["excluded"]:
        assert set(item) == {"backend", "model", "stage", "reason", "suggested_action"}

    headers = error.headers()
    assert headers["X-Nexus-Rejection-Reasons"] == (
        "3 backend(s) excluded: health (1), privacy (1), tier (1)"
    )
    assert json.loads(headers["X-Nexus-Rejection-Details"]) == context["excluded"]
    assert "Retry-After" not in headers


def test_without_a_policy_the_context_has_no_zone_or_tier():
    r = router(backend("down", "m", status=Status.UNHEALTHY))
    with pytest.raises(NoHealthyBackend) as info:
        r.plan(RouteRequest("m"))
    context = info.value.context
    assert "privacy_zone_required" not in context
    assert "required_tier" not in context
    assert info.value.headers()["X-Nexus-Rejection-Reasons"] == (
        "1 backend(s) excluded: health (1)"
    )


def test_no_backends_at_all_is_service_unavailable():
    r = router()
    with pytest.raises(ServiceUnavailable) as info:
        r.plan(RouteRequest("m"))
    assert type(info.value) is ServiceUnavailable
    assert info.value.status_code == 503
    assert info.value.message == NO_BACKENDS_HINT


# --- fallbacks ----------------------------------------------------------------------------------


def test_fallbacks_come_after_the_primary_candidates_in_order():
    r = router(
        backend("a", "big"),
        backend("b", "big"),
        backend("s", "small"),
        backend("t", "tiny"),
        fallbacks={"big": ["small", "tiny"]},
    )
    plan = r.plan(RouteRequest("big"))
    assert [(s.backend.name, s.fallback) for s in plan.steps][2:] == [
        ("s", "small"),
        ("t", "tiny"),
    ]
    assert sorted(names(plan)[:2]) == ["a", "b"]
    reasons = [plan.route_reason(i) for i in range(len(plan.steps))]
    assert reasons == ["highest-score", "failover", "fallback", "fallback"]


def test_an_alias_to_a_model_with_fallbacks_gets_them():
    r = router(
        backend("a", "big"),
        backend("s", "small"),
        aliases={"gpt-4": "big"},
        fallbacks={"big": ["small"]},
    )
    plan = r.plan(RouteRequest("gpt-4"))
    assert (plan.requested, plan.resolved) == ("gpt-4", "big")
    assert [(s.backend.name, s.model, s.fallback) for s in plan.steps] == [
        ("a", "big", None),
        ("s", "small", "small"),
    ]
    assert plan.route_reason(1) == "fallback"


def test_a_fallback_named_by_an_alias_is_resolved():
    r = router(
        backend("a", "big", status=Status.UNHEALTHY),
        backend("s", "small-v2"),
        aliases={"small": "small-v2"},
        fallbacks={"big": ["small"]},
    )
    plan = r.plan(RouteRequest("big"))
    assert [(s.backend.name, s.fallback) for s in plan.steps] == [("s", "small-v2")]
