"""One key's rate limits over the last minute: requests (exact), tokens, and calls in flight.

Requests are a sliding log of admission times, at most ``rpm`` long, so exactly ``rpm`` requests
pass in any 60 seconds. Tokens come from real usage when a request ends, kept in one-second
buckets (at most 60), so a key at its ``tpm`` is refused until enough of them age out; calls
already admitted may carry it past ``tpm`` (their use is not known in advance).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: str  # "rpm", "tpm" or "max_concurrent"
    message: str
    retry_after: float  # seconds


class RateWindow:
    __slots__ = ("rpm", "tpm", "max_concurrent", "in_flight", "_times", "_buckets", "_tokens")

    def __init__(self, rpm: int | None, tpm: int | None, max_concurrent: int | None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self._times: deque[float] = deque()
        self._buckets: deque[list[float]] = deque()  # [second, tokens]
        self._tokens = 0

    def admit(self, now: float) -> Refusal | None:
        """Count a request in, or say which limit it meets and when to retry."""
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return Refusal(
                "max_concurrent",
                f"this key has {self.in_flight} requests in flight, its max_concurrent",
                1.0,
            )
        times = self._times
        if self.rpm is not None:
            horizon = now - WINDOW
            while times and times[0] <= horizon:
                times.popleft()
            if len(times) >= self.rpm:
                wait = times[0] + WINDOW - now
                return Refusal("rpm", f"this key's limit of {self.rpm} requests per minute "
                               "is reached", wait)  # fmt: skip
        if self.tpm is not None:
            used = self.tokens_used(now)
            if used >= self.tpm:
                return Refusal("tpm", f"this key's limit of {self.tpm} tokens per minute is "
                               f"reached ({used} used)", self._tokens_free_in(now))  # fmt: skip
        if self.rpm is not None:
            times.append(now)
        self.in_flight += 1
        return None

    def done(self, now: float, tokens: int) -> None:
        self.in_flight -= 1
        if self.tpm is None or tokens <= 0:
            return
        second = math.floor(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += tokens
        else:
            buckets.append([second, tokens])
        self._tokens += tokens

    def tokens_used(self, now: float) -> int:
        buckets = self._buckets
        horizon = now - WINDOW
        while buckets and buckets[0][0] + 1 <= horizon:
            self._tokens -= int(buckets.popleft()[1])
        return self._tokens

    def _tokens_free_in(self, now: float) -> float:
        """Seconds until enough tokens age out to be under ``tpm`` again."""
        assert self.tpm is not None
        over = self._tokens - self.tpm + 1
        for second, tokens in self._buckets:
            over -= int(tokens)
            if over <= 0:
                return max(0.0, second + 1 + WINDOW - now)
        return WINDOW

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's rate-limit headers, for the limits this key has."""
        out: list[tuple[bytes, bytes]] = []
        if self.rpm is not None:
            times = self._times
            horizon = now - WINDOW
            while times and times[0] <= horizon:
                times.popleft()
            reset = times[0] + WINDOW - now if times else 0.0
            out += [
                (b"x-ratelimit-limit-requests", str(self.rpm).encode()),
                (b"x-ratelimit-remaining-requests", str(max(0, self.rpm - len(times))).encode()),
                (b"x-ratelimit-reset-requests", duration(reset).encode()),
            ]
        if self.tpm is not None:
            used = self.tokens_used(now)
            reset = self._buckets[0][0] + 1 + WINDOW - now if self._buckets else 0.0
            out += [
                (b"x-ratelimit-limit-tokens", str(self.tpm).encode()),
                (b"x-ratelimit-remaining-tokens", str(max(0, self.tpm - used)).encode()),
                (b"x-ratelimit-reset-tokens", duration(max(0.0, reset)).encode()),
            ]
        return out


def duration(seconds: float) -> str:
    """As OpenAI writes its resets: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"
