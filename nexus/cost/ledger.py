"""The month's spend: reservations before priced calls, settlements after, kept in the store.

Before a priced call, dispatch reserves its worst-case cost; the reservation is refused when the
month's settled spend, plus what is reserved, plus it would pass the limit and the hard-limit
action blocks that backend. Check and reservation happen in one step on the event loop, so
concurrent requests cannot all pass the check before any of them is counted (LiteLLM's race).
When the answer ends, the reservation is settled with the real cost (or released when nothing
was used). Settled spend is written to the store in batches, off the loop, within
``flush_interval`` seconds; months are UTC calendar months.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import BudgetSettings
from ..state.store import Spend, StateStore

log = logging.getLogger("nexus.cost")

NORMAL, SOFT_LIMIT, HARD_LIMIT = "Normal", "SoftLimit", "HardLimit"
STATUS_LEVEL = {NORMAL: 0, SOFT_LIMIT: 1, HARD_LIMIT: 2}
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
        self.open_reservations = 0
        self.rollovers = 0
        self.refused = 0  # reservations refused by the limit
        self._told = NORMAL  # the status last logged this month
        self._tell_at = math.inf if self.limit is None else self.limit * self.soft_fraction
        self.totals: dict[tuple[str, str], Totals] = {}  # (backend, model) -> month to date
        self._pending: dict[tuple[str, str, str], Totals] = {}  # (month, backend, model)
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future[None]] = set()
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
        for row in rows:
            totals = self.totals.setdefault((row.backend, row.model), Totals())
            totals.cost_usd += row.cost_usd
            totals.requests += row.requests
            totals.prompt_tokens += row.prompt_tokens
            totals.completion_tokens += row.completion_tokens
            self.spent += row.cost_usd
        if rows:
            log.info("month %s so far: $%.4f spent (from %s)", self.month, self.spent, "the store")

    async def aclose(self) -> None:
        """Write what is pending and wait for every write to finish; a failed write (put back
        into the pending batch) is tried again a few times before the spend is given up."""
        for attempt in range(CLOSE_ATTEMPTS):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if attempt:
                await asyncio.sleep(0.05 * attempt)
            self._flush()
            if self._writes:
                await asyncio.gather(*self._writes, return_exceptions=True)
            if not self._pending:
                break
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            lost = sum(t.cost_usd for t in self._pending.values())
            log.error("could not write $%.6f of spend to the state store at shutdown", lost)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self.store is not None:
            self.store.close()

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

    def reserve(self, amount: float, *, cloud: bool) -> Reservation | None:
        """Hold ``amount`` for a call; None when it would pass a limit that blocks it."""
        limit = self.limit
        if limit is not None and self.blocks(cloud):
            self._roll()
            if self.spent + self.reserved + amount > limit:
                self.refused += 1
                return None
        self.reserved += amount
        self.open_reservations += 1
        return Reservation(amount, cloud)

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
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.flush_interval, self._flush)

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
        self._timer = None
        if not self._pending or self.store is None or self._writer is None:
            return
        batch = [
            Spend(
                month, backend, model, t.cost_usd, t.requests, t.prompt_tokens, t.completion_tokens
            )  # fmt: skip
            for (month, backend, model), t in self._pending.items()
        ]
        self._pending = {}
        loop = asyncio.get_running_loop()
        write = loop.run_in_executor(self._writer, self.store.add, batch)
        self._writes.add(write)
        write.add_done_callback(lambda done: self._written(done, batch))

    def _written(self, done: asyncio.Future[None], batch: list[Spend]) -> None:
        self._writes.discard(done)
        if done.cancelled() or done.exception() is None:
            return
        log.error("could not write the spend to the state store (kept, tried again): %s",
                  done.exception())  # fmt: skip
        for spend in batch:  # nothing is lost: back into the next batch
            key = (spend.month, spend.backend, spend.model)
            pending = self._pending.setdefault(key, Totals())
            pending.cost_usd += spend.cost_usd
            pending.requests += spend.requests
            pending.prompt_tokens += spend.prompt_tokens
            pending.completion_tokens += spend.completion_tokens
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(1.0, self._flush)
