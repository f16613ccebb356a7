"""The ledger: reservations before priced calls, settlements after, the hard-limit actions, UTC
months, the status thresholds and headers, and the spend kept in a real SQLite store (batched,
retried when a write fails, read back after a restart). The clock is injected."""

from __future__ import annotations

import asyncio
import calendar
import sqlite3
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nexus.config import BudgetSettings
from nexus.cost.ledger import HARD_LIMIT, NORMAL, SOFT_LIMIT, Ledger, month_of, next_month_start
from nexus.state.sqlite import SQLiteStore
from nexus.state.store import Spend

T = TypeVar("T")
DEC_31_LAST_SECOND = float(calendar.timegm((2026, 12, 31, 23, 59, 59)))
JAN_1 = float(calendar.timegm((2027, 1, 1, 0, 0, 0)))
MID_MONTH = float(calendar.timegm((2026, 11, 15, 12, 0, 0)))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget(limit: float | None = 10.0, action: str = "block_cloud", soft: float = 75.0) -> Any:
    return BudgetSettings(
        monthly_limit_usd=limit, hard_limit_action=action, soft_limit_percent=soft
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def until(condition: Any, within: float = 10.0) -> bool:
    """Poll ``condition`` on the loop until it holds or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        await asyncio.sleep(0.01)
    return True


def stored(path: Path, month: str) -> dict[tuple[str, str], float]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT backend, model, cost_usd FROM spend WHERE month = ?", (month,)
        ).fetchall()
    finally:
        db.close()
    return {(backend, model): cost for backend, model, cost in rows}


class CountingStore(SQLiteStore):
    """The real store, counting its batches and failing the first ``failures`` of them."""

    def __init__(self, path: Path, failures: int = 0) -> None:
        super().__init__(path)
        self.failures = failures
        self.batches: list[list[Spend]] = []
        self.failed = 0

    def add(self, spends: Sequence[Spend]) -> None:
        if self.failed < self.failures:
            self.failed += 1
            raise sqlite3.OperationalError("database is locked")
        super().add(spends)
        self.batches.append(list(spends))


# --- reserve, settle, release ------------------------------------------------------------------


def test_reservations_hold_the_worst_case_until_settled_or_released():
    async def scenario() -> None:
        ledger = Ledger(budget(10.0), clock=Clock(MID_MONTH))
        first = ledger.reserve(3.0, cloud=True)
        assert first is not None
        assert ledger.reserved == 3.0 and ledger.spent == 0.0
        assert ledger.reserve(8.0, cloud=True) is None  # 3 held + 8 > 10
        assert ledger.refused == 1
        second = ledger.reserve(7.0, cloud=True)  # exactly the limit: allowed
        assert second is not None
        assert ledger.reserve(0.01, cloud=True) is None
        ledger.settle(first, 2.0, "cloud", "m", 10, 5)
        assert ledger.spent == 2.0
        assert ledger.reserved == pytest.approx(7.0)
        assert ledger.open_reservations == 1
        ledger.release(second)
        assert ledger.reserved == 0.0 and ledger.open_reservations == 0
        # Twice is once: a reservation is freed only once.
        ledger.release(second)
        ledger.settle(first, 0.0, "cloud", "m", 0, 0)
        assert ledger.reserved == 0.0 and ledger.open_reservations == 0
        assert ledger.spent == 2.0
        totals = ledger.totals[("cloud", "m")]
        assert (totals.cost_usd, totals.requests, totals.prompt_tokens) == (2.0, 2, 10)
        # What was settled now counts against the limit: 2 spent + 8.5 > 10.
        assert ledger.reserve(8.5, cloud=True) is None
        assert ledger.reserve(8.0, cloud=True) is not None

    run(scenario())


def test_without_a_limit_every_reservation_is_granted():
    ledger = Ledger(budget(None), clock=Clock(MID_MONTH))
    assert all(ledger.reserve(1e6, cloud=True) is not None for _ in range(5))
    assert not ledger.enabled
    assert ledger.status() == NORMAL
    assert ledger.headers() == []
    assert "monthly_limit_usd" not in ledger.snapshot()


@pytest.mark.parametrize(
    ("action", "cloud_allowed", "local_allowed"),
    [("block_cloud", False, True), ("block_all", False, False), ("warn", True, True)],
)
def test_the_hard_limit_action_decides_who_is_refused(action, cloud_allowed, local_allowed):
    async def scenario() -> None:
        ledger = Ledger(budget(1.0, action), clock=Clock(MID_MONTH))
        ledger.settle(ledger.reserve(1.0, cloud=True), 1.0, "cloud", "m", 1, 1)
        assert ledger.status() == HARD_LIMIT
        assert (ledger.reserve(0.001, cloud=True) is not None) is cloud_allowed
        assert (ledger.reserve(0.001, cloud=False) is not None) is local_allowed
        assert ledger.blocks(True) is not cloud_allowed
        assert ledger.blocks(False) is not local_allowed

    run(scenario())


def test_warn_lets_the_spend_pass_the_limit_and_says_so():
    async def scenario() -> None:
        ledger = Ledger(budget(1.0, "warn"), clock=Clock(MID_MONTH))
        for _ in range(3):
            ledger.settle(ledger.reserve(0.5, cloud=True), 0.5, "cloud", "m", 1, 1)
        assert ledger.spent == 1.5
        view = ledger.snapshot()
        assert view["status"] == HARD_LIMIT
        assert view["remaining_usd"] == 0.0
        assert view["utilization_percent"] == 150.0

    run(scenario())


# --- months ------------------------------------------------------------------------------------


def test_months_are_utc_calendar_months(monkeypatch):
    # Far east of UTC: local time is already 2027 well before midnight UTC.
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        assert month_of(DEC_31_LAST_SECOND) == "2026-12"
        assert month_of(JAN_1) == "2027-01"
        assert next_month_start(DEC_31_LAST_SECOND) == JAN_1
        assert next_month_start(MID_MONTH) == float(calendar.timegm((2026, 12, 1, 0, 0, 0)))
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_spend_starts_again_at_the_new_year(tmp_path):
    path = tmp_path / "state.db"
    clock = Clock(DEC_31_LAST_SECOND)

    async def december() -> None:
        ledger = Ledger(budget(10.0, soft=50), SQLiteStore(path), flush_interval=0.01, clock=clock)
        held = ledger.reserve(1.0, cloud=True)
        ledger.settle(ledger.reserve(6.0, cloud=True), 6.0, "cloud", "m", 1, 1)
        assert ledger.month == "2026-12"
        assert ledger.status() == SOFT_LIMIT
        clock.now = JAN_1
        assert ledger.status() == NORMAL
        view = ledger.snapshot()
        assert view["month"] == "2027-01"
        assert view["current_spending_usd"] == 0.0
        assert view["reserved_usd"] == 1.0  # a call in flight is still held
        assert ledger.totals == {}
        assert ledger.rollovers == 1
        # A call started in December and ending in January counts in January.
        ledger.settle(held, 0.25, "cloud", "m", 1, 1)
        assert ledger.spent == 0.25
        await ledger.aclose()

    run(december())
    assert stored(path, "2026-12") == {("cloud", "m"): 6.0}
    assert stored(path, "2027-01") == {("cloud", "m"): 0.25}

    async def restart(now: float) -> float:
        ledger = Ledger(budget(10.0), SQLiteStore(path), clock=Clock(now))
        await ledger.load()
        spent = ledger.spent
        await ledger.aclose()
        return spent

    assert run(restart(DEC_31_LAST_SECOND)) == 6.0
    assert run(restart(JAN_1)) == 0.25


# --- status and headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spent", "soft", "status"),
    [
        (0.0, 75.0, NORMAL),
        (74.99, 75.0, NORMAL),
        (75.0, 75.0, SOFT_LIMIT),
        (99.99, 75.0, SOFT_LIMIT),
        (100.0, 75.0, HARD_LIMIT),
        (49.0, 50.0, NORMAL),
        (50.0, 50.0, SOFT_LIMIT),
    ],
)
def test_status_thresholds(spent, soft, status):
    async def scenario() -> None:
        ledger = Ledger(budget(100.0, soft=soft), clock=Clock(MID_MONTH))
        if spent:
            ledger.settle(None, spent, "cloud", "m", 0, 0)
        assert ledger.status() == status

    run(scenario())


def test_soft_limit_defaults_to_75_percent():
    assert BudgetSettings(monthly_limit_usd=1.0).soft_limit_percent == 75.0
    ledger = Ledger(BudgetSettings(monthly_limit_usd=1.0), clock=Clock(MID_MONTH))
    assert ledger.snapshot()["soft_limit_percent"] == 75.0


def test_no_headers_while_normal_then_status_utilization_remaining():
    async def scenario() -> None:
        ledger = Ledger(budget(20.0), clock=Clock(MID_MONTH))
        ledger.settle(None, 10.0, "cloud", "m", 0, 0)
        assert ledger.headers() == []
        ledger.settle(None, 6.5, "cloud", "m", 0, 0)
        assert dict(ledger.headers()) == {
            b"x-nexus-budget-status": b"SoftLimit",
            b"x-nexus-budget-utilization": b"82.50",
            b"x-nexus-budget-remaining": b"3.50",
        }
        ledger.settle(None, 5.0, "cloud", "m", 0, 0)
        assert dict(ledger.headers()) == {
            b"x-nexus-budget-status": b"HardLimit",
            b"x-nexus-budget-utilization": b"107.50",
            b"x-nexus-budget-remaining": b"0.00",
        }

    run(scenario())


def test_snapshot_is_the_stats_budget_object():
    async def scenario() -> None:
        ledger = Ledger(budget(8.0, "block_all", soft=80), clock=Clock(MID_MONTH))
        ledger.reserve(0.5, cloud=False)
        ledger.settle(None, 2.0, "box", "m", 0, 0)
        assert ledger.snapshot() == {
            "month": "2026-11",
            "current_spending_usd": 2.0,
            "reserved_usd": 0.5,
            "status": NORMAL,
            "monthly_limit_usd": 8.0,
            "remaining_usd": 6.0,
            "utilization_percent": 25.0,
            "soft_limit_percent": 80.0,
            "hard_limit_action": "block_all",
        }

    run(scenario())


# --- the store ---------------------------------------------------------------------------------


def test_settlements_are_batched_and_read_back_after_a_restart(tmp_path):
    path = tmp_path / "state.db"
    store = CountingStore(path)

    async def serve() -> None:
        ledger = Ledger(budget(100.0), store, flush_interval=0.05, clock=Clock(MID_MONTH))
        for _ in range(50):
            ledger.settle(ledger.reserve(0.1, cloud=True), 0.1, "cloud", "gpt", 10, 2)
        ledger.settle(None, 0.0, "box", "llama", 7, 3)  # free calls are counted too
        assert store.batches == []  # nothing written on the request path
        assert await until(lambda: bool(store.batches))
        assert len(store.batches) == 1  # the fifty settlements, one transaction
        assert stored(path, "2026-11")[("cloud", "gpt")] == pytest.approx(5.0)
        await ledger.aclose()

    run(serve())

    async def restart() -> None:
        ledger = Ledger(budget(100.0), SQLiteStore(path), clock=Clock(MID_MONTH))
        await ledger.load()
        assert ledger.spent == pytest.approx(5.0)
        gpt = ledger.totals[("cloud", "gpt")]
        assert (gpt.requests, gpt.prompt_tokens, gpt.completion_tokens) == (50, 500, 100)
        assert ledger.totals[("box", "llama")].requests == 1
        await ledger.aclose()

    run(restart())


def test_the_store_is_in_wal_mode(tmp_path):
    store = SQLiteStore(tmp_path / "deep" / "state.db")  # its directory is made
    try:
        db = sqlite3.connect(tmp_path / "deep" / "state.db")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
    finally:
        store.close()


def test_a_failed_write_keeps_the_spend_and_tries_again(tmp_path, caplog):
    path = tmp_path / "state.db"
    store = CountingStore(path, failures=2)

    async def scenario() -> None:
        ledger = Ledger(budget(100.0), store, flush_interval=0.01, clock=Clock(MID_MONTH))
        ledger.settle(ledger.reserve(1.0, cloud=True), 1.0, "cloud", "gpt", 1, 1)
        assert await until(lambda: store.failed >= 1)
        ledger.settle(ledger.reserve(0.5, cloud=True), 0.5, "cloud", "gpt", 1, 1)
        assert ledger.spent == 1.5  # the budget never forgets, whatever the store does
        assert await until(lambda: bool(store.batches))
        assert await until(lambda: stored(path, "2026-11").get(("cloud", "gpt")) == 1.5)
        assert store.failed == 2
        await ledger.aclose()

    run(scenario())
    assert "could not write the spend" in caplog.text


def test_a_clean_close_writes_what_is_pending(tmp_path):
    path = tmp_path / "state.db"

    async def scenario() -> None:
        ledger = Ledger(
            budget(100.0), SQLiteStore(path), flush_interval=1.0, clock=Clock(MID_MONTH)
        )
        ledger.settle(None, 0.75, "cloud", "gpt", 1, 1)
        await ledger.aclose()  # long before the flush timer

    run(scenario())
    assert stored(path, "2026-11") == {("cloud", "gpt"): 0.75}


def test_a_clean_close_retries_a_write_that_failed(tmp_path):
    """A store that fails once at shutdown (a lock held a moment) does not lose the spend."""
    path = tmp_path / "state.db"
    store = CountingStore(path, failures=1)

    async def scenario() -> None:
        ledger = Ledger(budget(100.0), store, flush_interval=1.0, clock=Clock(MID_MONTH))
        ledger.settle(None, 0.75, "cloud", "gpt", 1, 1)
        await ledger.aclose()

    run(scenario())
    assert store.failed == 1
    assert stored(path, "2026-11") == {("cloud", "gpt"): 0.75}
