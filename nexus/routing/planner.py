"""Request -> ordered plan of (backend, model) steps, and why each other backend was left out.

Pure: reads the registry's records, does no I/O; the clock and the random source are injected.
For the requested model (after aliases), then for each fallback model, the backends that list it
pass through the stages below; each stage may only exclude, and says why and what to do:

    health -> capabilities -> privacy -> budget -> tier -> quality -> capacity

The survivors are ordered by the strategy (a recent backend for the same conversation first, when
affinity is on; past the budget's soft limit, local backends before cloud ones). When nothing
survives only because every capable backend is busy, the plan is ``saturated``: the request may
wait in the queue instead of failing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import QualitySettings, RoutingSettings
from ..dialects import anthropic, gemini
from ..errors import (
    NO_BACKENDS_HINT,
    CapabilityMismatch,
    ModelNotFound,
    NoHealthyBackend,
    ServiceUnavailable,
)
from ..registry import Backend, Registry
from .access import Access, refuse
from .affinity import AffinityTable
from .aliases import alias_chain, resolve
from .budget import HARD_LIMIT, NORMAL, BudgetView
from .policy import Policies, Rule
from .quality import QualityTracker
from .requirements import Requirements
from .strategies import REASONS, Candidate, Strategies

# Backend types whose dialect cannot express every OpenAI request: why a body cannot go there.
UNTRANSLATABLE: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "anthropic": anthropic.untranslatable,
    "google": gemini.untranslatable,
}

STAGES = ("health", "capabilities", "privacy", "budget", "tier", "quality", "capacity")


@dataclass(frozen=True, slots=True)
class Step:
    backend: Backend
    model: str  # the backend's own name for the model
    fallback: str | None = None  # the fallback model this step serves, if any
    reason: str = "only-candidate"


@dataclass(frozen=True, slots=True)
class Exclusion:
    backend: str
    model: str
    stage: str
    reason: str
    suggested_action: str

    def as_dict(self) -> dict[str, str]:
        return {
            "backend": self.backend,
            "model": self.model,
            "stage": self.stage,
            "reason": self.reason,
            "suggested_action": self.suggested_action,
        }


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str
    requirements: Requirements = Requirements()
    flexible: bool = False  # X-Nexus-Flexible: a higher tier may serve when the exact one can't
    affinity_keys: tuple[int, ...] = ()
    # The chat body, for backends that translate it (dialects' ``untranslatable``): read only
    # when such a backend is a candidate.
    body: dict[str, Any] | None = field(default=None, compare=False)
    # The provider whose own API the client spoke ("anthropic"): its backends get the client's
    # request as it came, so what its translation could not carry does not keep them out.
    native: str | None = None
    access: Access | None = field(default=None, compare=False)  # the client key's reach


@dataclass(slots=True)
class Plan:
    requested: str
    resolved: str
    steps: list[Step] = field(default_factory=list)
    exclusions: list[Exclusion] = field(default_factory=list)
    saturated: bool = False  # capable backends exist, all at capacity
    required_tier: int | None = None
    restricted: bool = False  # only restricted-zone backends may serve
    stage_ns: dict[str, int] = field(default_factory=dict)
    eta_seconds: float | None = None
    budget_status: str = NORMAL

    def route_reason(self, index: int) -> str:
        step = self.steps[index]
        if step.fallback is not None:
            return "fallback"
        if index > 0:
            return "failover"
        return step.reason

    def context(self, registry: Registry, fallbacks: list[str]) -> dict[str, Any]:
        context: dict[str, Any] = {
            "model": self.requested,
            "resolved_model": self.resolved,
            "fallbacks_tried": fallbacks,
            "available_backends": [b.name for b in registry if b.healthy],
            "excluded": [exclusion.as_dict() for exclusion in self.exclusions],
            "privacy_zone_required": "restricted" if self.restricted else None,
            "required_tier": self.required_tier,
            "eta_seconds": self.eta_seconds,
        }
        return {key: value for key, value in context.items() if value is not None}


class Router:
    """Plans requests. Holds what routing remembers: strategy turns, quality, affinity."""

    def __init__(
        self,
        registry: Registry,
        routing: RoutingSettings,
        quality_settings: QualitySettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        strategies: Strategies | None = None,
        budget: BudgetView | None = None,
    ) -> None:
        self.registry = registry
        self.budget = budget
        self.routing = routing
        self.policies = Policies(routing.policies)
        self.quality = QualityTracker(quality_settings or QualitySettings())
        self.affinity = AffinityTable(routing.affinity_ttl_seconds)
        # [routing] shared_affinity: each conversation remembered here is told to the other
        # replicas too (set by the app when the state is shared)
        self.share_affinity: Callable[[tuple[int, ...], str], None] | None = None
        self.strategies = strategies or Strategies(routing.weights)
        self.clock = clock
        self._stages: list[tuple[str, _Stage]] = [
            (stage, getattr(self, f"_{stage}")) for stage in STAGES
        ]

    def plan(self, request: RouteRequest) -> Plan:
        """Raises ModelNotFound (nobody lists it), CapabilityMismatch (all excluded for what the
        request needs), NoHealthyBackend (all excluded otherwise, none busy)
        or ServiceUnavailable (no backends at all); a saturated plan has no steps."""
        routing = self.routing
        names = alias_chain(request.model, routing.aliases)
        resolved = names[-1]
        access = request.access
        if access is not None and not access.allows(resolved):
            raise refuse(access, request.model, resolved)
        rule = self.policies.strictest(names)  # an alias cannot lift its target's policy
        plan = Plan(request.model, resolved, restricted=bool(rule and rule.restricted))
        plan.required_tier = rule.min_tier if rule else None
        now = self.clock()
        plan.budget_status = self.budget.status() if self.budget is not None else NORMAL
        known = self._add(plan, request, resolved, None, now, rule)
        fallbacks = routing.fallbacks.get(resolved) or routing.fallbacks.get(request.model) or []
        if rule is not None and not rule.fallback_allowed:
            fallbacks = []  # the policy keeps this model's requests on the model itself
        for name in fallbacks:
            chain = alias_chain(name, routing.aliases)
            target = chain[-1]
            if access is not None and not access.allows(target):
                continue  # the key may not use this fallback
            own = self.policies.strictest(chain)
            known = self._add(plan, request, target, target, now, own, rule) or known
        if plan.steps or plan.saturated:
            return plan
        if not known:
            if not len(self.registry):
                raise ServiceUnavailable(NO_BACKENDS_HINT)
            raise ModelNotFound(request.model, self.available_models())
        context = plan.context(self.registry, list(fallbacks))
        if plan.exclusions and all(e.stage == "capabilities" for e in plan.exclusions):
            raise CapabilityMismatch(request.model, context)
        raise NoHealthyBackend(request.model, context)

    def available_models(self) -> list[str]:
        models = self.registry.model_ids(healthy_only=True)
        aliases = self.routing.aliases
        reachable = [alias for alias in aliases if resolve(alias, aliases) in models]
        return sorted({*models, *reachable})

    def remember(self, request: RouteRequest, backend: str) -> None:
        """The conversation was served by ``backend``: send its next turns there too."""
        if self.routing.affinity and request.affinity_keys:
            self.affinity.remember(request.affinity_keys, backend, self.clock())
            if self.share_affinity is not None:
                self.share_affinity(request.affinity_keys, backend)

    def learned(self, keys: tuple[int, ...], backend: str) -> None:
        """Another replica served this conversation on ``backend`` (shared affinity)."""
        if self.routing.affinity and self.registry.get(backend) is not None:
            self.affinity.remember(keys, backend, self.clock())

    def _add(
        self,
        plan: Plan,
        request: RouteRequest,
        model: str,
        fallback: str | None,
        now: float,
        rule: Rule | None = None,
        first_rule: Rule | None = None,
    ) -> bool:
        """Append the steps for ``model``; True when any backend at all lists it. A fallback's
        own ``rule`` applies on top of the request's (``first_rule``, its cost cap)."""
        backends = self.registry.backends_for(model)
        if not backends:
            return False
        keyed = request.access is not None and request.access.restricted
        restricted = plan.restricted or bool(rule and rule.restricted) or keyed
        tier = max(
            filter(None, (plan.required_tier, rule.min_tier if rule else None)), default=None
        )
        default_capacity = self.routing.default_max_concurrent
        candidates = [
            Candidate(b, b.find_model(model) or model, fallback, b.capacity(default_capacity))
            for b in backends
        ]
        caps = [r.max_cost for r in (rule, first_rule) if r is not None and r.max_cost is not None]
        ctx = _StageContext(plan, request, model, restricted, tier, now, min(caps, default=None))
        stage_ns = plan.stage_ns
        clock = time.perf_counter_ns
        started = clock()
        for stage, run in self._stages:
            candidates = run(candidates, ctx)
            ended = clock()
            stage_ns[stage] = stage_ns.get(stage, 0) + ended - started
            started = ended
        if not candidates:
            return True
        ordered = self.strategies.order(
            self.routing.strategy, candidates, model, request.requirements.stream
        )
        reason = REASONS[self.routing.strategy] if len(ordered) > 1 else "only-candidate"
        if plan.budget_status != NORMAL and len(ordered) > 1:
            # Past the soft limit, local backends before cloud ones (the order otherwise kept).
            local = [c for c in ordered if c.backend.zone != "open"]
            if local and ordered[0].backend.zone == "open":
                reason = "budget-soft-limit:prefer-local"
            ordered = local + [c for c in ordered if c.backend.zone == "open"]
        preferred = self._affine(request, ordered, now)
        trial = next((c for c in ordered if c.trial), None)
        if trial is not None:  # the half-open trial goes first, or it would never happen
            ordered.remove(trial)
            ordered.insert(0, trial)
            reason = "trial"
        elif preferred is not None:
            ordered.remove(preferred)
            ordered.insert(0, preferred)
            reason = "affinity"
        first = len(plan.steps)
        for index, c in enumerate(ordered):
            step_reason = reason if first + index == 0 else "failover"
            plan.steps.append(Step(c.backend, c.model, fallback, step_reason))
        return True

    def _affine(
        self, request: RouteRequest, ordered: list[Candidate], now: float
    ) -> Candidate | None:
        if not self.routing.affinity or not request.affinity_keys or len(ordered) < 2:
            return None
        name = self.affinity.lookup(request.affinity_keys, now)
        for candidate in ordered:
            if candidate.backend.name == name:
                if candidate.backend.zone == "open" and ordered[0].backend.zone != "open":
                    return None  # past the soft limit, a cached prompt is not worth the cloud
                return candidate
        return None

    # --- stages: each returns the candidates it keeps and records why it left others out --
    def _health(self, candidates: list[Candidate], ctx: _StageContext) -> list[Candidate]:
        keep = []
        for c in candidates:
            backend = c.backend
            if backend.healthy and backend.unavailable is None:
                keep.append(c)
                continue
            if backend.unavailable is not None:
                why = f"backend is unavailable: {backend.unavailable}"
            else:
                why = (
                    f"backend is {backend.status.value}: {backend.last_error or 'not yet checked'}"
                )
            ctx.exclude(c, "health", why,
                        "check that the backend is running and reachable from Nexus")  # fmt: skip
        return keep

    def _capabilities(self, candidates: list[Candidate], ctx: _StageContext) -> list[Candidate]:
        needs = ctx.request.requirements
        wanted = [
            name
            for name, needed in (
                ("vision", needs.vision),
                ("tools", needs.tools),
                ("json_mode", needs.json_mode),
            )  # fmt: skip
            if needed
        ]
        keep = []
        untranslatable: dict[str, str | None] = {}  # per backend type, worked out once
        for c in candidates:
            check = UNTRANSLATABLE.get(c.backend.type)
            body = ctx.request.body
            if check is not None and body is not None and c.backend.type != ctx.request.native:
                kind = c.backend.type
                if kind not in untranslatable:
                    untranslatable[kind] = check(body)
                why = untranslatable[kind]
                if why is not None:
                    action = "drop it from the request, or use a backend that speaks OpenAI"
                    ctx.exclude(c, "capabilities", f"{kind} cannot honour {why}", action)
                    continue
            model = c.backend.models.get(c.model)
            rivals = [r for r in candidates if r.backend.zone == "restricted" or not ctx.restricted]
            own = wanted
            if c.backend.type == ctx.request.native and "json_mode" in wanted:
                # Its own API has structured output (Anthropic's output_config.format); only
                # the translation from chat lacks it.
                own = [name for name in wanted if name != "json_mode"]
            missing = [] if model is None else _missing(model, own, rivals)
            context = model.context_length if model is not None else None
            if context is not None and needs.estimated_tokens > context:
                missing.append(f"context_length ({needs.estimated_tokens} > {context} tokens)")
            if missing:
                action = "use a model with these capabilities, or drop them from the request"
                ctx.exclude(c, "capabilities", "model lacks " + ", ".join(missing), action)
            else:
                keep.append(c)
        return keep

    def _privacy(self, candidates: list[Candidate], ctx: _StageContext) -> list[Candidate]:
        if not ctx.restricted:
            return candidates
        keep = []
        for c in candidates:
            if c.backend.zone == "restricted":
                keep.append(c)
            elif (
                ctx.plan.restricted
                or ctx.request.access is None
                or not ctx.request.access.restricted
            ):
                ctx.exclude(c, "privacy", f"zone '{c.backend.zone}' but the policy for "
                            f"'{ctx.plan.requested}' requires 'restricted'",
                            "serve this model from a restricted-zone (local) backend")  # fmt: skip
            else:
                ctx.exclude(c, "privacy", f"zone '{c.backend.zone}' but the key "
                            f"'{ctx.request.access.name}' has max_zone 'restricted'",
                            "use a key that may reach open-zone backends, or serve this model "
                            "from a restricted-zone (local) backend")  # fmt: skip
        return keep

    def _budget(self, candidates: list[Candidate], ctx: _StageContext) -> list[Candidate]:
        view = self.budget
        cap = ctx.max_cost
        blocking = ctx.plan.budget_status == HARD_LIMIT
        if view is None or (cap is None and not blocking):
            return candidates
        needs = ctx.request.requirements
        keep = []
        for c in candidates:
            if blocking and view.blocks(c.backend, c.model):
                ctx.exclude(c, "budget", "the monthly budget's hard limit is reached and its "
                            f"hard_limit_action keeps '{c.backend.zone}'-zone backends out",
                            "raise [routing.budget] monthly_limit_usd, or wait for the next "
                            "month (UTC)")  # fmt: skip
                continue
            if cap is not None:
                worst = view.worst_case(
                    c.backend, c.model, needs.prompt_bound, needs.max_tokens, needs.embeddings
                )
                if worst is not None and worst > cap:
                    why = f"its worst-case cost ${worst:.6f} is above the policy's "
                    why += f"max_cost_per_request ${cap:.6f}"
                    action = "set a lower max_tokens, or raise max_cost_per_request"
                    ctx.exclude(c, "budget", why, action)
                    continue
            keep.append(c)
        return keep

    def _tier(self, candidates: list[Candidate], ctx: _StageContext) -> list[Candidate]:
        required = ctx.tier
        if required is None:
            return candidates
        exact = [c for c in candidates if c.backend.tier == required]
        higher = [c for c in candidates if c.backend.tier > required]
        keep = exact or (higher if ctx.request.flexible else [])
        kept = {id(c) for c in keep}
        for c in candidates:
            if id(c) in kept:
                continue
            tier = c.backend.tier
            if tier < required:
                why, action = f"tier {tier} is below the required {required}", "use a higher tier"
            elif ctx.request.flexible:
                why, action = f"tier {tier}: an exact tier-{required} backend is available", "-"
            else:
                why = f"tier {tier} is not the required {required} (strict)"
                action = "send X-Nexus-Flexible: true to allow a higher tier"
            ctx.exclude(c, "tier", why, action)
        return keep

    def _quality(self, candidates: list[Candidate], ctx: _StageContext) -> list[Candidate]:
        keep = []
        quality = self.quality
        for c in candidates:
            verdict = quality.verdict(c.backend.name, c.model, ctx.now)
            if verdict.excluded:
                why = (
                    f"error rate {verdict.error_rate:.0%} over its last {verdict.requests} requests"
                )
                every = quality.settings.trial_interval_seconds
                action = f"it gets a trial request every {every:g}s and returns once one works"
                ctx.exclude(c, "quality", why, action)
                continue
            c.ttft_penalty = quality.ttft_penalty(verdict.avg_ttft_ms)
            c.trial = verdict.trial
            keep.append(c)
        return keep

    def _capacity(self, candidates: list[Candidate], ctx: _StageContext) -> list[Candidate]:
        keep = [c for c in candidates if c.backend.in_flight < c.capacity]
        if len(keep) == len(candidates):
            return keep
        if not keep:
            ctx.plan.saturated = True
            latencies = [c.backend.ewma_latency_ms for c in candidates]
            known = [ms for ms in latencies if ms is not None]
            ctx.plan.eta_seconds = round(min(known) / 1000, 3) if known else None
        for c in candidates:
            if c.backend.in_flight >= c.capacity:
                ctx.exclude(c, "capacity", f"busy: {c.backend.in_flight} of {c.capacity} "
                            "requests in flight", "wait, or raise max_concurrent")  # fmt: skip
        return keep


@dataclass(slots=True)
class _StageContext:
    plan: Plan
    request: RouteRequest
    model: str
    restricted: bool
    tier: int | None
    now: float
    max_cost: float | None = None

    def exclude(self, c: Candidate, stage: str, reason: str, action: str) -> None:
        self.plan.exclusions.append(Exclusion(c.backend.name, c.model, stage, reason, action))


def _missing(model: Any, wanted: list[str], candidates: list[Candidate]) -> list[str]:
    """What ``model`` lacks. A guessed "no" counts only when another candidate that may serve
    this request (privacy allowing) has it."""
    missing = []
    for name in wanted:
        if getattr(model, name):
            continue
        if model.reported or any(_claims(c, name) for c in candidates):
            missing.append(name)
    return missing


def _claims(candidate: Candidate, capability: str) -> bool:
    model = candidate.backend.models.get(candidate.model)
    return model is not None and bool(getattr(model, capability))


def plan_request(registry: Registry, routing: RoutingSettings, model: str) -> Plan:
    """One-off planning with default state (tests and tools)."""
    return Router(registry, routing).plan(RouteRequest(model))


# A stage: the candidates it keeps, given the candidates and what it needs to know.
_Stage = Callable[[list[Candidate], _StageContext], list[Candidate]]
