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


class StateStore(Protocol):
    """Blocking calls, made off the event loop (one writer thread)."""

    def month(self, month: str) -> list[Spend]:
        """Everything settled in ``month``, one row per backend and model."""
        ...

    def add(self, spends: Sequence[Spend]) -> None:
        """Add ``spends`` to the stored totals, all or nothing, durably."""
        ...

    def close(self) -> None: ...
