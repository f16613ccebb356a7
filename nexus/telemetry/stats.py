"""Totals for ``/v1/stats``: requests, successes and errors overall, per backend and per model,
and latency and time-to-first-token percentiles over the most recent requests."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .outcomes import Outcome

RECENT = 2000  # requests the percentiles are taken over


@dataclass(slots=True)
class Tally:
    requests: int = 0
    success: int = 0
    errors: int = 0
    duration_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    ttft_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, outcome: Outcome) -> None:
        self.requests += 1
        if outcome.ok:
            self.success += 1
            self.duration_ms.append(outcome.duration_ms)
            if outcome.ttft_ms is not None:
                self.ttft_ms.append(outcome.ttft_ms)
        else:
            self.errors += 1
        self.prompt_tokens += outcome.prompt_tokens or 0
        self.completion_tokens += outcome.completion_tokens or 0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "success": self.success,
            "errors": self.errors,
            "latency_ms": percentiles(self.duration_ms),
            "ttft_ms": percentiles(self.ttft_ms),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
        }


class Stats:
    """Per-model rows only for models Nexus knows; the rest are pooled as ``other`` so that a
    client inventing names cannot grow them."""

    def __init__(self, known_model: Callable[[str], bool] = lambda _: True) -> None:
        self._known_model = known_model
        self.total = Tally()
        self.backends: dict[str, Tally] = {}
        self.models: dict[str, Tally] = {}

    def __call__(self, batch: list[Outcome]) -> None:
        for outcome in batch:
            self.total.add(outcome)
            if outcome.backend is not None:
                self.backends.setdefault(outcome.backend, Tally()).add(outcome)
            if outcome.model:
                model = outcome.model if self._known_model(outcome.model) else "other"
                self.models.setdefault(model, Tally()).add(outcome)


def percentiles(samples: deque[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}
