"""A key's rate window (nexus/keys/window.py) with the time passed in, never read: requests and
tokens counted in slots of a tenth of a second, a slot counting until all of it has left the last
60 s (rpm requests pass in any 60 s, the next waits for the oldest slot to leave, never more than
rpm in any 60 s), tokens per minute from real usage, max_concurrent, memory bounded
by the slots, carry() across new limits, OpenAI's x-ratelimit-* headers for the limits a key has
(none for a key without limits), and how resets are written."""

from __future__ import annotations

import random
from typing import Any

import pytest

from nexus.keys.window import SLOTS_PER_SECOND, WINDOW, RateWindow, Refusal, duration

T0 = 1_796_000_000.0  # an epoch time, as the key ring's clock gives (a slot's start: T0 * 10 whole)


def secs(expected: float) -> Any:
    """``expected`` seconds, give or take what T0 * 10 loses of an epoch-sized float."""
    return pytest.approx(expected, abs=1e-6)


def pairs(window: RateWindow, now: float) -> list[tuple[bytes, bytes]]:
    """The window's header lines as pairs; every line ends with CRLF, none is empty."""
    head = window.head(now)
    assert head == b"" or head.endswith(b"\r\n")
    lines = head.split(b"\r\n")[:-1]
    assert all(b": " in line and b"\n" not in line and b"\r" not in line for line in lines)
    return [(name, value) for name, _, value in (line.partition(b": ") for line in lines)]


def headers(window: RateWindow, now: float) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in pairs(window, now)}


def done(window: RateWindow, now: float, tokens: int) -> None:
    """A request ended: its call in flight given back (the middleware), its tokens counted
    (``KeyRing.count``, from its outcome)."""
    window.in_flight -= 1
    window.used(now, tokens)


def refused(got: Refusal | bytes, limit: str) -> Refusal:
    assert isinstance(got, Refusal), f"expected a {limit} refusal, the request was admitted"
    assert got.limit == limit
    return got


# --- requests per minute ----------------------------------------------------------------------


def test_rpm_requests_pass_then_the_next_waits_for_the_oldest_slot_to_leave() -> None:
    window = RateWindow(rpm=3, tpm=None, max_concurrent=None)
    for t in (0, 10, 20):
        assert isinstance(window.admit(T0 + t), bytes)

    refusal = refused(window.admit(T0 + 30), "rpm")

    assert refusal.retry_after == secs(30.1)  # the slot [T0, T0 + 0.1) leaves at T0 + 60.1
    assert "3 requests per minute" in refusal.message


def test_rpm_after_the_oldest_slot_leaves_exactly_one_more_passes() -> None:
    window = RateWindow(rpm=3, tpm=None, max_concurrent=None)
    for t in (0, 10, 20):
        assert isinstance(window.admit(T0 + t), bytes)
    refused(window.admit(T0 + 59.9), "rpm")
    # 60 s after the first request its slot still counts: refused up to a tenth of a second early
    assert refused(window.admit(T0 + WINDOW), "rpm").retry_after == secs(0.1)

    assert isinstance(window.admit(T0 + WINDOW + 0.1), bytes)  # the slot of T0 has left
    again = refused(window.admit(T0 + WINDOW + 0.1), "rpm")  # the one of T0 + 10 has not

    assert again.retry_after == secs(10.0)  # it leaves at T0 + 70.1


def test_rpm_window_slides_over_any_60_seconds() -> None:
    window = RateWindow(rpm=2, tpm=None, max_concurrent=None)
    assert isinstance(window.admit(T0), bytes)
    assert isinstance(
        window.admit(T0 + 59.9), bytes
    )  # slot [T0 + 59.9, T0 + 60): leaves at T0 + 120

    assert refused(window.admit(T0 + 59.95), "rpm").retry_after == secs(0.15)
    assert refused(window.admit(T0 + 60.0), "rpm").retry_after == secs(0.1)
    assert isinstance(window.admit(T0 + 60.1), bytes)
    assert refused(window.admit(T0 + 60.1), "rpm").retry_after == secs(59.9)
    assert refused(window.admit(T0 + 119.95), "rpm").retry_after == secs(0.05)
    assert isinstance(window.admit(T0 + 120.0), bytes)


def test_a_burst_lets_exactly_rpm_through() -> None:
    window = RateWindow(rpm=50, tpm=None, max_concurrent=None)

    burst = [window.admit(T0 + 0.05) for _ in range(200)]

    assert sum(isinstance(got, bytes) for got in burst) == 50
    refusals = [refused(got, "rpm") for got in burst if not isinstance(got, bytes)]
    assert len(refusals) == 150
    assert {round(r.retry_after, 6) for r in refusals} == {60.05}  # all wait for the one slot
    still = [window.admit(T0 + 60.05) for _ in range(10)]  # still in the minute
    assert all(isinstance(got, Refusal) for got in still)
    again = [window.admit(T0 + 60.1) for _ in range(200)]  # the slot has left: 50 more
    assert sum(isinstance(got, bytes) for got in again) == 50


def test_never_more_than_rpm_in_any_60_seconds_and_refused_at_most_a_slot_early() -> None:
    rpm = 20
    window = RateWindow(rpm=rpm, tpm=None, max_concurrent=None)
    draw = random.Random(12)
    admitted: list[float] = []
    refusals = 0
    now = T0
    while now < T0 + 300:
        now += draw.choice((0.0, 0.013, 0.05, 0.37, 1.9, 4.4))  # bursts and pauses
        if isinstance(window.admit(now), bytes):
            # the ones admitted in the 60 s before this one, this one included
            assert sum(1 for t in admitted if now - t < WINDOW) < rpm
            admitted.append(now)
        else:
            refusals += 1
            # an exact log would refuse it too, given a tenth of a second's slack
            assert sum(1 for t in admitted if now - t < WINDOW + 0.1 + 1e-6) >= rpm

    assert refusals > 100 and len(admitted) > 4 * rpm  # both sides of the limit were tried


def test_a_refused_request_is_not_counted() -> None:
    window = RateWindow(rpm=2, tpm=None, max_concurrent=None)
    window.admit(T0)
    window.admit(T0 + 1)
    for _ in range(5):
        refused(window.admit(T0 + 2), "rpm")

    assert window.in_flight == 2
    assert headers(window, T0 + 2)["x-ratelimit-remaining-requests"] == "0"
    assert isinstance(window.admit(T0 + 60.1), bytes)  # only the first left: one count, not six


# --- tokens per minute ------------------------------------------------------------------------


def test_tpm_refused_once_used_reaches_the_limit_until_those_tokens_age_out() -> None:
    window = RateWindow(rpm=None, tpm=100, max_concurrent=None)
    assert isinstance(window.admit(T0), bytes)
    done(window, T0 + 0.5, 60)  # slot [T0 + 0.5, T0 + 0.6)
    assert isinstance(window.admit(T0 + 1), bytes)  # 60 < 100
    done(window, T0 + 10.2, 40)  # slot [T0 + 10.2, T0 + 10.3): 100 used

    refusal = refused(window.admit(T0 + 11), "tpm")

    assert refusal.retry_after == secs(49.6)  # the first slot ends at T0 + 0.6, then 60 s
    assert "100 tokens per minute" in refusal.message and "100 used" in refusal.message
    assert refused(window.admit(T0 + 60.5), "tpm").retry_after == secs(0.1)
    assert isinstance(window.admit(T0 + 60.6), bytes)  # 40 left in the minute
    assert window.tokens_used(T0 + 60.6) == 40


def test_tpm_retry_waits_for_as_many_slots_as_needed() -> None:
    window = RateWindow(rpm=None, tpm=100, max_concurrent=None)
    for t, tokens in ((0, 10), (5, 30), (10, 80)):  # 120 used: 21 must leave
        window.admit(T0 + t)
        done(window, T0 + t, tokens)

    refusal = refused(window.admit(T0 + 20), "tpm")

    assert refusal.retry_after == secs(45.1)  # the slots of T0 and T0 + 5 must go
    assert refused(window.admit(T0 + 65.0), "tpm").retry_after == secs(0.1)  # 110 left
    assert isinstance(window.admit(T0 + 65.1), bytes)  # 80 left
    assert window.tokens_used(T0 + 65.1) == 80


def test_tpm_tokens_of_one_tenth_of_a_second_share_a_slot() -> None:
    window = RateWindow(rpm=None, tpm=100, max_concurrent=None)
    for t in (3.22, 3.27):  # both in [T0 + 3.2, T0 + 3.3)
        window.admit(T0 + t)
        done(window, T0 + t, 50)

    assert not window._tokens.older and window._tokens.amount == 100  # the current slot only
    assert refused(window.admit(T0 + 4), "tpm").retry_after == secs(59.3)
    assert refused(window.admit(T0 + 63.25), "tpm").retry_after == secs(0.05)  # both still in
    assert isinstance(window.admit(T0 + 63.3), bytes)  # both leave at the same time
    assert window.tokens_used(T0 + 63.3) == 0


def test_tpm_calls_already_admitted_may_carry_it_past_the_limit() -> None:
    window = RateWindow(rpm=None, tpm=100, max_concurrent=None)
    assert isinstance(window.admit(T0), bytes)
    assert isinstance(window.admit(T0), bytes)  # nothing used yet: both in
    done(window, T0 + 1, 90)
    done(window, T0 + 1, 90)

    assert window.tokens_used(T0 + 2) == 180
    assert headers(window, T0 + 2)["x-ratelimit-remaining-tokens"] == "0"
    refused(window.admit(T0 + 2), "tpm")


def test_usage_is_not_kept_without_tpm_or_without_tokens() -> None:
    window = RateWindow(rpm=None, tpm=None, max_concurrent=None)
    window.admit(T0)
    done(window, T0, 1_000_000)
    assert window.tokens_used(T0) == 0

    counted = RateWindow(rpm=None, tpm=10, max_concurrent=None)
    counted.admit(T0)
    done(counted, T0, 0)
    assert counted.tokens_used(T0) == 0
    assert isinstance(counted.admit(T0 + 1), bytes)


# --- calls in flight ------------------------------------------------------------------------


def test_max_concurrent_refuses_while_full_and_done_frees_a_place() -> None:
    window = RateWindow(rpm=None, tpm=None, max_concurrent=2)
    assert isinstance(window.admit(T0), bytes)
    assert isinstance(window.admit(T0), bytes)

    refusal = refused(window.admit(T0), "max_concurrent")
    assert refusal.retry_after == 1.0
    assert "max_concurrent" in refusal.message

    done(window, T0 + 0.5, 0)
    assert window.in_flight == 1
    assert isinstance(window.admit(T0 + 0.5), bytes)
    refused(window.admit(T0 + 0.5), "max_concurrent")


def test_a_request_refused_for_concurrency_takes_no_rpm_slot() -> None:
    window = RateWindow(rpm=3, tpm=None, max_concurrent=1)
    assert isinstance(window.admit(T0), bytes)
    refused(window.admit(T0 + 1), "max_concurrent")
    done(window, T0 + 2, 0)

    assert headers(window, T0 + 2)["x-ratelimit-remaining-requests"] == "2"
    assert isinstance(window.admit(T0 + 3), bytes)


# --- headers ----------------------------------------------------------------------------------


def test_headers_for_rpm_only() -> None:
    window = RateWindow(rpm=10, tpm=None, max_concurrent=None)
    for t in (0, 10, 20):
        window.admit(T0 + t)

    assert pairs(window, T0 + 30) == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"7"),
        (b"x-ratelimit-reset-requests", b"31s"),  # 30.1 s until the oldest slot leaves, rounded up
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
    done(window, T0 + 0.5, 60)
    window.admit(T0 + 30.25)

    assert headers(window, T0 + 30.5) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "30s",  # 29.6 s until T0 + 60.1, rounded up
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "40",
        "x-ratelimit-reset-tokens": "31s",  # 30.1 s: the slot of T0 + 0.5 leaves at T0 + 60.6
    }
    later = headers(window, T0 + 61)  # the first request and its tokens have left
    assert later["x-ratelimit-remaining-requests"] == "4"
    assert later["x-ratelimit-reset-requests"] == "30s"  # 29.3 s until T0 + 30.2's slot leaves
    assert later["x-ratelimit-remaining-tokens"] == "100"
    assert later["x-ratelimit-reset-tokens"] == "0ms"


def test_admit_answers_the_headers_with_the_request_counted() -> None:
    window = RateWindow(rpm=3, tpm=100, max_concurrent=None)
    window.admit(T0)
    done(window, T0 + 0.5, 70)
    window.admit(T0 + 20)

    got = window.admit(T0 + 61)  # drops the request of T0 and the 70 tokens, counts this one

    assert got == window.head(T0 + 61)
    assert headers(window, T0 + 61) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "20s",  # 19.1 s until T0 + 20's slot leaves, rounded up
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "0ms",
    }


def test_headers_only_for_the_limits_the_key_has() -> None:
    tokens_only = RateWindow(rpm=None, tpm=500, max_concurrent=3)
    assert [name for name, _ in pairs(tokens_only, T0)] == [
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    ]


def test_a_key_without_limits_gives_no_headers_and_is_never_refused() -> None:
    window = RateWindow(rpm=None, tpm=None, max_concurrent=None)
    for i in range(1000):
        assert isinstance(window.admit(T0 + i / 100), bytes)
        done(window, T0 + i / 100, 100)

    assert window.head(T0 + 10) == b""
    assert window.in_flight == 0


# --- memory and new limits -------------------------------------------------------------------


def test_memory_stays_bounded_by_the_slots_of_a_minute() -> None:
    window = RateWindow(rpm=1_000_000, tpm=1_000_000_000, max_concurrent=None)
    count = 100_000
    for i in range(count):  # spread over 60 s
        now = T0 + i * WINDOW / count
        assert isinstance(window.admit(now), bytes)
        done(window, now, 3)

    # the older slots, and the current one
    assert len(window._requests.older) + 1 <= WINDOW * SLOTS_PER_SECOND == 600
    assert len(window._tokens.older) + 1 <= 600
    end = T0 + WINDOW - 0.05
    assert headers(window, end)["x-ratelimit-remaining-requests"] == str(1_000_000 - count)
    assert window.tokens_used(end) == 3 * count  # every one still counted, in few slots


def test_carry_keeps_the_minute_and_the_calls_in_flight() -> None:
    old = RateWindow(rpm=3, tpm=100, max_concurrent=None)
    for t in (0, 10, 20):
        assert isinstance(old.admit(T0 + t), bytes)
    done(old, T0 + 21, 60)  # two still in flight
    new = RateWindow(rpm=5, tpm=50, max_concurrent=2)  # a PATCH: new limits

    new.carry(old)

    assert new.in_flight == 2
    refused(new.admit(T0 + 30), "max_concurrent")  # the two carried calls fill it
    done(new, T0 + 30, 0)
    refusal = refused(new.admit(T0 + 30), "tpm")  # 60 carried tokens, over the new 50
    assert refusal.retry_after == secs(51.1)  # the slot of T0 + 21 leaves at T0 + 81.1
    assert headers(new, T0 + 30)["x-ratelimit-remaining-requests"] == "2"  # 3 carried of 5

    more = RateWindow(rpm=4, tpm=None, max_concurrent=None)
    more.carry(new)
    assert isinstance(more.admit(T0 + 31), bytes)  # the fourth in the minute
    assert refused(more.admit(T0 + 31), "rpm").retry_after == secs(29.1)  # T0's slot: T0 + 60.1


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


def test_a_clock_set_back_counts_in_the_latest_slot() -> None:
    window = RateWindow(rpm=5, tpm=None, max_concurrent=None)
    window.admit(T0 + 100)
    window.admit(T0)  # the clock was set back 100 s

    assert headers(window, T0) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "1m1s",  # from the latest slot
    }
    window.admit(T0 + 100.5)  # the clock has caught up: the slot of T0 + 100 is an older one
    assert headers(window, T0 + 100.5)["x-ratelimit-reset-requests"] == "1m0s"  # 59.6 s
    assert headers(window, T0 + 160.5)["x-ratelimit-remaining-requests"] == "4"
