"""A key's rate window (nexus/keys/window.py) with the time passed in, never read: the exact
sliding rpm log (rpm requests pass in any 60 s, the next waits for the oldest to leave), tokens per
minute from real usage in one-second buckets, max_concurrent with done(), OpenAI's x-ratelimit-*
headers for the limits a key has (none for a key without limits), and how resets are written."""

from __future__ import annotations

import pytest

from nexus.keys.window import WINDOW, RateWindow, Refusal, duration

T0 = 1_796_000_000.0  # an epoch time, as the key ring's clock gives


def headers(window: RateWindow, now: float) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in window.headers(now)}


def refused(got: Refusal | None, limit: str) -> Refusal:
    assert got is not None, f"expected a {limit} refusal, the request was admitted"
    assert got.limit == limit
    return got


# --- requests per minute ----------------------------------------------------------------------


def test_rpm_requests_pass_then_the_next_waits_for_the_oldest_to_leave() -> None:
    window = RateWindow(rpm=3, tpm=None, max_concurrent=None)
    for t in (0, 10, 20):
        assert window.admit(T0 + t) is None

    refusal = refused(window.admit(T0 + 30), "rpm")

    assert refusal.retry_after == pytest.approx(30.0)  # the one at T0 leaves at T0 + 60
    assert "3 requests per minute" in refusal.message


def test_rpm_after_60_seconds_exactly_one_more_passes() -> None:
    window = RateWindow(rpm=3, tpm=None, max_concurrent=None)
    for t in (0, 10, 20):
        assert window.admit(T0 + t) is None
    refused(window.admit(T0 + 59.9), "rpm")

    assert window.admit(T0 + WINDOW) is None  # the one at T0 has left
    again = refused(window.admit(T0 + WINDOW), "rpm")  # the one at T0 + 10 has not

    assert again.retry_after == pytest.approx(10.0)


def test_rpm_window_slides_over_any_60_seconds() -> None:
    window = RateWindow(rpm=2, tpm=None, max_concurrent=None)
    assert window.admit(T0) is None
    assert window.admit(T0 + 59.9) is None

    assert refused(window.admit(T0 + 59.95), "rpm").retry_after == pytest.approx(0.05)
    assert window.admit(T0 + 60.0) is None
    assert refused(window.admit(T0 + 60.0), "rpm").retry_after == pytest.approx(59.9)
    assert window.admit(T0 + 119.9) is None


def test_a_refused_request_is_not_counted() -> None:
    window = RateWindow(rpm=2, tpm=None, max_concurrent=None)
    window.admit(T0)
    window.admit(T0 + 1)
    for _ in range(5):
        refused(window.admit(T0 + 2), "rpm")

    assert window.in_flight == 2
    assert headers(window, T0 + 2)["x-ratelimit-remaining-requests"] == "0"
    assert window.admit(T0 + 60) is None  # only the first left: one slot, not six


# --- tokens per minute ------------------------------------------------------------------------


def test_tpm_refused_once_used_reaches_the_limit_until_those_tokens_age_out() -> None:
    window = RateWindow(rpm=None, tpm=100, max_concurrent=None)
    assert window.admit(T0) is None
    window.done(T0 + 0.5, 60)  # bucket of second T0
    assert window.admit(T0 + 1) is None  # 60 < 100
    window.done(T0 + 10.2, 40)  # bucket of second T0 + 10: 100 used

    refusal = refused(window.admit(T0 + 11), "tpm")

    assert refusal.retry_after == pytest.approx(50.0)  # second T0 ends at T0 + 1, then 60 s
    assert "100 tokens per minute" in refusal.message and "100 used" in refusal.message
    assert refused(window.admit(T0 + 60.9), "tpm").retry_after == pytest.approx(0.1)
    assert window.admit(T0 + 61) is None  # 40 left in the minute
    assert window.tokens_used(T0 + 61) == 40


def test_tpm_retry_waits_for_as_many_buckets_as_needed() -> None:
    window = RateWindow(rpm=None, tpm=100, max_concurrent=None)
    for t, tokens in ((0, 10), (5, 30), (10, 80)):  # 120 used: 21 must leave
        window.admit(T0 + t)
        window.done(T0 + t, tokens)

    refusal = refused(window.admit(T0 + 20), "tpm")

    assert refusal.retry_after == pytest.approx(46.0)  # the buckets of T0 and T0 + 5 must go
    assert refused(window.admit(T0 + 65.9), "tpm").retry_after == pytest.approx(0.1)  # 110 left
    assert window.admit(T0 + 66) is None  # 80 left


def test_tpm_tokens_of_one_second_share_a_bucket() -> None:
    window = RateWindow(rpm=None, tpm=100, max_concurrent=None)
    for t in (3.2, 3.7):
        window.admit(T0 + t)
        window.done(T0 + t, 50)

    assert refused(window.admit(T0 + 4), "tpm").retry_after == pytest.approx(60.0)
    assert window.admit(T0 + 64) is None  # both leave at the same time
    assert window.tokens_used(T0 + 64) == 0


def test_tpm_calls_already_admitted_may_carry_it_past_the_limit() -> None:
    window = RateWindow(rpm=None, tpm=100, max_concurrent=None)
    assert window.admit(T0) is None
    assert window.admit(T0) is None  # nothing used yet: both in
    window.done(T0 + 1, 90)
    window.done(T0 + 1, 90)

    assert window.tokens_used(T0 + 2) == 180
    assert headers(window, T0 + 2)["x-ratelimit-remaining-tokens"] == "0"
    refused(window.admit(T0 + 2), "tpm")


def test_usage_is_not_kept_without_tpm_or_without_tokens() -> None:
    window = RateWindow(rpm=None, tpm=None, max_concurrent=None)
    window.admit(T0)
    window.done(T0, 1_000_000)
    assert window.tokens_used(T0) == 0

    counted = RateWindow(rpm=None, tpm=10, max_concurrent=None)
    counted.admit(T0)
    counted.done(T0, 0)
    assert counted.tokens_used(T0) == 0
    assert counted.admit(T0 + 1) is None


# --- calls in flight ------------------------------------------------------------------------


def test_max_concurrent_refuses_while_full_and_done_frees_a_place() -> None:
    window = RateWindow(rpm=None, tpm=None, max_concurrent=2)
    assert window.admit(T0) is None
    assert window.admit(T0) is None

    refusal = refused(window.admit(T0), "max_concurrent")
    assert refusal.retry_after == 1.0
    assert "max_concurrent" in refusal.message

    window.done(T0 + 0.5, 0)
    assert window.in_flight == 1
    assert window.admit(T0 + 0.5) is None
    refused(window.admit(T0 + 0.5), "max_concurrent")


def test_a_request_refused_for_concurrency_takes_no_rpm_slot() -> None:
    window = RateWindow(rpm=3, tpm=None, max_concurrent=1)
    assert window.admit(T0) is None
    refused(window.admit(T0 + 1), "max_concurrent")
    window.done(T0 + 2, 0)

    assert headers(window, T0 + 2)["x-ratelimit-remaining-requests"] == "2"
    assert window.admit(T0 + 3) is None


# --- headers ----------------------------------------------------------------------------------


def test_headers_for_rpm_only() -> None:
    window = RateWindow(rpm=10, tpm=None, max_concurrent=None)
    for t in (0, 10, 20):
        window.admit(T0 + t)

    assert window.headers(T0 + 30) == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"7"),
        (b"x-ratelimit-reset-requests", b"30s"),  # until the oldest leaves
    ]


def test_headers_of_a_fresh_window_show_the_whole_limit() -> None:
    window = RateWindow(rpm=50, tpm=1000, max_concurrent=None)

    assert headers(window, T0) == {
        "x-ratelimit-limit-requests": "50",
        "x-ratelimit-remaining-requests": "50",
        "x-ratelimit-reset-requests": "0ms",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "0ms",
    }


def test_headers_for_rpm_and_tpm_follow_the_window() -> None:
    window = RateWindow(rpm=5, tpm=100, max_concurrent=None)
    window.admit(T0)
    window.done(T0 + 0.5, 60)
    window.admit(T0 + 30.25)

    assert headers(window, T0 + 30.5) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "30s",  # 29.5 s, rounded up
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "40",
        "x-ratelimit-reset-tokens": "31s",  # second T0 leaves at T0 + 61
    }
    later = headers(window, T0 + 61)  # the first request and its tokens have left
    assert later["x-ratelimit-remaining-requests"] == "4"
    assert later["x-ratelimit-reset-requests"] == "30s"  # 29.25 s until T0 + 30.25 leaves
    assert later["x-ratelimit-remaining-tokens"] == "100"
    assert later["x-ratelimit-reset-tokens"] == "0ms"


def test_headers_only_for_the_limits_the_key_has() -> None:
    tokens_only = RateWindow(rpm=None, tpm=500, max_concurrent=3)
    assert [name for name, _ in tokens_only.headers(T0)] == [
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    ]


def test_a_key_without_limits_gives_no_headers_and_is_never_refused() -> None:
    window = RateWindow(rpm=None, tpm=None, max_concurrent=None)
    for i in range(1000):
        assert window.admit(T0 + i / 100) is None
        window.done(T0 + i / 100, 100)

    assert window.headers(T0 + 10) == []
    assert window.in_flight == 0


# --- how resets are written -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0ms"),
        (-0.5, "0ms"),
        (0.02, "20ms"),
        (0.0201, "21ms"),  # rounded up: a client that waits that long is not refused
        (0.5, "500ms"),
        (1.0, "1s"),
        (1.2, "2s"),
        (59.0, "59s"),
        (59.5, "1m0s"),
        (60.0, "1m0s"),
        (61.0, "1m1s"),
        (125.3, "2m6s"),
        (360.0, "6m0s"),
    ],
)
def test_duration_as_openai_writes_resets(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown
