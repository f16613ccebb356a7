"""Quality from real traffic: per backend and model, a rolling window of outcomes and TTFTs.

A backend whose error rate over the window reaches ``error_rate_threshold`` (with at least
``min_requests`` outcomes) is excluded, except that every ``trial_interval_seconds`` one request
tries it first (half-open); when that trial succeeds its record is cleared and it is back. One whose
average TTFT exceeds ``ttft_penalty_threshold_ms`` keeps serving but scores lower. Pure: the
clock is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import QualitySettings

Key = tuple[str, str]  # (backend, model)


MAX_OUTCOMES = 1000  # per backend and model: the newest count, whatever the window's length


@dataclass(slots=True)
class Window:
    """Outcomes in arrival order, with running totals so that a verdict costs O(1)."""

    outcomes: deque[tuple[float, bool, float | None]] = field(default_factory=deque)
    errors: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    last_trial: float = float("-inf")  # when the breaker tripped, or last let a trial through
    trial_pending: bool = False  # a trial was let through and has not answered yet

    def add(self, now: float, ok: bool, ttft_ms: float | None) -> None:
        self.outcomes.append((now, ok, ttft_ms))
        if not ok:
            self.errors += 1
        elif ttft_ms is not None:
            self.ttft_sum += ttft_ms
            self.ttft_count += 1
        if len(self.outcomes) > MAX_OUTCOMES:
            self._drop()

    def trim(self, now: float, span: float) -> None:
        while self.outcomes and now - self.outcomes[0][0] > span:
            self._drop()

    def clear(self) -> None:
        self.outcomes.clear()
        self.errors = self.ttft_count = 0
        self.ttft_sum = 0.0

    def _drop(self) -> None:
        _, ok, ttft_ms = self.outcomes.popleft()
        if not ok:
            self.errors -= 1
        elif ttft_ms is not None:
            self.ttft_sum -= ttft_ms
            self.ttft_count -= 1


@dataclass(frozen=True, slots=True)
class Verdict:
    excluded: bool
    error_rate: float
    requests: int
    avg_ttft_ms: float | None
    trial: bool = False  # allowed through as the half-open trial


class QualityTracker:
    def __init__(self, settings: QualitySettings) -> None:
        self.settings = settings
        self._windows: dict[Key, Window] = {}

    def record(self, backend: str, model: str, ok: bool, ttft_ms: float | None, now: float) -> None:
        window = self._windows.setdefault((backend, model), Window())
        window.trim(now, self.settings.window_seconds)
        was_failing = self._failing(window)
        if window.trial_pending:
            window.trial_pending = False
            if ok:  # the trial worked: close the breaker, start afresh
                window.clear()
        window.add(now, ok, ttft_ms)
        if not ok and not was_failing and self._failing(window):
            window.last_trial = now  # just tripped: the first trial comes an interval later

    def verdict(self, backend: str, model: str, now: float) -> Verdict:
        window = self._windows.get((backend, model))
        if window is None:
            return Verdict(False, 0.0, 0, None)
        window.trim(now, self.settings.window_seconds)
        count = len(window.outcomes)
        rate = window.errors / count if count else 0.0
        avg = window.ttft_sum / window.ttft_count if window.ttft_count else None
        if not self._failing(window):
            return Verdict(False, rate, count, avg)
        if now - window.last_trial >= self.settings.trial_interval_seconds:
            window.last_trial = now
            window.trial_pending = True
            return Verdict(False, rate, count, avg, trial=True)
        return Verdict(True, rate, count, avg)

    def ttft_penalty(self, avg_ttft_ms: float | None) -> float:
        """The share of a score taken away for a slow first token: 0 (none) to 1 (all)."""
        limit = self.settings.ttft_penalty_threshold_ms
        if avg_ttft_ms is None or limit <= 0 or avg_ttft_ms <= limit:
            return 0.0
        return min((avg_ttft_ms - limit) / limit, 1.0)

    def _failing(self, window: Window) -> bool:
        count = len(window.outcomes)
        return (
            count >= self.settings.min_requests
            and window.errors / count >= self.settings.error_rate_threshold
        )
