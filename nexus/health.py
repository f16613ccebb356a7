"""Background probes plus what real requests report -> each backend's status.

Probes only list models (``/v1/models``, ``/api/tags``): never a billed completion. All backends
are probed concurrently. A backend that cannot be connected to during a real request (refused,
unreachable) is marked down at once and probed again straight away, so traffic leaves it within
one request. A request that times out does not mark it down: a slow answer is not an outage
(dispatch counts it against the backend's quality instead).

State machine (thresholds from ``[health_check]``):
  unknown   --success-->                      healthy
  unknown   --failure-->                      unhealthy
  healthy   --failure_threshold failures-->   unhealthy
  healthy   --a real request cannot connect--> unhealthy   (passive, immediate)
  unhealthy --recovery_threshold successes--> healthy
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from .backends import Adapter
from .config import HealthCheckSettings
from .errors import ConnectionLimitReached, UpstreamError
from .registry import Backend, Registry, Status

log = logging.getLogger("nexus.health")


class AdapterSource(Protocol):
    def for_type(self, backend_type: str) -> Adapter | None: ...


class HealthChecker:
    def __init__(
        self,
        registry: Registry,
        adapters: AdapterSource,
        settings: HealthCheckSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_capacity: Callable[[Backend], None] | None = None,
    ) -> None:
        self.registry = registry
        self.adapters = adapters
        self.settings = settings
        self.clock = clock
        # Told when a backend becomes routable or serves more than before (recovered, found,
        # added, new models or slots): requests queued for capacity may plan again.
        self.on_capacity = on_capacity
        self._recheck: set[str] = set()
        self._wake = asyncio.Event()
        self._running: set[str] = set()

    async def check_all(self) -> None:
        backends = [b for b in self.registry if b.unavailable is None]
        await asyncio.gather(*(self.check(backend) for backend in backends))

    async def check(self, backend: Backend) -> None:
        if backend.name in self._running:  # a probe of this backend is already under way
            return
        adapter = self.adapters.for_type(backend.type)
        if adapter is None:
            return
        self._running.add(backend.name)
        started = self.clock()
        try:
            probe = await adapter.probe(backend)
        except ConnectionLimitReached:
            pass  # Nexus's own upstream connections were all busy: nothing about the backend
        except UpstreamError as exc:
            self.record_failure(backend, exc.message)
        except Exception as exc:  # an adapter bug must not stop the health loop
            log.exception("probe of backend %s failed unexpectedly", backend.name)
            self.record_failure(backend, f"{type(exc).__name__}: {exc}")
        else:
            backend.latency_ms = (self.clock() - started) * 1000
            before = (backend.healthy, backend.slots, backend.models)
            backend.slots = probe.slots
            self.registry.set_models(backend, probe.models)
            self.record_success(backend)
            after = (backend.healthy, backend.slots, backend.models)
            if backend.healthy and after != before and self.on_capacity is not None:
                self.on_capacity(backend)
        finally:
            backend.last_check = time.time()
            self._running.discard(backend.name)

    def record_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        if backend.status is Status.UNKNOWN or (
            backend.status is Status.UNHEALTHY
            and backend.consecutive_successes >= self.settings.recovery_threshold
        ):
            self._transition(backend, Status.HEALTHY)
            backend.last_error = None

    def record_failure(self, backend: Backend, reason: str) -> None:
        backend.consecutive_successes = 0
        backend.consecutive_failures += 1
        backend.last_error = backend.redact(reason)
        if backend.status is Status.UNKNOWN or (
            backend.status is Status.HEALTHY
            and backend.consecutive_failures >= self.settings.failure_threshold
        ):
            self._transition(backend, Status.UNHEALTHY)

    def mark_down(self, backend: Backend, reason: str) -> None:
        """A real request could not reach the backend: stop routing to it now and probe it again."""
        if not self.settings.enabled:
            return  # nobody would bring it back
        backend.consecutive_successes = 0
        backend.last_error = backend.redact(reason)
        if backend.status is not Status.UNHEALTHY:
            self._transition(backend, Status.UNHEALTHY)
        self._recheck.add(backend.name)
        self._wake.set()

    async def revive(self, backend: Backend) -> None:
        """The backend is known to be back (restarted, re-announced): forget its history and
        probe it now, so one good answer makes it routable again."""
        backend.unavailable = None
        backend.status = Status.UNKNOWN
        backend.consecutive_failures = backend.consecutive_successes = 0
        await self.check(backend)

    def _transition(self, backend: Backend, status: Status) -> None:
        old = backend.status
        backend.status = status
        level = logging.INFO if status is Status.HEALTHY else logging.WARNING
        detail = f" ({backend.last_error})" if status is Status.UNHEALTHY else ""
        log.log(level, "backend %s: %s -> %s%s", backend.name, old.value, status.value, detail)

    async def run(self) -> None:
        """Probe everything every ``interval_seconds``; probe marked-down backends at once."""
        interval = self.settings.interval_seconds
        next_round = self.clock() + interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_round - self.clock()))
            self._wake.clear()
            if self.clock() >= next_round:
                self._recheck.clear()
                await self.check_all()
                next_round = self.clock() + interval
            elif self._recheck:
                names, self._recheck = self._recheck, set()
                backends = [b for b in (self.registry.get(n) for n in names) if b is not None]
                await asyncio.gather(*(self.check(b) for b in backends))

    async def start(self) -> None:
        """The first round, before traffic; without health checks, trust every backend."""
        await self.check_all()
        if not self.settings.enabled:
            for backend in self.registry:
                if backend.unavailable is None:
                    backend.status = Status.HEALTHY
