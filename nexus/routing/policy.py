"""Traffic policies: the first ``model_pattern`` glob that matches a model decides its privacy
requirement and minimum tier. Compiled once at start-up; a bad policy stops start-up."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import TrafficPolicy


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str
    regex: re.Pattern[str]
    restricted: bool
    min_tier: int | None


class Policies:
    def __init__(self, policies: Sequence[TrafficPolicy]) -> None:
        self.rules = [compile_rule(policy) for policy in policies]

    def match(self, model: str) -> Rule | None:
        for rule in self.rules:
            if rule.regex.match(model):
                return rule
        return None


def compile_rule(policy: TrafficPolicy) -> Rule:
    try:
        regex = re.compile(fnmatch.translate(policy.model_pattern))
    except re.error as exc:  # fail closed: a policy that cannot load is not silently dropped
        raise ValueError(f"policy model_pattern {policy.model_pattern!r}: {exc}") from exc
    return Rule(policy.model_pattern, regex, policy.privacy == "restricted", policy.min_tier)
