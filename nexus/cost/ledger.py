"""The month's spend: reservations before priced calls, settlements after, kept in the store.

Before a priced call, dispatch reserves its worst-case cost; the reservation is refused when the
month's settled spend, plus what is reserved, plus it would pass the limit and the hard-limit
action blocks that backend. Check and reservation happen in one step on the event loop, so
concurrent requests cannot all pass the check before any of them is counted (LiteLLM's race).
When the answer ends, the reservation is settled with the real cost (or released when nothing
was used). Settled spend is written to the store in batches, off the loop, within
``flush_interval`` seconds; months are UTC calendar months.

With a shared store (Redis, for replicas), the check and reservation are made in the store by the
request's admission (``nexus.admission``) and recorded here with ``held``; what is freed travels
with the settled spend, in the same batch, so the store never counts a call twice or not at all.
A batch that could not be written is kept as it is and sent again (the store counts a batch id
once), so nothing is lost while the store is out of reach.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from ..config import BudgetSettings
from ..state.flush import FlushTimer
from ..state.store import SharedStore, Spend, StateStore

log = logging.getLogger("nexus.cost")

NORMAL, SOFT_LIMIT, HARD_LIMIT = "Normal", "SoftLimit", "HardLimit"
STATUS_LEVEL = {NORMAL: 0, SOFT_LIMIT: 1, HARD_LIMIT: 2}
SOON = 0.0  # seconds before freed reservations are written to a shared store: at once
CLOSE_ATTEMPTS = 3  # writes of the last batch at shutdown before its spend is given up


def month_of(when: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(when))


def next_month_start(when: float) -> float:
    year, month = time.gmtime(when)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


@dataclass(slots=True)
class Reservation:
    amount: float
    cloud: bool
    open: bool = True
    month: str = ""  # set when the shared store holds it (freed there, under this month)
    urgent: bool = False  # the budget is tight: free it in the store at once, not in a batch


@dataclass(slots=True)
class Batch:
    """Settled spend and freed reservations, written together, under one id."""

    spends: list[Spend]
    freed: list[tuple[str, float]]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(slots=True)
class Totals:
    cost_usd: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, cost: float, prompt: int, completion: int) -> None:
        self.cost_usd += cost
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion


class Ledger:
    def __init__(
        self,
        budget: BudgetSettings,
        store: StateStore | None = None,
        *,
        flush_interval: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = budget.monthly_limit_usd
        self.soft_fraction = budget.soft_limit_percent / 100
        self.action = budget.hard_limit_action
        self.store = store
        self.flush_interval = flush_interval
        self.clock = clock
        now = clock()
        self.month = month_of(now)
        self._next_month = next_month_start(now)
        self.spent = 0.0  # settled this month
        self.reserved = 0.0  # held by calls in flight
        self.held_in_store = 0.0  # the part of it the shared store holds for this replica
        self.open_reservations = 0
        self.rollovers = 0
        self.refused = 0  # reservations refused by the limit
        self._told = NORMAL  # the status last logged this month
        self._tell_at = math.inf if self.limit is None else self.limit * self.soft_fraction
        self.totals: dict[tuple[str, str], Totals] = {}  # (backend, model) -> month to date
        self._pending: dict[tuple[str, str, str], Totals] = {}  # (month, backend, model)
        self.shared = store is not None and store.shared  # reservations live in the store
        self._freed: dict[str, float] = {}  # month -> reservations freed, not yet written
        self._unsent: list[Batch] = []  # batches whose write failed: sent again, as they are
        self._again = False  # a flush came while a write was in flight (shared stores)
        self.loaded = store is None  # the month's spend was read back (nothing to read: True)
        self._timer = FlushTimer(self._flush)
        self._writes: set[asyncio.Future[Any]] = set()
        self._writer = (
            concurrent.futures.ThreadPoolExecutor(1, "nexus-state") if store is not None else None
        )

    # --- start and stop ------------------------------------------------------------------
    async def load(self) -> None:
        """Read the month's settled spend back from the store (after a restart)."""
        if self.store is None or self._writer is None:
            return
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._writer, self.store.month, self.month)
        self.loaded = True
        for row in rows:
            totals = self.totals.setdefault((row.backend, row.model), Totals())
            totals.cost_usd += row.cost_usd
            totals.requests += row.requests
            totals.prompt_tokens += row.prompt_tokens
            totals.completion_tokens += row.completion_tokens
            self.spent += row.cost_usd
        if rows:
            log.info("month %s so far: $%.4f spent (from %s)", self.month, self.spent, "the store")

    async def load_once(self) -> None:
        """``load``, unless the month was read already."""
        if not self.loaded:
            await self.load()

    async def aclose(self) -> None:
        """Write what is pending and wait for every write to finish; a failed write (put back
        into the pending batch) is tried again a few times before the spend is given up."""
        for attempt in range(CLOSE_ATTEMPTS):
            self._timer.cancel()
            if attempt:
                await asyncio.sleep(0.05 * attempt)
            self._flush()
            if self._writes:
                await asyncio.gather(*self._writes, return_exceptions=True)
            if not self._pending and not self._unsent:
                break
        self._timer.cancel()
        if self._pending or self._unsent:
            lost = sum(t.cost_usd for t in self._pending.values())
            lost += sum(s.cost_usd for batch in self._unsent for s in batch.spends)
            log.error("could not write $%.6f of spend to the state store at shutdown", lost)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
            if self.shared:
                await cast(SharedStore, self.store).aclose()

    # --- the budget ----------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.limit is not None

    def status(self) -> str:
        limit = self.limit
        if limit is None:
            return NORMAL
        self._roll()
        used = self.spent / limit
        if used >= 1:
            return HARD_LIMIT
        return SOFT_LIMIT if used >= self.soft_fraction else NORMAL

    def blocks(self, cloud: bool) -> bool:
        """The hard-limit action keeps this kind of backend out."""
        return self.action == "block_all" or (self.action == "block_cloud" and cloud)

    def reserve(
        self, amount: float, *, cloud: bool, limit: float | None = None
    ) -> Reservation | None:
        """Hold ``amount`` for a call; None when it would pass a limit that blocks it (the
        monthly limit, or ``limit`` when given: a replica's share while the store is away)."""
        limit = self.limit if limit is None else limit
        if limit is not None and self.blocks(cloud):
            self._roll()
            if self.spent + self.reserved + amount > limit:
                self.refused += 1
                return None
        self.reserved += amount
        self.open_reservations += 1
        return Reservation(amount, cloud)

    def held(self, amount: float, cloud: bool, month: str, urgent: bool = False) -> Reservation:
        """A reservation the shared store made (and checked) for this replica; ``urgent``:
        another like it would not fit, so it is freed there as soon as it ends."""
        self.held_in_store += amount
        self.reserved += amount
        self.open_reservations += 1
        return Reservation(amount, cloud, month=month, urgent=urgent)

    def refused_by_store(self) -> None:
        self.refused += 1

    def fleet_spent(self, total: float, month: str) -> None:
        """The month's spend across the replicas, as the shared store last said."""
        if month == self.month:
            pending = self._pending
            unsent = (
                sum(t.cost_usd for (m, _, _), t in pending.items() if m == month) if pending else 0
            )
            self.spent = max(total + unsent, 0.0)

    def release(self, reservation: Reservation | None) -> None:
        """Nothing was used (the call failed before the backend did any work)."""
        if reservation is None or not reservation.open:
            return
        reservation.open = False
        self.open_reservations -= 1
        if self.open_reservations:
            self.reserved = max(self.reserved - reservation.amount, 0.0)
        else:
            self.reserved = 0.0  # no drift from float sums once nothing is held
        if reservation.month:  # the store holds it too: freed there with the next batch
            self.held_in_store = max(self.held_in_store - reservation.amount, 0.0)
            freed = self._freed
            freed[reservation.month] = freed.get(reservation.month, 0.0) + reservation.amount
            self._later(soon=reservation.urgent)

    def settle(
        self,
        reservation: Reservation | None,
        cost: float,
        backend: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Count the real ``cost`` of a call (and free its reservation)."""
        self.release(reservation)
        self._roll()
        self.spent += cost
        key = (backend, model)
        totals = self.totals.get(key)
        if totals is None:
            totals = self.totals[key] = Totals()
        totals.add(cost, prompt_tokens, completion_tokens)
        if self.spent >= self._tell_at:
            self._tell()
        if self.store is None:
            return
        pending_key = (self.month, backend, model)
        pending = self._pending.get(pending_key)
        if pending is None:
            pending = self._pending[pending_key] = Totals()
        pending.add(cost, prompt_tokens, completion_tokens)
        self._later()

    def _later(self, soon: bool = False) -> None:
        """Write within ``flush_interval``; ``soon``: within a few ms (a reservation held in the
        shared store is freed there promptly, so the fleet's budget is not held up by it),
        unless writes are failing."""
        self._timer.within(SOON if soon and not self._unsent else self.flush_interval)

    def snapshot(self) -> dict[str, Any]:
        """The ``budget`` object of ``/v1/stats``."""
        status = self.status()
        limit = self.limit
        view: dict[str, Any] = {
            "month": self.month,
            "current_spending_usd": round(self.spent, 6),
            "reserved_usd": round(self.reserved, 6),
            "status": status,
        }
        if limit is not None:
            view.update(
                monthly_limit_usd=limit,
                remaining_usd=round(max(limit - self.spent, 0.0), 6),
                utilization_percent=round(self.spent / limit * 100, 2),
                soft_limit_percent=round(self.soft_fraction * 100, 2),
                hard_limit_action=self.action,
            )
        return view

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``X-Nexus-Budget-*``, sent once the status is not normal."""
        limit = self.limit
        if limit is None:
            return []
        status = self.status()
        if status == NORMAL:
            return []
        return [
            (b"x-nexus-budget-status", status.encode()),
            (b"x-nexus-budget-utilization", f"{self.spent / limit * 100:.2f}".encode()),
            (b"x-nexus-budget-remaining", f"{max(limit - self.spent, 0.0):.2f}".encode()),
        ]

    def _tell(self) -> None:
        """Log once a month when the spend reaches the soft, then the hard limit."""
        status = self.status()
        if STATUS_LEVEL[status] <= STATUS_LEVEL[self._told]:
            return
        self._told = status
        assert self.limit is not None
        self._tell_at = self.limit if status == SOFT_LIMIT else math.inf
        what = "soft limit" if status == SOFT_LIMIT else f"hard limit ({self.action} applies)"
        log.warning("monthly budget: %s reached, $%.4f of $%.2f spent in %s",
                    what, self.spent, self.limit, self.month)  # fmt: skip

    # --- months and the store ------------------------------------------------------------
    def _roll(self) -> None:
        now = self.clock()
        if now < self._next_month:
            return
        self.month = month_of(now)
        self._next_month = next_month_start(now)
        self.spent = 0.0
        self.totals.clear()
        self.rollovers += 1
        self._told = NORMAL
        self._tell_at = math.inf if self.limit is None else self.limit * self.soft_fraction
        log.info("a new month (%s): the spend starts again from 0", self.month)

    def _flush(self) -> None:
        self._timer.cancel()  # (when called before it fires)
        if self.store is None or self._writer is None:
            return
        if self.shared and self._writes:  # one write at a time: what comes meanwhile is the
            self._again = True  # next batch, sent as soon as this one is answered
            return
        batches, self._unsent = self._unsent, []
        if self._pending or self._freed:
            spends = [
                Spend(
                    month,
                    backend,
                    model,
                    t.cost_usd,
                    t.requests,
                    t.prompt_tokens,
                    t.completion_tokens,
                )  # fmt: skip
                for (month, backend, model), t in self._pending.items()
            ]
            batches.append(Batch(spends, list(self._freed.items())))
            self._pending, self._freed = {}, {}
        if not batches:
            return
        loop = asyncio.get_running_loop()
        write: asyncio.Future[tuple[int, tuple[float, str] | None]]
        if self.shared:  # from the loop: ahead of the next admission, on any replica
            write = asyncio.ensure_future(self._write_shared(batches))
        else:
            write = loop.run_in_executor(self._writer, self._write, batches)
        self._writes.add(write)
        write.add_done_callback(lambda done: self._written(done, batches))

    def _write(self, batches: list[Batch]) -> tuple[int, tuple[float, str] | None]:
        """In the writer thread: the batches in order, up to the first that fails; how many
        were written (a store of this process's own: no spend across replicas to tell)."""
        store = self.store
        assert store is not None
        for done, batch in enumerate(batches):
            try:
                store.add(batch.spends)
            except Exception as exc:
                if done == 0:
                    raise
                log.error("could not write the spend to the state store (kept, tried again): "
                          "%s", exc)  # fmt: skip
                return done, None
        return len(batches), None

    async def _write_shared(self, batches: list[Batch]) -> tuple[int, tuple[float, str] | None]:
        """``_write`` for a shared store, from the event loop."""
        store = cast(SharedStore, self.store)
        fleet = None
        for done, batch in enumerate(batches):
            try:
                total = await store.asettle(batch.id, batch.spends, batch.freed)
            except Exception:
                if done == 0:
                    raise
                return done, fleet
            if total is not None and batch.spends:
                fleet = (total, batch.spends[-1].month)
        return len(batches), fleet

    def _written(
        self, done: asyncio.Future[tuple[int, tuple[float, str] | None]], batches: list[Batch]
    ) -> None:
        self._writes.discard(done)
        if done.cancelled():
            return
        exc = done.exception()
        if exc is None:
            written, fleet = done.result()
            if fleet is not None:
                self.fleet_spent(*fleet)
        else:
            log.error("could not write the spend to the state store (kept, tried again): %s", exc)
            written = 0
        if written < len(batches):
            self._unsent = batches[written:] + self._unsent  # nothing is lost: sent again, as is
            self._timer.after(1.0)
        elif self._again:
            self._again = False
            self._flush()
