"""A key's usage reaches the store as what changed since the last write, worked out when written
(not per request): nothing counted twice, nothing lost when a write fails, and a key's month
read back at start is not written again."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from nexus.config import ConfiguredKey, KeyLimits
from nexus.keys.ring import KeyRing
from nexus.keys.tokens import hash_of, new_secret
from nexus.state.store import KeyUsage, Spend, StoredKey
from nexus.telemetry.outcomes import Trace, outcome_of

NOW = 1_796_000_000.0


class Store:
    """In memory; ``failures`` key-usage writes fail before they succeed again."""

    shared = False

    def __init__(self, failures: int = 0, usage: Sequence[KeyUsage] = ()) -> None:
        self.failures = failures
        self.rows: dict[tuple[str, str], list[float]] = {}
        self.writes = 0
        for row in usage:
            self._add(row)

    def _add(self, row: KeyUsage) -> None:
        total = self.rows.setdefault((row.month, row.name), [0, 0, 0, 0.0])
        for i, value in enumerate(
            (row.requests, row.prompt_tokens, row.completion_tokens, row.cost_usd)
        ):
            total[i] += value

    def month(self, month: str) -> list[Spend]:
        return []

    def add(self, spends: Sequence[Spend]) -> None:
        pass

    def keys(self) -> list[StoredKey]:
        return []

    def key(self, name: str) -> StoredKey | None:
        return None

    def put_key(self, key: StoredKey) -> None:
        pass

    def key_usage(self, month: str) -> list[KeyUsage]:
        return [
            KeyUsage(m, name, int(r[0]), int(r[1]), int(r[2]), r[3])
            for (m, name), r in self.rows.items()
            if m == month
        ]

    def add_key_usage(self, usage: Sequence[KeyUsage], batch: str = "") -> None:
        self.writes += 1
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        for row in usage:
            self._add(row)

    def close(self) -> None:
        pass


def ring_of(*names: str) -> KeyRing:
    keys = [ConfiguredKey(name=name, hash=hash_of(new_secret())) for name in names]
    return KeyRing(keys, flush_interval=3600, clock=lambda: NOW)  # written when asked only


async def write(ring: KeyRing) -> None:
    ring._flush()
    await asyncio.gather(*ring._writes, return_exceptions=True)


def use(ring: KeyRing, name: str, prompt: int, completion: int, cost: float = 0.0) -> None:
    key = ring.get(name)
    assert key is not None
    trace = Trace(prompt_tokens=prompt, completion_tokens=completion, client_key=key)
    ring.count([outcome_of(trace, "req", 200, 1.0)])
    if cost:
        ring.charge(key, 0.0, cost)


def test_each_write_carries_only_what_changed_since_the_last() -> None:
    async def scenario() -> Store:
        store = Store()
        ring = ring_of("a", "b")
        await ring.attach(store)
        use(ring, "a", 5, 4, cost=0.25)
        use(ring, "a", 1, 1)
        await write(ring)
        use(ring, "b", 2, 2)
        await write(ring)  # "a" did nothing since: not written again
        use(ring, "a", 3, 0)
        await ring.aclose()
        return store

    store = asyncio.run(scenario())
    month = next(iter(store.rows))[0]
    assert store.rows[(month, "a")] == [3, 9, 5, 0.25]
    assert store.rows[(month, "b")] == [1, 2, 2, 0.0]
    assert store.writes == 3


def test_a_failed_write_is_carried_into_the_next() -> None:
    async def scenario() -> Store:
        store = Store(failures=1)
        ring = ring_of("a")
        await ring.attach(store)
        use(ring, "a", 5, 4)
        await write(ring)  # fails: kept
        use(ring, "a", 1, 1)
        await ring.aclose()
        return store

    store = asyncio.run(scenario())
    assert list(store.rows.values()) == [[2, 6, 5, 0.0]]


def test_the_month_read_back_at_start_is_not_written_again() -> None:
    async def scenario(store: Store) -> list[int]:
        ring = ring_of("a")
        await ring.attach(store)
        key = ring.get("a")
        assert key is not None
        before = [key.usage.requests, key.usage.prompt_tokens]
        use(ring, "a", 1, 1)
        await ring.aclose()
        return before

    ring = ring_of("a")
    store = Store(usage=[KeyUsage(ring.month, "a", 10, 100, 50, 1.5)])
    assert asyncio.run(scenario(store)) == [10, 100]
    assert store.rows[(ring.month, "a")] == [11, 101, 51, 1.5]


def test_a_request_the_keys_limits_refused_is_not_counted() -> None:
    ring = ring_of("a")
    key = ring.get("a")
    assert key is not None
    refused = Trace(client_key=key, admitted=False)
    answered = Trace(prompt_tokens=3, completion_tokens=2, client_key=key)
    other = Trace(prompt_tokens=7, completion_tokens=7)  # no key: [auth] off

    ring.count([outcome_of(t, "req", s, 1.0) for t, s in ((refused, 429), (answered, 200))])
    ring.count([outcome_of(other, "req", 200, 1.0)])

    assert (key.usage.requests, key.usage.prompt_tokens, key.usage.completion_tokens) == (1, 3, 2)


def test_a_name_taken_again_is_one_account_in_the_store() -> None:
    """Used, revoked and made again under the same name before anything was written: the store
    gets the name's usage once (the old key's object must not be the one brought up to date)."""

    async def scenario() -> tuple[Store, int]:
        store = Store()
        ring = ring_of()
        await ring.attach(store)
        old, _ = await ring.create("team", KeyLimits())
        use(ring, "team", 5, 2)
        use(ring, "team", 5, 2)
        await ring.revoke(old)
        new, _ = await ring.create("team", KeyLimits())  # keeps the name's month, unwritten
        await write(ring)
        use(ring, "team", 5, 2)
        await write(ring)
        await ring.aclose()
        return store, new.usage.requests

    store, requests = asyncio.run(scenario())
    assert requests == 3
    assert list(store.rows.values()) == [[3, 15, 6, 0.0]]
