"""The shared store: a Redis server that several replicas use (``[state] backend = "redis"``).

What it keeps, under ``[state] redis_prefix`` (default ``nexus:``):

- ``spend:<month>``: the settled spend per backend and model (whole nanodollars, requests and
  tokens) and the month's ``total``; ``reserved:<month>``: each replica's reservations;
- ``keys``: the key set (hashes and settings, never a secret), and the channel ``keys`` on which
  a change to a key is announced (each replica reads the key again at once);
- ``keyusage:<month>``, ``keyres:<month>:<name>``, ``rpm:<name>``, ``tpm:<name>``,
  ``conc:<name>``: each key's usage, reservations, minute and calls in flight;
- ``replicas``: each replica's lease; ``batch:<id>``: batches already counted (a day).

This class is the blocking half (the ``StateStore`` calls, made in a writer thread). The request
path's half, one script per limited or priced request, is ``redis_gate.RedisGate``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from .redis_lua import KEY_USAGE, SCRIPTS, SETTLE
from .resp import ReplyError, RespClient, Script
from .store import KeyUsage, Spend, StoredKey, Unreachable, dollars, nanos

TIMEOUT = 2.0  # seconds a call to Redis may take before it counts as a failure


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """How to reach the server: the checked URL's parts and the password from the environment."""

    host: str
    port: int
    db: int
    tls: bool
    username: str | None
    password: str | None
    shown: str  # for messages: never the password

    def options(self) -> dict[str, Any]:
        """Connection options shared by the blocking and the asyncio clients."""
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": TIMEOUT,
            "socket_connect_timeout": TIMEOUT,
        }
        if self.tls:
            options["ssl"] = True
        return options

    def async_client(self) -> aioredis.Redis:
        """redis-py's asyncio client (pub/sub)."""
        return aioredis.Redis(**self.options())

    def resp_client(self) -> RespClient:
        """The lean pipelined client of the request path and the batches (``resp``)."""
        return RespClient(
            self.host, self.port, db=self.db, username=self.username, password=self.password,
            tls=self.tls, timeout=TIMEOUT,
        )  # fmt: skip


class RedisStore:
    shared = True

    def __init__(
        self, target: RedisTarget, prefix: str, replica: str, client: RespClient | None = None
    ) -> None:
        self.prefix = prefix
        self.replica = replica  # this replica's name: what it holds is kept under it
        self.channel = f"{prefix}keys"
        self._db = redis.Redis(**target.options())
        self._settle = self._db.register_script(SETTLE)
        self._key_usage = self._db.register_script(KEY_USAGE)
        self._aio = client or target.resp_client()  # the batches, from the event loop
        self._asettle, self._akey_usage = Script(SETTLE, prefix), Script(KEY_USAGE, prefix)

    def persistence(self) -> str:
        """What the server says of its persistence (``appendonly``), or why it cannot say."""
        try:
            value = self._db.config_get("appendonly").get("appendonly", "?")
        except redis.RedisError as exc:  # CONFIG may be renamed or forbidden
            return f"unknown ({exc})"
        return f"appendonly {value.decode() if isinstance(value, bytes) else value}"

    # --- the month's spend ----------------------------------------------------------------
    def month(self, month: str) -> list[Spend]:
        fields = self._db.hgetall(f"{self.prefix}spend:{month}")
        rows: dict[tuple[str, str], list[int]] = {}
        for name, value in fields.items():
            kind, _, rest = _text(name).partition("\t")
            backend, _, model = rest.partition("\t")
            if kind not in ("c", "r", "p", "o") or not backend:
                continue
            row = rows.setdefault((backend, model), [0, 0, 0, 0])
            row["crpo".index(kind)] = int(value)
        return [
            Spend(month, backend, model, dollars(c), r, p, o)
            for (backend, model), (c, r, p, o) in rows.items()
        ]

    def add(self, spends: Sequence[Spend]) -> None:
        self._settle(args=[self.prefix, self._settled("", spends, ())])

    async def asettle(
        self, batch: str, spends: Sequence[Spend], freed: Sequence[tuple[str, float]]
    ) -> float | None:
        """``settle`` from the event loop: sent at once, ahead of any later admission (a
        reservation freed here is free for the next request, on any replica)."""
        total = await self._aio.run(self._asettle, self._settled(batch, spends, freed))
        return dollars(total) if spends else None

    def _settled(
        self, batch: str, spends: Sequence[Spend], freed: Sequence[tuple[str, float]]
    ) -> bytes:
        spend = [
            [
                s.month,
                s.backend,
                s.model,
                nanos(s.cost_usd),
                s.requests,
                s.prompt_tokens,
                s.completion_tokens,
            ]  # fmt: skip
            for s in spends
        ]
        release = [[month, nanos(usd)] for month, usd in freed]
        payload = {"id": batch or _new_id(), "me": self.replica, "spend": spend, "release": release}
        return orjson.dumps(payload)

    # --- keys -------------------------------------------------------------------------------
    def keys(self) -> list[StoredKey]:
        return [_stored(value) for value in self._db.hgetall(f"{self.prefix}keys").values()]

    def key(self, name: str) -> StoredKey | None:
        value = self._db.hget(f"{self.prefix}keys", name)
        return None if value is None else _stored(value)

    def put_key(self, key: StoredKey) -> None:
        """Kept, and announced to every replica in the same step."""
        value = orjson.dumps(
            [key.name, key.hash, key.prefix, key.settings, key.created_at, key.revoked_at]
        )
        with self._db.pipeline(transaction=True) as pipe:
            pipe.hset(f"{self.prefix}keys", key.name, value)
            pipe.publish(self.channel, key.name)
            pipe.execute()

    def key_usage(self, month: str) -> list[KeyUsage]:
        fields = self._db.hgetall(f"{self.prefix}keyusage:{month}")
        rows: dict[str, list[int]] = {}
        for field, value in fields.items():
            kind, _, name = _text(field).partition("\t")
            if kind in ("r", "p", "o", "c") and name:
                rows.setdefault(name, [0, 0, 0, 0])["rpoc".index(kind)] = int(value)
        return [KeyUsage(month, name, r, p, o, dollars(c)) for name, (r, p, o, c) in rows.items()]

    def add_key_usage(self, usage: Sequence[KeyUsage], batch: str = "") -> None:
        for payload in self._usage(usage, batch):
            self._key_usage(args=[self.prefix, payload])

    async def aadd_key_usage(self, usage: Sequence[KeyUsage], batch: str = "") -> None:
        """``add_key_usage`` from the event loop (a key's freed reservation, at once)."""
        for payload in self._usage(usage, batch):
            await self._aio.run(self._akey_usage, payload)

    def _usage(self, usage: Sequence[KeyUsage], batch: str) -> list[bytes]:
        """One step per month (nearly always one), each with its own id."""
        base = batch or _new_id()
        payloads = []
        for month in sorted({u.month for u in usage}):
            keys = [
                [
                    u.name,
                    u.requests,
                    u.prompt_tokens,
                    u.completion_tokens,
                    nanos(u.cost_usd),
                    u.freed_month or u.month,
                    nanos(u.freed_usd),
                    0,
                    u.window_tokens,
                ]  # fmt: skip
                for u in usage
                if u.month == month
            ]
            payload = {"id": f"{base}:{month}", "me": self.replica, "month": month, "keys": keys}
            payloads.append(orjson.dumps(payload))
        return payloads

    def close(self) -> None:
        self._db.close()

    async def connect(self) -> None:
        """Connect now and load the scripts, so that no request's first call waits for either.
        Raises Unreachable when Redis is out of reach."""
        try:
            for script in SCRIPTS:
                await self._aio.call(b"SCRIPT", b"LOAD", script)
        except (ReplyError, OSError) as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        await self._aio.aclose()


def _new_id() -> str:
    return uuid.uuid4().hex


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stored(value: bytes | str) -> StoredKey:
    name, digest, prefix, settings, created_at, revoked_at = orjson.loads(value)
    return StoredKey(name, digest, prefix, settings, created_at, revoked_at)
