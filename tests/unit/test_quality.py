"""QualityTracker: a rolling window per (backend, model), exclusion over the error-rate threshold
after ``min_requests`` outcomes, a half-open trial every ``trial_interval_seconds``, and the
TTFT penalty. Time is passed in as plain numbers."""

from __future__ import annotations

import pytest

from nexus.config import QualitySettings
from nexus.routing.quality import QualityTracker

SETTINGS = QualitySettings(
    error_rate_threshold=0.5,
    min_requests=4,
    trial_interval_seconds=30,
    window_seconds=300,
    ttft_penalty_threshold_ms=2000,
)
T0 = 1000.0


def tracker(**overrides):
    return QualityTracker(SETTINGS.model_copy(update=overrides))


def record(q, outcomes, now=T0, backend="b", model="m"):
    """Record a string of outcomes: "x" a failure, "." a success."""
    for mark in outcomes:
        q.record(backend, model, mark == ".", None, now)


def test_an_unknown_backend_is_not_excluded():
    verdict = tracker().verdict("b", "m", T0)
    assert (verdict.excluded, verdict.error_rate, verdict.requests) == (False, 0.0, 0)
    assert verdict.avg_ttft_ms is None
    assert not verdict.trial


def test_fewer_than_min_requests_outcomes_are_never_judged():
    q = tracker()
    record(q, "xxx")
    verdict = q.verdict("b", "m", T0)
    assert not verdict.excluded
    assert not verdict.trial
    assert (verdict.error_rate, verdict.requests) == (1.0, 3)


def test_an_error_rate_under_the_threshold_is_not_excluded():
    q = tracker()
    record(q, "x....x")  # 2 of 6
    verdict = q.verdict("b", "m", T0)
    assert not verdict.excluded
    assert verdict.error_rate == pytest.approx(2 / 6)


def test_over_the_threshold_after_min_requests_is_excluded_at_once():
    q = tracker()
    record(q, "x.xx")  # 3 of 4
    verdict = q.verdict("b", "m", T0)
    assert verdict.excluded
    assert not verdict.trial
    assert (verdict.error_rate, verdict.requests) == (0.75, 4)


def test_it_stays_excluded_until_the_trial_interval_has_passed():
    q = tracker()
    record(q, "xxxx")
    for later in (0, 1, 15, 29.9):
        assert q.verdict("b", "m", T0 + later).excluded, later


def test_half_open_lets_exactly_one_request_through_per_interval():
    q = tracker()
    record(q, "xxxx")
    trial = q.verdict("b", "m", T0 + 30)
    assert (trial.excluded, trial.trial) == (False, True)
    again = q.verdict("b", "m", T0 + 30)
    assert (again.excluded, again.trial) == (True, False)
    assert q.verdict("b", "m", T0 + 59.9).excluded
    assert q.verdict("b", "m", T0 + 60).trial
    assert q.verdict("b", "m", T0 + 60).excluded


def test_a_failed_trial_keeps_it_out_until_the_next_interval():
    q = tracker()
    record(q, "xxxx")
    assert q.verdict("b", "m", T0 + 30).trial
    record(q, "x", now=T0 + 31)
    assert q.verdict("b", "m", T0 + 31).excluded
    assert q.verdict("b", "m", T0 + 59).excluded
    assert q.verdict("b", "m", T0 + 60).trial


def test_a_successful_trial_brings_it_back_at_once():
    q = tracker()
    record(q, "xxxx")
    assert q.verdict("b", "m", T0 + 30).trial
    q.record("b", "m", True, 150.0, T0 + 31)
    for later in (31, 32, 33):
        verdict = q.verdict("b", "m", T0 + later)
        assert (verdict.excluded, verdict.trial) == (False, False)
    assert (verdict.error_rate, verdict.requests, verdict.avg_ttft_ms) == (0.0, 1, 150.0)


def test_a_success_that_was_not_the_trial_does_not_clear_a_tripped_record():
    # A request already in flight when the breaker tripped succeeds: 4 failures in 5 is still
    # over the threshold, and no trial has been granted yet.
    q = tracker()
    record(q, "xxxx", now=T0)
    record(q, ".", now=T0 + 1)
    verdict = q.verdict("b", "m", T0 + 2)
    assert (verdict.error_rate, verdict.requests) == (0.8, 5)
    assert verdict.excluded or verdict.trial


def test_failures_older_than_the_window_are_forgotten():
    q = tracker(window_seconds=100)
    record(q, "xxxx", now=T0)
    record(q, "..", now=T0 + 60)
    verdict = q.verdict("b", "m", T0 + 101)  # the four failures have left the window
    assert not verdict.excluded
    assert (verdict.error_rate, verdict.requests) == (0.0, 2)


def test_outcomes_are_kept_per_backend_and_model():
    q = tracker()
    record(q, "xxxx", backend="b", model="m")
    assert q.verdict("b", "other", T0).requests == 0
    assert q.verdict("c", "m", T0).requests == 0
    assert not q.verdict("b", "other", T0).excluded


def test_average_ttft_counts_successes_with_a_ttft_only():
    q = tracker()
    q.record("b", "m", True, 100.0, T0)
    q.record("b", "m", True, 300.0, T0)
    q.record("b", "m", True, None, T0)
    q.record("b", "m", False, 9000.0, T0)
    assert q.verdict("b", "m", T0).avg_ttft_ms == pytest.approx(200.0)


@pytest.mark.parametrize(
    ("avg_ms", "penalty"),
    [(None, 0.0), (1000.0, 0.0), (2000.0, 0.0), (3000.0, 0.5), (4000.0, 1.0), (9000.0, 1.0)],
)
def test_ttft_penalty_grows_past_the_threshold_up_to_all(avg_ms, penalty):
    assert tracker().ttft_penalty(avg_ms) == pytest.approx(penalty)


def test_a_zero_ttft_threshold_turns_the_penalty_off():
    assert tracker(ttft_penalty_threshold_ms=0).ttft_penalty(50_000.0) == 0.0


def test_the_window_stays_bounded_and_its_totals_stay_right():
    from nexus.routing.quality import MAX_OUTCOMES

    tracker = QualityTracker(QualitySettings(window_seconds=10_000, min_requests=1))
    for i in range(MAX_OUTCOMES + 500):
        tracker.record("b", "m", i % 4 != 0, 100.0 + i % 2, now=float(i) / 1000)
    verdict = tracker.verdict("b", "m", now=2.0)
    assert verdict.requests == MAX_OUTCOMES
    assert verdict.error_rate == 0.25
    assert verdict.avg_ttft_ms is not None and 100.0 < verdict.avg_ttft_ms < 101.0
