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
    """What happened in the last minute, in slots: ``[slot, amount]`` pairs, oldest first."""

    __slots__ = ("slots", "total", "pruned_at")

    def __init__(self) -> None:
        self.slots: deque[list[int]] = deque()
        self.total = 0
        self.pruned_at = -1  # the slot of the last prune: nothing can leave until the next

    def add(self, slot: int, amount: int) -> None:
        slots = self.slots
        if slots and slots[-1][0] == slot:
            slots[-1][1] += amount
        else:
            slots.append([slot, amount])
        self.total += amount

    def prune(self, slot: int) -> int:
        """Drop the slots that have wholly left the window at ``slot``; the total of the rest."""
        if slot == self.pruned_at:
            return self.total
        self.pruned_at = slot
        # Slot s spans [s, s + 1) tenths; it has left (now - 60, now] once s + 1 <= now*10 - 600,
        # that is once s <= slot - 601 (s is whole).
        gone = slot - WINDOW_SLOTS - 1
        slots = self.slots
        while slots and slots[0][0] <= gone:
            self.total -= slots.popleft()[1]
        return self.total

    def free_in(self, now: float, over: int) -> float:
        """Seconds until ``over`` of the amount has left the window."""
        for slot, amount in self.slots:
            over -= amount
            if over <= 0:
                return max(0.0, (slot + 1) * SLOT + WINDOW - now)
        return WINDOW

    def reset(self, slot: int) -> bytes:
        """When the oldest slot leaves the window, as OpenAI writes resets (``1m0s``), counted
        from the start of ``slot``, the current one (at most a tenth of a second early), so
        that one text serves a whole slot."""
        slots = self.slots
        if not slots:
            return _RESETS[0]
        tenths = slots[0][0] + 1 + WINDOW_SLOTS - slot
        if 0 <= tenths < len(_RESETS):
            return _RESETS[tenths]
        return _tenths_text(max(0, tenths)).encode()  # the clock went back


class RateWindow:
    __slots__ = (
        "rpm", "tpm", "max_concurrent", "in_flight", "_requests", "_tokens", "_head",
    )  # fmt: skip

    def __init__(self, rpm: int | None, tpm: int | None, max_concurrent: int | None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.max_concurrent = max_concurrent
        self._head = (_REQUESTS % rpm if rpm is not None else b"") + (
            _TOKENS % tpm if tpm is not None else b""
        )
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
            count = requests.prune(slot)
            if count >= rpm:
                return Refusal("rpm", f"this key's limit of {rpm} requests per minute is "
                               "reached", requests.free_in(now, count - rpm + 1))  # fmt: skip
        if tpm is not None:
            used = tokens.prune(slot)
            if used >= tpm:
                return Refusal("tpm", f"this key's limit of {tpm} tokens per minute is "
                               f"reached ({used} used)",
                               tokens.free_in(now, used - tpm + 1))  # fmt: skip
            left = tpm - used
        self.in_flight += 1
        if rpm is None:
            return self._head % (left, tokens.reset(slot))
        requests.add(slot, 1)
        if tpm is None:
            return self._head % (rpm - count - 1, requests.reset(slot))
        return self._head % (rpm - count - 1, requests.reset(slot), left, tokens.reset(slot))

    def done(self, now: float, tokens: int) -> None:
        self.in_flight -= 1
        if self.tpm is not None and tokens > 0:
            self._tokens.add(int(now * SLOTS_PER_SECOND), tokens)

    def tokens_used(self, now: float) -> int:
        return self._tokens.prune(int(now * SLOTS_PER_SECOND))

    def remaining(self, now: float) -> tuple[int | None, int | None]:
        """Requests and tokens left this minute (None for a limit the key does not have)."""
        slot = int(now * SLOTS_PER_SECOND)
        requests = None if self.rpm is None else max(0, self.rpm - self._requests.prune(slot))
        tokens = None if self.tpm is None else max(0, self.tpm - self._tokens.prune(slot))
        return requests, tokens

    def head(self, now: float) -> bytes:
        """OpenAI's rate-limit headers for the limits this key has, as header lines
        (``name: value\\r\\n``), without counting a request."""
        slot = int(now * SLOTS_PER_SECOND)
        parts: list[int | bytes] = []
        if self.rpm is not None:
            parts += (max(0, self.rpm - self._requests.prune(slot)), self._requests.reset(slot))
        if self.tpm is not None:
            parts += (max(0, self.tpm - self._tokens.prune(slot)), self._tokens.reset(slot))
        return self._head % tuple(parts) if parts else b""


# Header lines with the limit filled in; what remains and when it resets are filled per answer.
_REQUESTS = (
    b"x-ratelimit-limit-requests: %d\r\n"
    b"x-ratelimit-remaining-requests: %%d\r\nx-ratelimit-reset-requests: %%s\r\n"
)
_TOKENS = (
    b"x-ratelimit-limit-tokens: %d\r\n"
    b"x-ratelimit-remaining-tokens: %%d\r\nx-ratelimit-reset-tokens: %%s\r\n"
)


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
_RESETS = [_tenths_text(tenths).encode() for tenths in range(WINDOW_SLOTS + 2)]
