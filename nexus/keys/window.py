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

    def add(self, now: float, amount: int) -> None:
        slot = int(now * SLOTS_PER_SECOND)
        slots = self.slots
        if slots and slots[-1][0] == slot:
            slots[-1][1] += amount
        else:
            slots.append([slot, amount])
        self.total += amount

    def prune(self, now: float) -> int:
        """Drop the slots that have wholly left the window; the total of the rest."""
        slot = int(now * SLOTS_PER_SECOND)
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

    def reset_header(self, name: bytes, now: float) -> tuple[bytes, bytes]:
        """``name: reset``, the time until the oldest slot leaves the window, counted from the
        start of ``now``'s slot (at most a tenth of a second long), so that one header serves a
        whole slot."""
        slots = self.slots
        tenths = (
            max(0, slots[0][0] + 1 + WINDOW_SLOTS - int(now * SLOTS_PER_SECOND)) if slots else 0
        )
        header = _RESET_HEADERS.get((name, tenths))
        if header is None:
            header = _RESET_HEADERS[(name, tenths)] = (name, _tenths_text(tenths).encode())
        return header


class RateWindow:
    __slots__ = (
        "rpm", "tpm", "max_concurrent", "limited", "in_flight", "_requests", "_tokens",
        "_rpm_header", "_tpm_header",
    )  # fmt: skip

    def __init__(self, rpm: int | None, tpm: int | None, max_concurrent: int | None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.max_concurrent = max_concurrent
        self.limited = rpm is not None or tpm is not None  # has rate-limit headers
        self._rpm_header = (b"x-ratelimit-limit-requests", str(rpm).encode())
        self._tpm_header = (b"x-ratelimit-limit-tokens", str(tpm).encode())
        self.in_flight = 0
        self._requests = Counts()
        self._tokens = Counts()

    def carry(self, old: RateWindow) -> None:
        """Keep ``old``'s minute and calls in flight (new limits, same history)."""
        self.in_flight = old.in_flight
        self._requests = old._requests
        self._tokens = old._tokens

    def admit(self, now: float) -> Refusal | None:
        """Count a request in, or say which limit it meets and when to retry."""
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return Refusal(
                "max_concurrent",
                f"this key has {self.in_flight} requests in flight, its max_concurrent",
                1.0,
            )
        rpm = self.rpm
        if rpm is not None:
            requests = self._requests
            if requests.prune(now) >= rpm:
                wait = requests.free_in(now, requests.total - rpm + 1)
                return Refusal("rpm", f"this key's limit of {rpm} requests per minute "
                               "is reached", wait)  # fmt: skip
        tpm = self.tpm
        if tpm is not None:
            tokens = self._tokens
            used = tokens.prune(now)
            if used >= tpm:
                return Refusal("tpm", f"this key's limit of {tpm} tokens per minute is "
                               f"reached ({used} used)",
                               tokens.free_in(now, used - tpm + 1))  # fmt: skip
        if rpm is not None:
            self._requests.add(now, 1)
        self.in_flight += 1
        return None

    def done(self, now: float, tokens: int) -> None:
        self.in_flight -= 1
        if self.tpm is not None and tokens > 0:
            self._tokens.add(now, tokens)

    def tokens_used(self, now: float) -> int:
        return self._tokens.prune(now)

    def remaining(self, now: float) -> tuple[int | None, int | None]:
        """Requests and tokens left this minute (None for a limit the key does not have)."""
        requests = None if self.rpm is None else max(0, self.rpm - self._requests.prune(now))
        tokens = None if self.tpm is None else max(0, self.tpm - self._tokens.prune(now))
        return requests, tokens

    def headers(self, now: float, pruned: bool = False) -> list[tuple[bytes, bytes]]:
        """OpenAI's rate-limit headers, for the limits this key has (``pruned``: ``admit`` has
        just dropped what left the window at ``now``)."""
        out: list[tuple[bytes, bytes]] = []
        if self.rpm is not None:
            requests = self._requests
            count = requests.total if pruned else requests.prune(now)
            out.append(self._rpm_header)
            out.append((b"x-ratelimit-remaining-requests", b"%d" % max(0, self.rpm - count)))
            out.append(requests.reset_header(b"x-ratelimit-reset-requests", now))
        if self.tpm is not None:
            tokens = self._tokens
            used = tokens.total if pruned else tokens.prune(now)
            out.append(self._tpm_header)
            out.append((b"x-ratelimit-remaining-tokens", b"%d" % max(0, self.tpm - used)))
            out.append(tokens.reset_header(b"x-ratelimit-reset-tokens", now))
        return out


# (header name, tenths of a second) -> the header: at most 2 x 601 entries
_RESET_HEADERS: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}


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
