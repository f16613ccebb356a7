"""The embedded store: one SQLite file in WAL mode. A batch is one transaction; with WAL and
``synchronous = NORMAL`` a committed batch survives the process being killed (not a power cut
before the OS writes it out, which ``FULL`` would cover at a cost on every batch)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from .store import KeyUsage, Spend, StoredKey

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
);
CREATE TABLE IF NOT EXISTS client_keys (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    settings TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS key_usage (
    month TEXT NOT NULL,
    name TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (month, name)
);
"""
ADD_KEY_USAGE = """
INSERT INTO key_usage (month, name, requests, prompt_tokens, completion_tokens, cost_usd)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (month, name) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cost_usd = cost_usd + excluded.cost_usd
"""
PUT_KEY = """
INSERT OR REPLACE INTO client_keys (name, hash, prefix, settings, created_at, revoked_at)
VALUES (?, ?, ?, ?, ?, ?)
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
    shared = False

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # one connection, used from the writer thread and start-up
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.executescript(SCHEMA)

    def month(self, month: str) -> list[Spend]:
        with self._lock:
            rows = self._db.execute(
                "SELECT month, backend, model, cost_usd, requests, prompt_tokens, "
                "completion_tokens FROM spend WHERE month = ?",
                (month,),
            ).fetchall()
        return [Spend(*row) for row in rows]

    def keys(self) -> list[StoredKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, hash, prefix, settings, created_at, revoked_at FROM client_keys"
            ).fetchall()
        return [StoredKey(*row) for row in rows]

    def key(self, name: str) -> StoredKey | None:
        return next((key for key in self.keys() if key.name == name), None)

    def put_key(self, key: StoredKey) -> None:
        row = (key.name, key.hash, key.prefix, key.settings, key.created_at, key.revoked_at)
        self._write(PUT_KEY, [row])

    def key_usage(self, month: str) -> list[KeyUsage]:
        with self._lock:
            rows = self._db.execute(
                "SELECT month, name, requests, prompt_tokens, completion_tokens, cost_usd "
                "FROM key_usage WHERE month = ?",
                (month,),
            ).fetchall()
        return [KeyUsage(*row) for row in rows]

    def add_key_usage(self, usage: Sequence[KeyUsage], batch: str = "") -> None:
        rows = [
            (u.month, u.name, u.requests, u.prompt_tokens, u.completion_tokens, u.cost_usd)
            for u in usage
        ]
        self._write(ADD_KEY_USAGE, rows)

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
        self._write(ADD, rows)

    def _write(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        """``rows`` in one transaction: all or nothing."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
