"""One key's rate limits over the last minute: requests, tokens, and calls in flight.

Requests and tokens are counted in slots of a tenth of a second (at most 600 a minute, whatever
the rate), and a slot counts until all of it has left the last 60 seconds. So no more than
``rpm`` requests are ever admitted in any 60 seconds (a burst of 200 against an rpm of 50 lets
exactly 50 through); a request may be refused up to a tenth of a second before an exact log of
times would admit it. Tokens come from real usage when a request ends, so a key at its ``tpm`` is
refused until enough of them age out; calls already admitted may carry it past ``tpm`` (their use
is not known in advance).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

WINDOW = 60.0
SLOT = 0.1  # seconds a count's slot spans
SLOTS_PER_SECOND = 10
WINDOW_SLOTS = 600


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: str  # "rpm", "tpm" or "max_concurrent"
    message: str
    retry_after: float  # seconds


class Counts:
    """What happened in the last minute, in slots. The current slot's count is kept on the
    object itself and the older slots' in ``older`` (``(slot, amount)``, oldest first), so that a
    request in the current slot reads and writes this one object only (a request's work here
    is done with cold caches: every other object touched costs more than the arithmetic)."""

    __slots__ = ("older", "total", "slot", "amount", "_reset")

    def __init__(self) -> None:
        self.older: deque[tuple[int, int]] = deque()
        self.total = 0  # the whole minute's, the current slot's included
        self.slot = -1  # the current slot
        self.amount = 0  # counted in the current slot
        self._reset: str | None = None  # when the oldest older slot leaves, from ``slot``

    def advance(self, slot: int) -> int:
        """Make ``slot`` the current one: the current slot joins the older ones and those that
        have wholly left the window are dropped; the minute's total. (A slot earlier than the
        current one, from a clock set back, counts in the current one.)"""
        if slot <= self.slot:
            return self.total
        older = self.older
        if self.amount:
            older.append((self.slot, self.amount))
        self.slot, self.amount = slot, 0
        # Slot s spans [s, s + 1) tenths; it has left (now - 60, now] once s + 1 <= now*10 - 600,
        # that is once s <= slot - 601 (s is whole).
        gone = slot - WINDOW_SLOTS - 1
        while older and older[0][0] <= gone:
            self.total -= older.popleft()[1]
        self._reset = _reset_text(older[0][0] + 1 + WINDOW_SLOTS - slot) if older else None
        return self.total

    def add(self, slot: int, amount: int) -> None:
        if slot != self.slot:
            self.advance(slot)
        self.amount += amount
        self.total += amount

    def reset(self) -> str:
        """When the oldest slot leaves the window, as OpenAI writes resets (``1m0s``), counted
        from the start of the current slot (at most a tenth of a second early)."""
        if self._reset is not None:
            return self._reset
        return _RESETS[WINDOW_SLOTS + 1] if self.amount else _RESETS[0]

    def free_in(self, now: float, over: int) -> float:
        """Seconds until ``over`` of the amount has left the window."""
        for slot, amount in (*self.older, (self.slot, self.amount)):
            over -= amount
            if over <= 0:
                return max(0.0, (slot + 1) * SLOT + WINDOW - now)
        return WINDOW


class RateWindow:
    __slots__ = (
        "rpm", "tpm", "max_concurrent", "in_flight", "_requests", "_tokens",
        "_rpm_text", "_tpm_text",
    )  # fmt: skip

    def __init__(self, rpm: int | None, tpm: int | None, max_concurrent: int | None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.max_concurrent = max_concurrent
        # the header lines up to what remains (a str: an f-string is the cheapest way to fill in
        # a few values, and the bytes are encoded once)
        self._rpm_text = f"x-ratelimit-limit-requests: {rpm}\r\nx-ratelimit-remaining-requests: "
        self._tpm_text = f"x-ratelimit-limit-tokens: {tpm}\r\nx-ratelimit-remaining-tokens: "
        self.in_flight = 0
        self._requests = Counts()
        self._tokens = Counts()

    def carry(self, old: RateWindow) -> None:
        """Keep ``old``'s minute and calls in flight (new limits, same history)."""
        self.in_flight = old.in_flight
        self._requests = old._requests
        self._tokens = old._tokens

    def admit(self, now: float) -> Refusal | bytes:
        """Count a request in and answer the key's rate-limit header lines (``head``); or say
        which limit it meets and when to retry."""
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return Refusal(
                "max_concurrent",
                f"this key has {self.in_flight} requests in flight, its max_concurrent",
                1.0,
            )
        rpm, tpm = self.rpm, self.tpm
        if rpm is None and tpm is None:
            self.in_flight += 1
            return b""
        slot = int(now * SLOTS_PER_SECOND)
        requests, tokens = self._requests, self._tokens
        count = left = 0
        if rpm is not None:
            count = requests.total if requests.slot == slot else requests.advance(slot)
            if count >= rpm:
                return Refusal("rpm", f"this key's limit of {rpm} requests per minute is "
                               "reached", requests.free_in(now, count - rpm + 1))  # fmt: skip
        if tpm is not None:
            used = tokens.total if tokens.slot == slot else tokens.advance(slot)
            if used >= tpm:
                return Refusal("tpm", f"this key's limit of {tpm} tokens per minute is "
                               f"reached ({used} used)",
                               tokens.free_in(now, used - tpm + 1))  # fmt: skip
            left = tpm - used
        self.in_flight += 1
        if rpm is None:
            return f"{self._tpm_text}{left}{_TOKENS_RESET}{tokens.reset()}\r\n".encode()
        requests.amount += 1  # the current slot is ``slot`` (advanced above)
        requests.total = count + 1
        if tpm is None:
            return (
                f"{self._rpm_text}{rpm - count - 1}{_REQUESTS_RESET}{requests.reset()}\r\n".encode()
            )
        return (
            f"{self._rpm_text}{rpm - count - 1}{_REQUESTS_RESET}{requests.reset()}\r\n"
            f"{self._tpm_text}{left}{_TOKENS_RESET}{tokens.reset()}\r\n"
        ).encode()

    def used(self, now: float, tokens: int) -> None:
        """A request's tokens, once it has ended (``in_flight`` is given back at its end)."""
        if tokens > 0 and self.tpm is not None:
            self._tokens.add(int(now * SLOTS_PER_SECOND), tokens)

    def tokens_used(self, now: float) -> int:
        return self._tokens.advance(int(now * SLOTS_PER_SECOND))

    def remaining(self, now: float) -> tuple[int | None, int | None]:
        """Requests and tokens left this minute (None for a limit the key does not have)."""
        slot = int(now * SLOTS_PER_SECOND)
        requests = None if self.rpm is None else max(0, self.rpm - self._requests.advance(slot))
        tokens = None if self.tpm is None else max(0, self.tpm - self._tokens.advance(slot))
        return requests, tokens

    def head(self, now: float) -> bytes:
        """OpenAI's rate-limit headers for the limits this key has, as header lines
        (``name: value\\r\\n``), without counting a request."""
        slot = int(now * SLOTS_PER_SECOND)
        text = ""
        if self.rpm is not None:
            left = max(0, self.rpm - self._requests.advance(slot))
            text += f"{self._rpm_text}{left}{_REQUESTS_RESET}{self._requests.reset()}\r\n"
        if self.tpm is not None:
            left = max(0, self.tpm - self._tokens.advance(slot))
            text += f"{self._tpm_text}{left}{_TOKENS_RESET}{self._tokens.reset()}\r\n"
        return text.encode()


_REQUESTS_RESET = "\r\nx-ratelimit-reset-requests: "
_TOKENS_RESET = "\r\nx-ratelimit-reset-tokens: "


def _tenths_text(tenths: int) -> str:
    """A reset of ``tenths`` tenths of a second as OpenAI writes resets (``100ms``, ``31s``)."""
    return f"{tenths * 100}ms" if tenths < SLOTS_PER_SECOND else duration(tenths / SLOTS_PER_SECOND)


def duration(seconds: float) -> str:
    """As OpenAI writes its resets: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


# a reset of i tenths of a second; a pruned window's oldest slot leaves within 601
_RESETS = [_tenths_text(tenths) for tenths in range(WINDOW_SLOTS + 2)]


def reset_text(seconds: float) -> str:
    """A reset in ``seconds`` as OpenAI writes it, rounded up to a tenth of a second (from a
    table up to a minute)."""
    return _reset_text(math.ceil(seconds * SLOTS_PER_SECOND - 1e-9))


def _reset_text(tenths: int) -> str:
    if 0 <= tenths <= WINDOW_SLOTS + 1:
        return _RESETS[tenths]
    return _tenths_text(max(0, tenths))
