"""The shared store's request-path half: one script per limited or priced request, and what
keeps a replica in the fleet (its lease, the key channel, the watch while Redis is away).

With ``[routing] shared_affinity``, where each conversation was served is published on the
channel ``affinity`` (in batches, after the answers) and every replica adds it to its own table:
the lookup stays in memory, off Redis.

While Redis cannot be reached the gate says so (``down``, with the reason) and the request path
stops calling it: admission falls back to each replica's share, decided in this process, and a
background probe every second ends that as soon as Redis answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import RedisError

from .redis import RedisTarget
from .redis_lua import ADMIT, FINISHED, LEASE
from .resp import Reply, ReplyError, RespClient, Script
from .store import NANO, Unreachable

log = logging.getLogger("nexus.state")
LEASE_MS = 10_000  # what a replica holds counts this long after it was last heard from
RENEW_SECONDS = 2.0
PROBE_SECONDS = 1.0  # while Redis is away
AFFINITY_BATCH_SECONDS = 0.05
AFFINITY_PENDING_MAX = 10_000  # entries waiting to be published; more are dropped (a hint only)
TROUBLE = (RedisError, ReplyError, OSError, asyncio.TimeoutError)
# an admission on its way: its reply (None: not written yet) and its arguments
Asked = tuple["asyncio.Future[Reply] | None", tuple[str | bytes, ...]]


@dataclass(slots=True)
class Verdict:
    """The store's answer to one admission."""

    rate: int  # 0 admitted, 1 rpm, 2 tpm, 3 max_concurrent, -1 not asked
    budget: int  # 0 reserved, 1 the monthly limit, 2 the key's budget, -1 not asked
    requests_left: int
    requests_reset: float  # seconds
    tokens_left: int
    tokens_reset: float
    spent_usd: float  # the month's settled spend across the replicas
    retry_after: float  # seconds, when refused
    running: int  # the key's calls in flight across the replicas
    reserved_usd: float  # what the live replicas hold reserved this month (when asked)
    replicas: int  # live replicas
    tight: bool  # another call like this would not fit now: free the reservation at once


class RedisGate:
    def __init__(
        self, target: RedisTarget, prefix: str, replica: str, client: RespClient | None = None
    ) -> None:
        self.prefix = prefix
        self.replica = replica
        self.channel = f"{prefix}keys"
        self.affinity_channel = f"{prefix}affinity"
        self._affinity: list[tuple[list[int], str]] = []
        self._affinity_timer: asyncio.TimerHandle | None = None
        # a request waits for a free connection rather than opening one past the cap
        self._client = client or target.resp_client()  # the request path's one call
        self._admit = Script(ADMIT, prefix, replica)  # its fixed arguments encoded once
        self._finished = Script(FINISHED, prefix, replica)
        self._lease = Script(LEASE, prefix, replica)
        self._pubsub = target.async_client()  # the channels (redis-py)
        self.replicas = 1  # live replicas, as last seen
        self.down: str | None = None  # why Redis is out of reach, while it is
        self.down_since = 0.0
        self.degraded_seconds = 0.0  # time spent degraded before the current spell
        self.on_down: list[Callable[[], None]] = []
        self.on_back: list[Callable[[], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- the request path ---------------------------------------------------------------------
    def ask(
        self,
        month: str,
        name: str,
        limits: tuple[int, int, int],
        worst: int,
        limit: int,
        key_limit: int,
    ) -> Asked:
        """One admission (see ``redis_lua.ADMIT``), written now when a connection is open (its
        answer read with ``answer``): ``limits`` are rpm, tpm and max_concurrent (0: none);
        ``worst``, ``limit`` and ``key_limit`` are nanodollars (-1: not checked)."""
        rpm, tpm, conc = limits
        args = (month, name, b"%d %d %d %d %d %d" % (rpm, tpm, conc, worst, limit, key_limit))
        return self._client.start(self._admit, args), args

    async def answer(self, asked: Asked) -> Verdict:
        """The store's answer to an admission ``ask`` wrote (or runs it now, when it could not
        be written). Raises Unreachable when Redis is out of reach (after calling ``trouble``)."""
        future, args = asked
        try:
            if future is None:
                got = await self._client.run(self._admit, *args)
            else:
                try:
                    got = await future
                except ReplyError as exc:  # a restarted Redis: the script is loaded again
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    got = await self._client.run(self._admit, *args)
        except TROUBLE as exc:
            self.trouble(exc)
            raise Unreachable(str(exc)) from exc
        try:
            v = list(map(int, got.split()))
            replicas = v[10]
            verdict = Verdict(
                v[0], v[1], v[2], v[3] / 1000, v[4], v[5] / 1000, v[6] / NANO, v[7] / 1000,
                v[8], v[9] / NANO, replicas, v[11] == 1,
            )  # fmt: skip
        except (AttributeError, ValueError, IndexError) as exc:  # not what the script answers
            self.trouble(exc)
            raise Unreachable(f"an unexpected answer from Redis: {got!r:.200}") from exc
        self.replicas = replicas if replicas > 1 else 1
        return verdict

    def finished(self, name: str) -> None:
        """A call of a key with max_concurrent ended: give its slot back now (after its answer
        was sent: not on its path). While Redis is away, the lease sets the count when back."""
        if self.down is not None:
            return
        task = asyncio.get_running_loop().create_task(self._finish(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, name: str) -> None:
        try:
            await self._client.run(self._finished, name)
        except TROUBLE as exc:
            self.trouble(exc)

    def share_affinity(self, keys: tuple[int, ...], backend: str) -> None:
        """Tell the other replicas that these conversation keys were served by ``backend``."""
        if len(self._affinity) >= AFFINITY_PENDING_MAX or self.down is not None:
            return
        self._affinity.append((list(keys), backend))
        if self._affinity_timer is None:
            loop = asyncio.get_running_loop()
            self._affinity_timer = loop.call_later(AFFINITY_BATCH_SECONDS, self._publish)

    def _publish(self) -> None:
        self._affinity_timer = None
        entries, self._affinity = self._affinity, []
        message = orjson.dumps({"from": self.replica, "entries": entries})
        task = asyncio.get_running_loop().create_task(self._send(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, message: bytes) -> None:
        try:
            await self._client.call(b"PUBLISH", self.affinity_channel, message)
        except TROUBLE as exc:
            self.trouble(exc)

    # --- being down, and back -------------------------------------------------------------
    def trouble(self, exc: BaseException) -> None:
        if self.down is not None:
            return
        self.down = f"Redis at {self.prefix!r} is out of reach: {type(exc).__name__}: {exc}"
        self.down_since = time.monotonic()
        log.error("%s; each replica enforces its share of the limits until it is back", self.down)
        for callback in self.on_down:
            callback()

    def degraded_total(self) -> float:
        """Seconds spent degraded, the current spell included."""
        current = time.monotonic() - self.down_since if self.down is not None else 0.0
        return self.degraded_seconds + current

    async def _back(self) -> None:
        if self.down is None:
            return
        spell = time.monotonic() - self.down_since
        self.degraded_seconds += spell
        self.down = None
        log.warning("Redis is back after %.1f s; shared limits apply again", spell)
        for callback in self.on_back:  # (none may end the task that keeps the lease)
            try:
                await callback()
            except (*TROUBLE, Unreachable) as exc:
                self.trouble(exc)  # gone again: all of them are run when it is back
                return
            except Exception:
                log.exception("catching up with Redis failed")

    # --- staying in the fleet ---------------------------------------------------------------
    async def renew(self, holdings: dict[str, list[list[Any]]], force: bool = False) -> None:
        """Renew the lease (setting what this replica holds if it had run out, or ``force``);
        raises Unreachable when Redis is out of reach."""
        try:
            got = await self._client.run(self._lease, LEASE_MS, orjson.dumps(holdings), int(force))
        except TROUBLE as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
        self.replicas = max(1, int(got[0]))

    async def run(
        self,
        holdings: Callable[[], dict[str, list[list[Any]]]],
        changed: Callable[[str], Awaitable[None]],
        learned: Callable[[tuple[int, ...], str], None] | None = None,
    ) -> None:
        """Until cancelled: the lease every ``RENEW_SECONDS`` (every ``PROBE_SECONDS`` while
        Redis is away), the key channel (``changed(name)`` for each key announced) and, with
        ``learned``, the affinity channel (``learned(keys, backend)`` for other replicas')."""
        listener = asyncio.create_task(self._listen(changed, learned))
        try:
            while True:
                try:  # back from a spell away: what this replica holds is set again
                    await self.renew(holdings(), force=self.down is not None)
                    await self._back()
                except Unreachable as exc:
                    self.trouble(exc.__cause__ or exc)
                await asyncio.sleep(PROBE_SECONDS if self.down else RENEW_SECONDS)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _listen(
        self,
        changed: Callable[[str], Awaitable[None]],
        learned: Callable[[tuple[int, ...], str], None] | None,
    ) -> None:
        channels = [self.channel] + ([self.affinity_channel] if learned is not None else [])
        while True:
            pubsub = self._pubsub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                while True:
                    message = await pubsub.get_message(timeout=PROBE_SECONDS)
                    if message is None or message.get("type") != "message":
                        continue
                    channel, data = _text(message["channel"]), message["data"]
                    if channel == self.channel:
                        await changed(_text(data))
                    elif learned is not None:
                        self._learn(data, learned)
            except TROUBLE as exc:
                self.trouble(exc)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(PROBE_SECONDS)

    def _learn(self, data: bytes, learned: Callable[[tuple[int, ...], str], None]) -> None:
        """Another replica's conversations (anything malformed is ignored: a hint only)."""
        try:
            message = orjson.loads(data)
            if message.get("from") == self.replica:
                return
            for keys, backend in message["entries"][:AFFINITY_PENDING_MAX]:
                if isinstance(backend, str) and all(type(k) is int for k in keys):
                    learned(tuple(keys), backend)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            log.debug("an unreadable affinity message was ignored")

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
        await self._pubsub.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
