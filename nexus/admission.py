"""A request's admission against the state replicas share (``[state] backend = "redis"``).

A keyed request whose key has rpm, tpm or max_concurrent, and a priced call that a budget limits
(the monthly limit where its action blocks the backend, or the key's monthly budget), are checked
and counted in Redis, in one script: one round trip. Dispatch sends it before it plans the request
(``ask``, priced for the step the model's last request went to first) and reads its answer at the
first step, just before that step's upstream request is written (``answer``); a reservation made
for another price is given back (``give_back``) and asked again, and one no step read is given
back in the background (``drop``). Requests that are neither limited nor priced do not touch
Redis; what requests used is written in batches, off their path.

While Redis is out of reach, each replica admits on its own, with its share of every limit (the
limit divided by the replicas last seen alive), so that together they stay within it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cost.ledger import Ledger, Reservation, month_of, next_month_start
from .errors import RateLimited
from .keys.ring import ClientKey, KeyRing
from .keys.window import RateWindow, Refusal, reset_text
from .state.store import Unreachable, nanos
from .telemetry.outcomes import Trace

if TYPE_CHECKING:  # redis is imported only with [state] backend = "redis"
    from .state.redis_gate import Asked, RedisGate, Verdict

log = logging.getLogger("nexus.admission")


@dataclass(slots=True)
class Asking:
    """An admission on its way to the store, and what its answer is applied to."""

    asked: Asked
    rated: ClientKey | None  # the key whose rate limits it checks
    budgeted: ClientKey | None  # the key whose monthly budget it checks
    worst: float | None  # what it reserves
    cloud: bool
    month: str


@dataclass(slots=True)
class Held:
    """What a call holds: its reservation in the month's budget (None: refused) and whether
    the key's budget holds its worst case too."""

    reservation: Reservation | None
    key_held: bool = False
    key_refused: bool = False


class SharedAdmission:
    def __init__(self, gate: RedisGate, ledger: Ledger, keys: KeyRing) -> None:
        self.gate = gate
        self.ledger = ledger
        self.keys = keys
        self._shares: dict[str, tuple[RateWindow, float]] = {}  # while down: name -> share
        self._budget_share: float | None = None
        self._key_base: dict[str, float] = {}  # while down: a key's use when Redis went away
        self._fleet_reserved = 0.0  # what the replicas held reserved, as Redis last said
        self._month, self._month_ends = "", 0.0  # the current UTC month, and when it ends
        self._tasks: set[asyncio.Task[None]] = set()  # admissions being given back
        gate.on_down.append(self._went_down)

    @staticmethod
    def defers(key: ClientKey) -> bool:
        """The key's rate limits are checked in the store (at dispatch, with the budget)."""
        window = key.window
        return window.rpm is not None or window.tpm is not None or window.max_concurrent is not None

    async def admit(
        self, trace: Trace, key: ClientKey | None, worst: float | None, cloud: bool
    ) -> Held | None:
        """Admit the request's key (when its admission waits, ``trace.pending``) and reserve
        ``worst`` (a priced call; None: free). Raises RateLimited when the key's limits refuse."""
        rated = trace.pending
        budgeted, checked = self._budgets(key, worst, cloud)
        if rated is None and worst is not None and not checked and budgeted is None:
            return Held(self.ledger.reserve(worst, cloud=cloud))  # priced, limited by nothing
        if rated is None and worst is None:
            return None
        if self.gate.down is not None:
            return self._admit_here(trace, rated, budgeted, worst, cloud)
        return await self.answer(self._ask(trace, rated, budgeted, checked, worst, cloud), trace)

    def ask(
        self, trace: Trace, key: ClientKey | None, worst: float | None, cloud: bool
    ) -> Asking | None:
        """The admission ``admit`` would make, written to the store now (its answer read with
        ``answer``); None when it would not ask the store (``admit`` decides then)."""
        rated = trace.pending
        budgeted, checked = self._budgets(key, worst, cloud)
        if rated is None and (worst is None or (not checked and budgeted is None)):
            return None
        if self.gate.down is not None:
            return None
        return self._ask(trace, rated, budgeted, checked, worst, cloud)

    def _budgets(
        self, key: ClientKey | None, worst: float | None, cloud: bool
    ) -> tuple[ClientKey | None, bool]:
        """The key whose monthly budget checks the call, and whether the monthly limit does."""
        budgeted = key if key is not None and key.limits.monthly_budget_usd is not None else None
        ledger = self.ledger
        return budgeted, worst is not None and ledger.limit is not None and ledger.blocks(cloud)

    def _ask(
        self,
        trace: Trace,
        rated: ClientKey | None,
        budgeted: ClientKey | None,
        checked: bool,
        worst: float | None,
        cloud: bool,
    ) -> Asking:
        ledger = self.ledger
        now = ledger.clock()
        if now >= self._month_ends:
            self._month, self._month_ends = month_of(now), next_month_start(now)
        month = self._month
        limits = (0, 0, 0)
        name = ""
        if rated is not None:
            trace.pending = None  # asked: the answer admits it
            window = rated.window
            limits = (window.rpm or 0, window.tpm or 0, window.max_concurrent or 0)
            name = rated.name
        elif budgeted is not None:
            name = budgeted.name
        limit = ledger.limit
        asked = self.gate.ask(
            month,
            name,
            limits,
            nanos(worst) if worst else 0,
            nanos(limit) if checked and limit is not None else -1,
            nanos(budgeted.limits.monthly_budget_usd or 0.0) if budgeted is not None else -1,
        )
        return Asking(asked, rated, budgeted, worst, cloud, month)

    async def answer(self, asking: Asking, trace: Trace) -> Held | None:
        """What the store answered to ``asking`` (raises RateLimited when the key's limits
        refuse); decided here, with this replica's share, when the store is out of reach."""
        rated, worst = asking.rated, asking.worst
        try:
            verdict = await self.gate.answer(asking.asked)
        except Unreachable:
            if rated is not None:
                trace.pending = rated
            return self._admit_here(trace, rated, asking.budgeted, worst, asking.cloud)
        ledger, month = self.ledger, asking.month
        ledger.fleet_spent(verdict.spent_usd, month)
        if rated is not None:
            self._rated(trace, rated, verdict)
        if worst is None:
            return None
        self._fleet_reserved = verdict.reserved_usd
        budget = verdict.budget
        if budget == 1:
            ledger.refused_by_store()
            return Held(None)
        if budget == 2:
            return Held(None, key_refused=True)
        cloud = asking.cloud
        if budget == -1:  # nothing asked of the store: held here
            return Held(ledger.reserve(worst, cloud=cloud))
        budgeted = asking.budgeted
        if budgeted is not None:
            budgeted.reserved_usd += worst
            budgeted.held_in_store += worst
        reservation = ledger.held(worst, cloud, month, urgent=verdict.tight)
        return Held(reservation, key_held=budgeted is not None)

    def drop(self, asking: Asking, key: ClientKey | None) -> None:
        """An admission asked for a request that no step read (it ended before one was
        reached): what the store gives it is given back, in the background."""
        task = asyncio.get_running_loop().create_task(self._drop(asking, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop(self, asking: Asking, key: ClientKey | None) -> None:
        trace = Trace(pending=asking.rated)
        try:
            held = await self.answer(asking, trace)
        except RateLimited:
            return
        self.give_back(held, key)
        if asking.rated is not None:
            self.finished(asking.rated, trace)

    def give_back(self, held: Held | None, key: ClientKey | None) -> None:
        """A reservation ``answer`` made, not used."""
        if held is None or held.reservation is None:
            return
        self.ledger.release(held.reservation)
        if held.key_held and key is not None:
            self.keys.release(key, held.reservation.amount, held.reservation)

    def _rated(self, trace: Trace, key: ClientKey, verdict: Verdict) -> None:
        trace.pending = None
        window = key.window
        if verdict.rate != 0:
            trace.admitted = False
            limit, what = (
                ("rpm", f"this key's limit of {window.rpm} requests per minute is reached")
                if verdict.rate == 1
                else ("tpm", f"this key's limit of {window.tpm} tokens per minute is reached")
                if verdict.rate == 2
                else (
                    "max_concurrent",
                    f"this key has {verdict.running} requests in flight, its max_concurrent",
                )  # fmt: skip
            )
            error = RateLimited(f"Rate limit reached: {what}", max(verdict.retry_after, 0.001))
            head = _head(window, verdict)
            error.extra_headers = dict(_pairs(head))
            log.debug("key %s refused by its %s (shared)", key.name, limit)
            raise error
        trace.held = True
        trace.rate = _head(window, verdict)
        window.in_flight += 1

    # --- Redis out of reach: each replica its share ------------------------------------------
    def _went_down(self) -> None:
        self._shares.clear()
        self._key_base.clear()
        ledger = self.ledger
        if ledger.limit is not None:  # every replica's reservations may still settle in full
            held = max(self._fleet_reserved, ledger.reserved)
            left = max(ledger.limit - ledger.spent - held, 0.0) if ledger.loaded else 0.0
            self._budget_share = ledger.spent + ledger.reserved + left / self.gate.replicas

    def _admit_here(
        self,
        trace: Trace,
        rated: ClientKey | None,
        budgeted: ClientKey | None,
        worst: float | None,
        cloud: bool,
    ) -> Held | None:
        if rated is not None:
            trace.pending = None
            window = self._share(rated)
            got = window.admit(self.ledger.clock())
            if isinstance(got, Refusal):
                trace.admitted = False
                error = RateLimited(f"Rate limit reached: {got.message}", got.retry_after)
                error.extra_headers = dict(_pairs(window.head(self.ledger.clock())))
                raise error
            trace.rate = got
            trace.local = window
        if worst is None:
            return None
        if budgeted is not None and not self.keys.loaded:  # its month was never read
            return Held(None, key_refused=True)
        if budgeted is not None:  # what the key used since, against its share of what was left
            used = budgeted.usage.cost_usd + budgeted.reserved_usd
            base = self._key_base.setdefault(budgeted.name, used)
            left = max((budgeted.limits.monthly_budget_usd or 0.0) - base, 0.0)
            if used - base + worst > left / self.gate.replicas:
                return Held(None, key_refused=True)
        reservation = self.ledger.reserve(worst, cloud=cloud, limit=self._budget_share)
        if reservation is not None and budgeted is not None:
            budgeted.reserved_usd += worst
        return Held(reservation, key_held=reservation is not None and budgeted is not None)

    def _share(self, key: ClientKey) -> RateWindow:
        """The key's window while Redis is away: its limits divided among the replicas."""
        found = self._shares.get(key.name)
        if found is not None:
            return found[0]
        replicas = self.gate.replicas
        window = key.window

        def part(limit: int | None) -> int | None:
            return None if limit is None else max(1, limit // replicas)

        share = RateWindow(part(window.rpm), part(window.tpm), part(window.max_concurrent))
        self._shares[key.name] = (share, self.ledger.clock())
        return share

    def holdings(self) -> dict[str, list[list[Any]]]:
        """What this replica holds in Redis (``redis_lua.LEASE``), set there again when its
        lease had run out or it is back from a spell without Redis."""
        ledger, month = self.ledger, self.ledger.month
        return {
            "reserved": [[month, nanos(ledger.held_in_store)]],
            "keyres": [
                [month, k.name, nanos(k.held_in_store)]
                for k in self.keys
                if k.limits.monthly_budget_usd is not None
            ],
            "conc": [[k.name, k.window.in_flight] for k in self.keys if k.window.max_concurrent],
        }

    def finished(self, key: ClientKey, trace: Trace) -> None:
        """The request ended: what it held is given back."""
        if trace.held:
            key.window.in_flight -= 1
            if key.window.max_concurrent is not None:
                self.gate.finished(key.name)
        local = trace.local
        if isinstance(local, RateWindow):
            local.in_flight -= 1


def _head(window: RateWindow, verdict: Verdict) -> bytes:
    text = ""
    if window.rpm is not None:
        text += (
            f"x-ratelimit-limit-requests: {window.rpm}\r\n"
            f"x-ratelimit-remaining-requests: {verdict.requests_left}\r\n"
            f"x-ratelimit-reset-requests: {reset_text(verdict.requests_reset)}\r\n"
        )
    if window.tpm is not None:
        text += (
            f"x-ratelimit-limit-tokens: {window.tpm}\r\n"
            f"x-ratelimit-remaining-tokens: {verdict.tokens_left}\r\n"
            f"x-ratelimit-reset-tokens: {reset_text(verdict.tokens_reset)}\r\n"
        )
    return text.encode()


def _pairs(head: bytes) -> list[tuple[str, str]]:
    pairs = []
    for line in head.decode().split("\r\n"):
        name, sep, value = line.partition(": ")
        if sep:
            pairs.append((name, value))
    return pairs
