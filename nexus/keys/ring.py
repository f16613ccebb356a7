"""The key set, in memory: who a request's key belongs to, that key's limits and usage.

Every check on the request path is in memory: a dictionary lookup by hash, an expiry and
revocation check, the rate window, and the key's budget. The store (the state database) is read
at start and written off the request path: keys when the admin API changes them, usage in
batches every ``flush_interval`` seconds. A key revoked through the admin API is refused from
the next request on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson

from ..config import ConfiguredKey, KeyLimits
from ..cost.ledger import SOON, Reservation, month_of, next_month_start
from ..state.flush import FlushTimer
from ..state.store import KeyUsage, SharedStore, StateStore, StoredKey
from ..telemetry.outcomes import Outcome
from .tokens import MAX_KEY_LENGTH, hash_of, new_secret, prefix_of, same
from .window import RateWindow

log = logging.getLogger("nexus.keys")
SETTINGS = tuple(KeyLimits.model_fields)  # owner, expires_at, models, max_zone, rpm, ...


class NameTaken(Exception):
    """A key with this name exists (live, or declared in the config), or is being made."""


@dataclass(slots=True)
class Usage:
    """A key's month to date."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def minus(self, other: Usage) -> Usage:
        return Usage(
            self.requests - other.requests,
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.cost_usd - other.cost_usd,
        )

    def copy(self) -> Usage:
        return Usage(self.requests, self.prompt_tokens, self.completion_tokens, self.cost_usd)

    def view(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cost_usd": round(self.cost_usd, 8),
        }


@dataclass(slots=True)
class ClientKey:
    name: str
    hash: str
    prefix: str
    limits: KeyLimits
    source: str  # "config" (declared by hash) or "api" (created through the admin API)
    created_at: float
    revoked_at: float | None = None
    usage: Usage = field(default_factory=Usage)
    written: Usage = field(default_factory=Usage)  # the part of ``usage`` the store has
    reserved_usd: float = 0.0  # worst cases held by priced calls in flight
    held_in_store: float = 0.0  # the part of it the shared store holds for this replica
    window: RateWindow = field(init=False)
    expires: float = field(init=False)
    restricted: bool = field(init=False)
    _models: re.Pattern[str] | None = field(init=False)

    def __post_init__(self) -> None:
        self.configure(self.limits)

    def configure(self, limits: KeyLimits) -> None:
        old = getattr(self, "window", None)
        self.limits = limits
        self.window = RateWindow(limits.rpm, limits.tpm, limits.max_concurrent)
        if old is not None:  # new limits, same history: a PATCH does not reset the minute
            self.window.carry(old)
        self.expires = limits.expires_at.timestamp() if limits.expires_at else float("inf")
        self.restricted = limits.max_zone == "restricted"
        models = limits.models
        self._models = (
            None
            if models is None
            else re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in models) or "(?!)")
        )

    # --- what the router asks (routing.access.Access) ---------------------------------
    def allows(self, model: str) -> bool:
        return self._models is None or self._models.match(model) is not None

    def allowed(self) -> list[str]:
        return list(self.limits.models or ["*"])

    # --- the key's own budget --------------------------------------------------------------
    def reserve(self, worst: float) -> bool:
        limit = self.limits.monthly_budget_usd
        if limit is not None and self.usage.cost_usd + self.reserved_usd + worst > limit:
            return False
        self.reserved_usd += worst
        return True

    def release(self, worst: float) -> None:
        self.reserved_usd = max(0.0, self.reserved_usd - worst)

    def view(self) -> dict[str, Any]:
        """What the admin API and the CLI show: the settings, never the secret."""
        limits = self.limits.model_dump(mode="json")
        return {
            "name": self.name,
            **limits,
            "prefix": self.prefix,
            "source": self.source,
            "created_at": _rfc3339(self.created_at),
            "revoked_at": None if self.revoked_at is None else _rfc3339(self.revoked_at),
        }

    def stored(self) -> StoredKey:
        settings = orjson.dumps(self.limits.model_dump(mode="json", exclude_defaults=True))
        return StoredKey(
            self.name, self.hash, self.prefix, settings.decode(), self.created_at, self.revoked_at
        )


class KeyRing:
    def __init__(
        self,
        configured: list[ConfiguredKey],
        *,
        flush_interval: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.flush_interval = flush_interval
        self.version = 0  # changes whenever a key is added, changed or revoked
        self._by_name: dict[str, ClientKey] = {}
        self._by_hash: dict[str, ClientKey] = {}
        now = clock()
        for entry in configured:
            limits = KeyLimits.model_validate(entry.model_dump(include=set(SETTINGS)))
            self._add(ClientKey(entry.name, entry.hash, "", limits, "config", now))
        self.month = month_of(now)
        self.next_month = next_month_start(now)
        self.store: StateStore | None = None
        # names of the keys used since the last write: the key is looked up when written (a
        # name taken again after a revocation is one account, whichever key object holds it)
        self._dirty: set[str] = set()
        self._timer = FlushTimer(self._flush)
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writes: set[asyncio.Future[Any]] = set()
        self._creating: set[str] = set()  # names whose create is writing to the store
        # With a shared store: worst cases freed (name -> month, usd) and tokens for the keys'
        # shared minutes, written with the usage; batches whose write failed, sent again as is.
        self._freed: dict[str, tuple[str, float]] = {}
        self._tokens: dict[str, int] = {}
        self._unsent: list[tuple[str, list[KeyUsage]]] = []
        self._again = False  # a flush came while a write was in flight (shared stores)
        self.loaded = True  # False: the store could not be read at start (usage unknown)

    def __iter__(self) -> Iterator[ClientKey]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> ClientKey | None:
        return self._by_name.get(name)

    # --- the request path -----------------------------------------------------------------
    def find(self, secret: str) -> ClientKey | None:
        """The live key ``secret`` is: known, not revoked, not expired."""
        if not secret or len(secret) > MAX_KEY_LENGTH:
            return None
        digest = hash_of(secret)
        key = self._by_hash.get(digest)
        if key is None or not same(key.hash, digest):
            return None
        if key.revoked_at is not None or self.clock() >= key.expires:
            return None
        return key

    def by_hash(self, digest: str) -> ClientKey | None:
        """The key with this hash, live or not (to say why a request's key is refused)."""
        return self._by_hash.get(digest)

    def count(self, outcomes: Sequence[Outcome]) -> None:
        """Requests that ended, as the telemetry hands them over (a few ms later, in batches):
        each admitted one counts in its key's usage (in memory now, in the store soon) and its
        tokens in the key's minute. Nothing of this is done on the request's own path."""
        now = self.clock()
        if now >= self.next_month:
            self._roll(now)
        by_name, dirty = self._by_name, self._dirty
        shared = self.store is not None and self.store.shared
        for outcome in outcomes:
            name = outcome.key
            if name is None or not outcome.admitted:
                continue
            key = by_name.get(name)
            if key is None:
                continue
            prompt, completion = outcome.prompt_tokens or 0, outcome.completion_tokens or 0
            key.window.used(now, prompt + completion)
            if shared and key.limits.tpm is not None and prompt + completion:
                self._tokens[name] = self._tokens.get(name, 0) + prompt + completion
            usage = key.usage
            usage.requests += 1
            usage.prompt_tokens += prompt
            usage.completion_tokens += completion
            dirty.add(name)  # what changed is worked out when written
        if dirty and not self._timer.set:
            self._schedule()

    def charge(
        self, key: ClientKey, worst: float, cost: float, held: Reservation | None = None
    ) -> None:
        """A priced call of ``key`` settled: ``cost`` replaces the ``worst`` case it held (in
        the shared store too when ``held``, its reservation, was made there)."""
        self._roll(self.clock())
        self.release(key, worst, held)
        key.usage.cost_usd += cost
        self._dirty.add(key.name)
        self._schedule()

    def release(self, key: ClientKey, worst: float, held: Reservation | None = None) -> None:
        """``key`` no longer holds ``worst`` (freed in the shared store too when ``held``, its
        reservation, was made there: with the next batch, or at once when the budget is tight)."""
        key.release(worst)
        month = held.month if held is not None else ""
        if month and worst:
            key.held_in_store = max(key.held_in_store - worst, 0.0)
            _, before = self._freed.get(key.name, (month, 0.0))
            self._freed[key.name] = (month, before + worst)
            self._dirty.add(key.name)
            self._schedule(soon=held is not None and held.urgent)

    def retry_at_month_end(self) -> float:
        return max(1.0, self.next_month - self.clock())

    def roll(self) -> None:
        """Start a new month when one has begun (each key's usage from zero)."""
        self._roll(self.clock())

    def _roll(self, now: float) -> None:
        if now < self.next_month:
            return
        self._flush()  # last month's pending usage, written under last month
        self.month = month_of(now)
        self.next_month = next_month_start(now)
        for key in self._by_name.values():
            key.usage, key.written = Usage(), Usage()

    # --- managing keys (the admin API) ------------------------------------------------------
    async def create(self, name: str, limits: KeyLimits) -> tuple[ClientKey, str]:
        """A new key named ``name``; raises NameTaken while a live or config key has the name,
        or another create of the name is under way."""
        existing = self._by_name.get(name)
        if name in self._creating or (
            existing is not None and (existing.revoked_at is None or existing.source == "config")
        ):
            raise NameTaken(name)
        self._creating.add(name)  # claimed before the write: a concurrent create is refused
        try:
            return await self._create(name, limits, existing)
        finally:
            self._creating.discard(name)

    async def _create(
        self, name: str, limits: KeyLimits, existing: ClientKey | None
    ) -> tuple[ClientKey, str]:
        secret = new_secret()
        key = ClientKey(name, hash_of(secret), prefix_of(secret), limits, "api", self.clock())
        await self._save(key)
        if existing is not None:  # a revoked key's name: its month's usage stays with the name
            key.usage = existing.usage  # (as stored): a new secret is not a new budget
            key.written = existing.written
            self._remove(existing)
        self._add(key)
        log.info("key %s created (%s...)", name, key.prefix)
        return key, secret

    async def update(self, key: ClientKey, limits: KeyLimits) -> None:
        old = key.limits
        key.configure(limits)
        self.version += 1
        try:
            await self._save(key)
        except BaseException:
            key.configure(old)
            raise
        log.info("key %s updated", key.name)

    async def revoke(self, key: ClientKey) -> None:
        key.revoked_at = self.clock()  # refused from now on, whatever the store does
        self.version += 1
        await self._save(key)
        log.info("key %s revoked", key.name)

    # --- the store ------------------------------------------------------------------------------
    async def attach(self, store: StateStore) -> None:
        """Read the keys made through the admin API and the month's usage back."""
        writer = concurrent.futures.ThreadPoolExecutor(1, "nexus-keys")
        self.store, self._writer = store, writer
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(writer, store.keys)
        except Exception as exc:
            if not store.shared:
                raise
            # Redis is down at start: the config's keys serve; the rest is read when it is back
            log.error("the key set could not be read from the shared store: %s", exc)
            self.loaded = False
            return
        for row in rows:
            if row.name in self._by_name or row.hash in self._by_hash:
                log.warning("key %s in the state database is shadowed by [[auth.keys]]", row.name)
                continue
            try:
                limits = KeyLimits.model_validate_json(row.settings)
            except ValueError as exc:
                log.error("key %s in the state database is unreadable, skipped: %s", row.name, exc)
                continue
            self._add(
                ClientKey(
                    row.name, row.hash, row.prefix, limits, "api", row.created_at, row.revoked_at
                )  # fmt: skip
            )
        usage = await loop.run_in_executor(writer, store.key_usage, self.month)
        for used in usage:
            key = self._by_name.get(used.name)
            if key is not None:
                key.usage = Usage(
                    used.requests, used.prompt_tokens, used.completion_tokens, used.cost_usd
                )
                key.written = key.usage.copy()

    async def refresh(self, name: str) -> None:
        """A shared store announced a change to the key ``name`` (made on any replica): read
        it again and apply it (a revocation is refused here from then on)."""
        store, writer = self.store, self._writer
        if store is None or writer is None:
            return
        row = await asyncio.get_running_loop().run_in_executor(writer, store.key, name)
        if row is not None:
            self._apply(row)

    async def resync(self) -> None:
        """Read the whole key set again (changes announced while the store was away)."""
        store, writer = self.store, self._writer
        if store is None or writer is None:
            return
        loop = asyncio.get_running_loop()
        for row in await loop.run_in_executor(writer, store.keys):
            self._apply(row)
        if not self.loaded:  # the month's usage too, as a start would have read it
            for used in await loop.run_in_executor(writer, store.key_usage, self.month):
                key = self._by_name.get(used.name)
                if key is not None:  # what the store has is written; what is here, pending
                    for usage in (key.usage, key.written):
                        usage.requests += used.requests
                        usage.prompt_tokens += used.prompt_tokens
                        usage.completion_tokens += used.completion_tokens
                        usage.cost_usd += used.cost_usd
            self.loaded = True

    def _apply(self, row: StoredKey) -> None:
        existing = self._by_name.get(row.name)
        if existing is not None and existing.source == "config":
            return  # [[auth.keys]] shadows the store
        try:
            limits = KeyLimits.model_validate_json(row.settings)
        except ValueError as exc:
            log.error("key %s in the state store is unreadable, skipped: %s", row.name, exc)
            return
        if existing is not None and existing.hash == row.hash:
            if existing.limits != limits:
                existing.configure(limits)
            if existing.revoked_at != row.revoked_at:
                existing.revoked_at = row.revoked_at
                log.info("key %s revoked (on another replica)", row.name)
            self.version += 1
            return
        key = ClientKey(row.name, row.hash, row.prefix, limits, "api", row.created_at,
                        row.revoked_at)  # fmt: skip
        if existing is not None:  # the name made again: one account, as on the replica that did
            key.usage, key.written = existing.usage, existing.written
            self._remove(existing)
        self._add(key)

    async def _save(self, key: ClientKey) -> None:
        if self.store is None or self._writer is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self.store.put_key, key.stored())

    def _schedule(self, soon: bool = False) -> None:
        """Write within ``flush_interval``; ``soon``: within a few ms (a key's reservation in
        the shared store is freed promptly), unless writes are failing."""
        if self.store is None:
            return
        try:
            self._timer.within(SOON if soon and not self._unsent else self.flush_interval)
        except RuntimeError:  # counted outside the loop (the last drain): aclose writes it
            return

    def _flush(self) -> None:
        """Write what each key used since the last write (in the writer thread)."""
        self._timer.cancel()  # (when called before it fires)
        if self.store is None or self._writer is None:
            return
        if self.store.shared and self._writes:  # one write at a time: the rest goes next
            self._again = True
            return
        batches, self._unsent = self._unsent, []
        rows = self._rows()
        if rows:
            batches.append((uuid.uuid4().hex, rows))
        if not batches:
            return
        future: asyncio.Future[int]
        if self.store.shared:  # from the loop: freed reservations ahead of the next admission
            future = asyncio.ensure_future(self._write_shared(batches))
        else:
            future = asyncio.get_running_loop().run_in_executor(self._writer, self._write, batches)
        self._writes.add(future)
        future.add_done_callback(lambda f: self._written(f, batches))

    def _rows(self) -> list[KeyUsage]:
        dirty, self._dirty = self._dirty, set()
        freed, self._freed = self._freed, {}
        tokens, self._tokens = self._tokens, {}
        rows = []
        for name in dirty | tokens.keys():
            key = self._by_name.get(name)
            if key is None:
                continue
            delta = key.usage.minus(key.written)
            month, usd = freed.get(name, ("", 0.0))
            if delta != Usage() or usd or name in tokens:
                key.written = key.usage.copy()
                rows.append(
                    KeyUsage(
                        self.month,
                        name,
                        delta.requests,
                        delta.prompt_tokens,
                        delta.completion_tokens,
                        delta.cost_usd,
                        usd,
                        month,
                        tokens.get(name, 0),
                    )  # fmt: skip
                )
        return rows

    def _write(self, batches: list[tuple[str, list[KeyUsage]]]) -> int:
        """In the writer thread: the batches in order, up to the first that fails."""
        store = self.store
        assert store is not None
        for done, (batch, rows) in enumerate(batches):
            try:
                store.add_key_usage(rows, batch)
            except Exception as exc:
                if done == 0:
                    raise
                log.warning("key usage not written (%s); kept for the next write", exc)
                return done
        return len(batches)

    async def _write_shared(self, batches: list[tuple[str, list[KeyUsage]]]) -> int:
        store = cast(SharedStore, self.store)
        for done, (batch, rows) in enumerate(batches):
            try:
                await store.aadd_key_usage(rows, batch)
            except Exception:
                if done == 0:
                    raise
                return done
        return len(batches)

    def _written(
        self, future: asyncio.Future[int], batches: list[tuple[str, list[KeyUsage]]]
    ) -> None:
        self._writes.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("key usage not written (%s); kept for the next write", exc)
        written = 0 if exc is not None else future.result()
        if written < len(batches):
            self._unsent = batches[written:] + self._unsent  # sent again as they are
            self._schedule()
        elif self._again:
            self._again = False
            self._flush()

    async def aclose(self) -> None:
        self._timer.cancel()
        self._flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._unsent:  # the last write failed: try once more
            self._flush()
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._unsent:
            lost = sum(len(rows) for _, rows in self._unsent)
            log.error("key usage lost at shutdown: %d keys' last usage", lost)
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    def _add(self, key: ClientKey) -> None:
        self.version += 1
        self._by_name[key.name] = key
        self._by_hash[key.hash] = key

    def _remove(self, key: ClientKey) -> None:
        self.version += 1
        self._by_name.pop(key.name, None)
        self._by_hash.pop(key.hash, None)


def _rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
