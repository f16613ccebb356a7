"""The store interface: what the ledger keeps and reads back. SQLite is the embedded default;
a shared store for replicas implements the same calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Spend:
    """Settled spend of one (month, backend, model): added to what the store holds."""

    month: str  # "YYYY-MM", UTC
    backend: str
    model: str
    cost_usd: float
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A client key as kept: never the secret, only its hash and a prefix to recognise it by."""

    name: str
    hash: str  # "sha256:<hex>"
    prefix: str
    settings: str  # the key's settings, as JSON
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """One key's usage in one month: added to what the store holds."""

    month: str
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class StateStore(Protocol):
    """Blocking calls, made off the event loop (one writer thread)."""

    def month(self, month: str) -> list[Spend]:
        """Everything settled in ``month``, one row per backend and model."""
        ...

    def add(self, spends: Sequence[Spend]) -> None:
        """Add ``spends`` to the stored totals, all or nothing, durably."""
        ...

    def keys(self) -> list[StoredKey]:
        """Every key created through the admin API (revoked ones too)."""
        ...

    def put_key(self, key: StoredKey) -> None:
        """Create or replace the key named ``key.name``, durably."""
        ...

    def key_usage(self, month: str) -> list[KeyUsage]: ...

    def add_key_usage(self, usage: Sequence[KeyUsage]) -> None:
        """Add ``usage`` to the stored totals, all or nothing, durably."""
        ...

    def close(self) -> None: ...
