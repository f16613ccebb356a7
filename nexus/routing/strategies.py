"""Ordering the backends that survived every stage: the strategies, and smart's score. Pure."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..config import RoutingWeights
from ..registry import Backend


@dataclass(slots=True, eq=False)  # compared by identity: cheap membership tests
class Candidate:
    backend: Backend
    model: str  # the backend's own name for the model
    fallback: str | None
    capacity: int
    ttft_penalty: float = 0.0  # 0..1 of the score taken away for slow first tokens
    score: float = 0.0
    trial: bool = False  # the half-open trial of a backend excluded for its error rate

    @property
    def load(self) -> float:
        return self.backend.in_flight / self.capacity


def smart_score(candidate: Candidate, weights: RoutingWeights, stream: bool) -> float:
    """Priority, load against capacity and real latency, weighted; then the TTFT penalty.

    Each part is 0..100: priority ``100 - priority`` (lower numbers preferred), load
    ``100 * (1 - in_flight / capacity)``, latency ``100 - ms / 10`` from the moving average of
    real requests (time to first event for streams), the probe's latency until there is one.
    """
    backend = candidate.backend
    priority = 100 - min(max(backend.priority, 0), 100)
    load = 100 * max(0.0, 1 - candidate.load)
    measured = backend.ewma_ttft_ms if stream else backend.ewma_latency_ms
    latency_ms = measured if measured is not None else backend.latency_ms
    latency = 100.0 if latency_ms is None else 100 - min(latency_ms / 10, 100)
    total = weights.priority + weights.load + weights.latency or 1
    score = (priority * weights.priority + load * weights.load + latency * weights.latency) / total
    return score * (1 - candidate.ttft_penalty)


class Strategies:
    """Keeps what strategies remember (round-robin counters) and the random source."""

    def __init__(self, weights: RoutingWeights, rng: random.Random | None = None) -> None:
        self.weights = weights
        self.rng = rng or random.Random()
        self._turns: dict[str, int] = {}
        self._order: dict[str, Callable[[list[Candidate], str, bool], list[Candidate]]] = {
            "smart": self._smart,
            "round_robin": self._round_robin,
            "priority_only": self._priority,
            "random": self._random,
            "least_loaded": self._least_loaded,
        }

    def order(
        self, strategy: str, candidates: list[Candidate], model: str, stream: bool
    ) -> list[Candidate]:
        if len(candidates) == 1:  # nothing to order (and no turn to take): the common case
            return candidates
        return self._order[strategy](candidates, model, stream)

    def _smart(self, candidates: list[Candidate], model: str, stream: bool) -> list[Candidate]:
        for candidate in candidates:
            candidate.score = smart_score(candidate, self.weights, stream)
        return sorted(candidates, key=lambda c: (-c.score, c.backend.priority, c.backend.name))

    def _round_robin(self, candidates: list[Candidate], model: str, _: bool) -> list[Candidate]:
        ordered = sorted(candidates, key=lambda c: c.backend.name)
        turn = self._turns.get(model, 0)
        self._turns[model] = turn + 1
        start = turn % len(ordered) if ordered else 0
        return ordered[start:] + ordered[:start]

    def _priority(self, candidates: list[Candidate], model: str, _: bool) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (c.backend.priority, c.backend.name))

    def _random(self, candidates: list[Candidate], model: str, _: bool) -> list[Candidate]:
        ordered = sorted(candidates, key=lambda c: c.backend.name)
        self.rng.shuffle(ordered)
        return ordered

    def _least_loaded(self, candidates: list[Candidate], model: str, _: bool) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (c.load, c.backend.priority, c.backend.name))


REASONS = {
    "smart": "highest-score",
    "round_robin": "round-robin",
    "priority_only": "priority",
    "random": "random",
    "least_loaded": "least-loaded",
}
