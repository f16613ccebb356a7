"""Traffic policies: the first ``model_pattern`` glob that matches a model decides its privacy
requirement, minimum tier, most a request may cost and whether fallbacks may serve it. Compiled
once at start-up; a bad policy stops start-up.

A request known by several names (an alias, its hops, the model it resolves to) gets the strictest
of each name's policy: restricted if any of them is, the highest minimum tier of any, the lowest
cost cap, no fallbacks if any forbids them. So an alias
can neither lift its target's restriction nor be used to lower its tier, and a policy written for
an alias holds for what it names."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import TrafficPolicy


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str
    regex: re.Pattern[str]
    restricted: bool
    min_tier: int | None
    max_cost: float | None = None
    fallback_allowed: bool = True


class Policies:
    def __init__(self, policies: Sequence[TrafficPolicy]) -> None:
        self.rules = [compile_rule(policy) for policy in policies]

    def match(self, model: str) -> Rule | None:
        for rule in self.rules:
            if rule.regex.match(model):
                return rule
        return None

    def strictest(self, names: Iterable[str]) -> Rule | None:
        """Each name's matching rule, combined taking the strictest of each requirement."""
        if not self.rules:
            return None
        found: list[Rule] = []
        for name in names:
            rule = self.match(name)
            if rule is not None and rule not in found:
                found.append(rule)
        if len(found) < 2:
            return found[0] if found else None
        tiers = [rule.min_tier for rule in found if rule.min_tier is not None]
        caps = [rule.max_cost for rule in found if rule.max_cost is not None]
        return Rule(
            " + ".join(rule.pattern for rule in found),
            found[0].regex,
            any(rule.restricted for rule in found),
            max(tiers) if tiers else None,
            min(caps) if caps else None,
            all(rule.fallback_allowed for rule in found),
        )


def compile_rule(policy: TrafficPolicy) -> Rule:
    try:
        regex = re.compile(fnmatch.translate(policy.model_pattern))
    except re.error as exc:  # fail closed: a policy that cannot load is not silently dropped
        raise ValueError(f"policy model_pattern {policy.model_pattern!r}: {exc}") from exc
    return Rule(
        policy.model_pattern,
        regex,
        policy.privacy == "restricted",
        policy.min_tier,
        policy.max_cost_per_request,
        policy.fallback_allowed,
    )
