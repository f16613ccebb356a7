"""The running gateway's services, built once by ``app.create_app`` and read by the handlers."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .backends import SUPPORTED_TYPES
from .config import BackendSettings, Settings
from .cost.ledger import STATUS_LEVEL
from .cost.meter import CostMeter
from .dispatch import Dispatcher
from .health import HealthChecker
from .keys.ring import KeyRing
from .managed import ManagedServer
from .registry import Backend, Registry, Status
from .telemetry.history import History
from .telemetry.metrics import FleetView, KeyView, Metrics, SpendView
from .telemetry.outcomes import Consumer, Telemetry
from .telemetry.stats import Stats

if TYPE_CHECKING:  # redis is imported only with [state] backend = "redis"
    from .state.redis_gate import RedisGate


@dataclass(slots=True)
class Gateway:
    settings: Settings
    registry: Registry
    health: HealthChecker
    dispatcher: Dispatcher
    managed: list[ManagedServer] = field(default_factory=list)
    meter: CostMeter | None = None
    keys: KeyRing | None = None  # client keys, when [auth] is on
    gate: RedisGate | None = None  # the shared state, with [state] backend = "redis"
    telemetry: Telemetry = field(init=False)
    metrics: Metrics = field(init=False)
    stats: Stats = field(init=False)
    history: History = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(
            self.known_model, self.fleet, self.spend, known_key=self.known_key, keys=self.key_views
        )
        self.stats = Stats(self.known_model)
        self.history = History(self.settings.history.max_entries)
        consumers: list[Consumer] = [self.metrics, self.stats, self.history]
        if self.keys is not None:
            consumers.append(self.keys.count)  # each key's usage, from its requests' outcomes
        self.telemetry = Telemetry(consumers)

    def known_model(self, model: str) -> bool:
        return bool(self.registry.backends_for(model)) or model in self.settings.routing.aliases

    def known_key(self, name: str) -> bool:
        """A name the key set holds: only those become ``key`` labels (admins make keys, clients
        cannot), so the per-key series stay as bounded as the key set."""
        return self.keys is not None and self.keys.get(name) is not None

    def key_ring(self) -> KeyRing | None:
        """The key set with each key's usage up to date: the requests that ended just now are
        counted and a month that has begun is started (None before the key set is loaded)."""
        if self.keys is not None:
            self.telemetry.drain()
            self.keys.roll()
        return self.keys

    def key_views(self) -> list[KeyView]:
        """Each key's month for the scrape-time gauges (none before the key set is loaded)."""
        ring = self.key_ring()
        if ring is None:
            return []
        return [
            KeyView(
                name=key.name,
                month=ring.month,
                spent_usd=key.usage.cost_usd,
                limit_usd=key.limits.monthly_budget_usd,
                in_flight=key.window.in_flight,
            )
            for key in ring
        ]

    def fleet(self) -> FleetView:
        backends = list(self.registry)
        queue = self.dispatcher.queue
        return FleetView(
            in_flight={b.name: b.in_flight for b in backends},
            healthy={b.name: b.healthy for b in backends},
            models_available=len(self.registry.model_ids(healthy_only=True)),
            queue_depth=queue.depth if queue is not None else 0,
            state_degraded=None if self.gate is None else self.gate.down is not None,
            state_degraded_seconds=0.0 if self.gate is None else self.gate.degraded_total(),
        )

    def spend(self) -> SpendView | None:
        """The month's budget for the scrape-time gauges (None without a meter)."""
        if self.meter is None:
            return None
        ledger = self.meter.ledger
        status = ledger.status()  # first: a new month starts the spend again
        return SpendView(
            month=ledger.month,
            spent_usd=ledger.spent,
            reserved_usd=ledger.reserved,
            status_level=STATUS_LEVEL[status],
            limit_usd=ledger.limit,
            rollovers=ledger.rollovers,
        )

    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)

    def uptime_seconds(self) -> int:
        return int(time.monotonic() - self.started_monotonic)


def backend_from(spec: BackendSettings, environ: Mapping[str, str] | None = None) -> Backend:
    backend = Backend(
        name=spec.name,
        url=spec.url or "http://127.0.0.1:0",  # a managed backend's URL is set when it starts
        type=spec.type,
        priority=spec.priority,
        zone=spec.effective_zone,
        tier=spec.tier,
        api_key=spec.api_key(environ),
        max_concurrent=spec.max_concurrent,
    )
    if spec.type not in SUPPORTED_TYPES:
        backend.unavailable = f"backend type '{spec.type}' is not supported yet"
    elif spec.api_key_env and backend.api_key is None:
        backend.unavailable = f"environment variable {spec.api_key_env} (api_key_env) is not set"
    elif spec.type in ("openai", "anthropic") and not spec.api_key_env:
        backend.unavailable = (
            f"type '{spec.type}' needs api_key_env naming the variable with its key"
        )
    if backend.unavailable:
        backend.status = Status.UNHEALTHY
        backend.last_error = backend.unavailable
    return backend
