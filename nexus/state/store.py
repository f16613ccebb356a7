"""The store interface: what the ledger keeps and reads back. SQLite is the embedded default;
a shared store for replicas implements the same calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

NANO = 1_000_000_000  # nanodollars in a dollar: what a shared store counts money in


class Unreachable(Exception):
    """The shared store (Redis) cannot be reached; the cause is chained."""


def nanos(usd: float) -> int:
    return round(usd * NANO)


def dollars(nanodollars: int | float | bytes | str) -> float:
    whole = nanodollars if type(nanodollars) is int else int(float(nanodollars))
    return whole / NANO


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
    """One key's usage in one month: added to what the store holds. A shared store also holds
    the key's reservations and calls in flight; what of those ended comes with the usage."""

    month: str
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    freed_usd: float = 0.0  # worst cases no longer held (shared stores)
    freed_month: str = ""  # the month they were reserved in
    window_tokens: int = 0  # tokens for the key's shared minute (a key with tpm)


class StateStore(Protocol):
    """Blocking calls, made off the event loop (one writer thread). ``shared``: reservations
    and limits are kept in the store for several replicas (Redis), not in this process."""

    shared: bool

    def month(self, month: str) -> list[Spend]:
        """Everything settled in ``month``, one row per backend and model."""
        ...

    def add(self, spends: Sequence[Spend]) -> None:
        """Add ``spends`` to the stored totals, all or nothing, durably."""
        ...

    def keys(self) -> list[StoredKey]:
        """Every key created through the admin API (revoked ones too)."""
        ...

    def key(self, name: str) -> StoredKey | None:
        """The key named ``name`` (revoked or not), if the store has it."""
        ...

    def put_key(self, key: StoredKey) -> None:
        """Create or replace the key named ``key.name``, durably."""
        ...

    def key_usage(self, month: str) -> list[KeyUsage]: ...

    def add_key_usage(self, usage: Sequence[KeyUsage], batch: str = "") -> None:
        """Add ``usage`` to the stored totals, all or nothing, durably (once per ``batch`` id
        in a shared store)."""
        ...

    def close(self) -> None: ...


class SharedStore(StateStore, Protocol):
    """A store replicas share (``shared`` is True): the writes that free reservations are also
    made from the event loop, so that they reach the store ahead of any later admission."""

    async def asettle(
        self, batch: str, spends: Sequence[Spend], freed: Sequence[tuple[str, float]]
    ) -> float | None:
        """Add ``spends`` and free the ``(month, usd)`` reservations they held, in one step,
        once per ``batch`` id; the month's spend across the replicas."""
        ...

    async def aadd_key_usage(self, usage: Sequence[KeyUsage], batch: str = "") -> None: ...

    async def aclose(self) -> None: ...
