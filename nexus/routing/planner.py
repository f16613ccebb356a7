"""Request -> ordered plan of (backend, model) steps, and why each other backend was left out.

Pure: reads the registry's records, does no I/O. The plan lists the requested model's healthy
backends first, then those of each fallback model in order. Until scoring arrives, backends are
ordered by ``priority`` (lower first), then by fewest requests in flight, then by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import RoutingSettings
from ..errors import NO_BACKENDS_HINT, ModelNotFound, NoHealthyBackend, ServiceUnavailable
from ..registry import Backend, Registry
from .aliases import resolve


@dataclass(frozen=True, slots=True)
class Step:
    backend: Backend
    model: str  # the backend's own name for the model
    fallback: str | None = None  # the fallback model this step serves, if any


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


@dataclass(slots=True)
class Plan:
    requested: str
    resolved: str
    steps: list[Step] = field(default_factory=list)
    exclusions: list[Exclusion] = field(default_factory=list)

    def route_reason(self, index: int) -> str:
        step = self.steps[index]
        if step.fallback is not None:
            return "fallback"
        if index > 0:
            return "failover"
        return "only-candidate" if len(self.steps) == 1 else "priority"


def plan_request(registry: Registry, routing: RoutingSettings, model: str) -> Plan:
    """Plan a request for ``model``; raises ModelNotFound or NoHealthyBackend when nothing fits."""
    resolved = resolve(model, routing.aliases)
    plan = Plan(requested=model, resolved=resolved)
    known = _add_steps(plan, registry, resolved, fallback=None)
    fallbacks = routing.fallbacks.get(resolved) or routing.fallbacks.get(model) or ()
    for name in fallbacks:
        target = resolve(name, routing.aliases)
        known = _add_steps(plan, registry, target, fallback=target) or known
    if plan.steps:
        return plan
    if not known:
        if not len(registry):
            raise ServiceUnavailable(NO_BACKENDS_HINT)
        raise ModelNotFound(model, _available(registry, routing.aliases))
    raise NoHealthyBackend(model, _context(plan, registry, list(fallbacks)))


def _add_steps(plan: Plan, registry: Registry, model: str, *, fallback: str | None) -> bool:
    """Append the healthy backends for ``model``; True when any backend at all lists it."""
    backends = registry.backends_for(model)
    usable: list[tuple[Backend, str]] = []
    for backend in backends:
        own = backend.find_model(model) or model
        if backend.healthy:
            usable.append((backend, own))
        else:
            plan.exclusions.append(_unhealthy(backend, own))
    usable.sort(key=lambda item: (item[0].priority, item[0].in_flight, item[0].name))
    plan.steps.extend(Step(backend, own, fallback) for backend, own in usable)
    return bool(backends)


def _unhealthy(backend: Backend, model: str) -> Exclusion:
    why = backend.unavailable or backend.last_error or "not yet checked"
    return Exclusion(
        backend=backend.name,
        model=model,
        stage="health",
        reason=f"backend is {backend.status.value}: {why}",
        suggested_action="check that the backend is running and reachable from Nexus",
    )


def _available(registry: Registry, aliases: Mapping[str, str]) -> list[str]:
    models = registry.model_ids(healthy_only=True)
    reachable = [alias for alias in aliases if resolve(alias, aliases) in models]
    return sorted({*models, *reachable})


def _context(plan: Plan, registry: Registry, fallbacks: list[str]) -> dict[str, Any]:
    return {
        "model": plan.requested,
        "resolved_model": plan.resolved,
        "fallbacks_tried": fallbacks,
        "available_backends": [b.name for b in registry if b.healthy],
        "excluded": [exclusion.as_dict() for exclusion in plan.exclusions],
    }
