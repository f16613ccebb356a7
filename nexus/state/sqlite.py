"""The embedded store: one SQLite file in WAL mode. A batch is one transaction; with WAL and
``synchronous = NORMAL`` a committed batch survives the process being killed (not a power cut
before the OS writes it out, which ``FULL`` would cover at a cost on every batch)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from .store import Spend

SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    month TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    cost_usd REAL NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (month, backend, model)
)
"""
ADD = """
INSERT INTO spend (month, backend, model, cost_usd, requests, prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (month, backend, model) DO UPDATE SET
    cost_usd = cost_usd + excluded.cost_usd,
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # one connection, used from the writer thread and start-up
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.execute(SCHEMA)

    def month(self, month: str) -> list[Spend]:
        with self._lock:
            rows = self._db.execute(
                "SELECT month, backend, model, cost_usd, requests, prompt_tokens, "
                "completion_tokens FROM spend WHERE month = ?",
                (month,),
            ).fetchall()
        return [Spend(*row) for row in rows]

    def add(self, spends: Sequence[Spend]) -> None:
        rows = [
            (
                s.month,
                s.backend,
                s.model,
                s.cost_usd,
                s.requests,
                s.prompt_tokens,
                s.completion_tokens,
            )  # fmt: skip
            for s in spends
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(ADD, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
