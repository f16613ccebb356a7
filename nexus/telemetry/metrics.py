"""Every Prometheus metric, on a private registry, fed from outcomes and read at scrape time.

Labels stay bounded: a model label is a model some backend lists or an alias in the config,
anything else is counted as ``other`` (a client inventing model names cannot grow the series);
backend labels are backend names; a ``key`` label is the name of a client key the key set holds
(made by an admin, never by a client; never the secret), anything else ``other``. Per-key numbers
are families of their own (``nexus_key_*``), so keys do not multiply the per-model series. The
budget gauges are read from the ledger at scrape time (through a ``SpendView``), and the per-key
gauges from the key set (``KeyView``), never per request.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .outcomes import Outcome

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
STAGE_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005)
COST_BUCKETS = (0.00001, 0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1, 5)  # USD per request


@dataclass(frozen=True, slots=True)
class FleetView:
    """What the scrape-time gauges read: filled by the gateway, which owns the state."""

    in_flight: dict[str, int]
    healthy: dict[str, bool]
    models_available: int
    queue_depth: int
    # [state] backend = "redis": whether Redis is out of reach now, and the seconds spent so
    # (None: no shared store)
    state_degraded: bool | None = None
    state_degraded_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class SpendView:
    """The month's budget as the scrape-time gauges read it (filled by the gateway)."""

    month: str  # the UTC billing month, YYYY-MM
    spent_usd: float
    reserved_usd: float
    status_level: int  # 0 Normal, 1 SoftLimit, 2 HardLimit
    limit_usd: float | None
    rollovers: int


@dataclass(frozen=True, slots=True)
class KeyView:
    """One client key's month as the scrape-time gauges read it (filled by the gateway)."""

    name: str
    month: str  # the UTC month, YYYY-MM
    spent_usd: float  # this month, restarts included (the key set keeps it in the state DB)
    limit_usd: float | None  # the key's monthly_budget_usd
    in_flight: int


class _Counter:
    """A counter family kept as plain numbers: the event loop is its only writer and reader,
    so it needs none of prometheus_client's locks (which cost more than the rest of a record)."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(list(key), value)
        return family


class _Histogram:
    """A histogram family kept as plain bucket counts (see ``_Counter``)."""

    def __init__(
        self, name: str, documentation: str, labels: list[str], buckets: tuple[float, ...]
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = sorted(buckets)
        self.data: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts, +Inf, sum

    def observe(self, key: tuple[str, ...], value: float) -> None:
        data = self.data.get(key)
        if data is None:
            data = self.data[key] = [0.0] * (len(self.bounds) + 2)
        data[bisect.bisect_left(self.bounds, value)] += 1
        data[-1] += value

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, data in self.data.items():
            buckets, running = [], 0.0
            for bound, count in zip([*self.bounds, math.inf], data[:-1], strict=True):
                running += count
                buckets.append((_le(bound), running))
            family.add_metric(list(key), buckets, sum_value=data[-1])
        return family


class Metrics(Collector):
    def __init__(
        self,
        known_model: Callable[[str], bool],
        fleet: Callable[[], FleetView],
        spend: Callable[[], SpendView | None] = lambda: None,
        *,
        known_key: Callable[[str], bool] = lambda _: False,
        keys: Callable[[], list[KeyView]] = lambda: [],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._known_model = known_model
        self._known_key = known_key
        self.requests = _Counter(
            "nexus_requests",
            "Requests by model, backend, status and the API the client spoke",
            ["model", "backend", "status", "api"],
        )
        self.errors = _Counter(
            "nexus_errors", "Failed requests by error type", ["error_type", "model"]
        )
        self.fallbacks = _Counter(
            "nexus_fallbacks", "Requests served by a fallback model", ["from_model", "to_model"]
        )
        self.duration = _Histogram(
            "nexus_request_duration_seconds", "Whole request, streams included",
            ["model", "backend"], DURATION_BUCKETS,
        )  # fmt: skip
        self.ttft = _Histogram(
            "nexus_time_to_first_token_seconds", "Time to the first streamed event",
            ["model", "backend"], DURATION_BUCKETS,
        )  # fmt: skip
        self.tokens = _Counter(
            "nexus_tokens", "Tokens reported by backends", ["model", "backend", "type"]
        )
        self.overhead = _Histogram(
            "nexus_overhead_seconds", "Time Nexus itself added to a request (not upstream)",
            [], OVERHEAD_BUCKETS,
        )  # fmt: skip
        self.stage = _Histogram(
            "nexus_reconciler_duration_seconds", "Planner stage time per request",
            ["reconciler"], STAGE_BUCKETS,
        )  # fmt: skip
        self.exclusions = _Counter(
            "nexus_reconciler_exclusions", "Backends a planner stage left out", ["reconciler"]
        )
        self.cost = _Counter(
            "nexus_cost_usd", "What priced requests cost, in USD", ["backend", "model"]
        )
        self.cost_per_request = _Histogram(
            "nexus_cost_per_request_usd", "Cost of each priced request, in USD",
            ["model"], COST_BUCKETS,
        )  # fmt: skip
        self.key_requests = _Counter(
            "nexus_key_requests", "Requests per client key and status", ["key", "status"]
        )
        self.key_tokens = _Counter(
            "nexus_key_tokens", "Tokens reported by backends per client key", ["key", "type"]
        )
        self.key_cost = _Counter(
            "nexus_key_cost_usd", "What priced requests cost per client key, in USD", ["key"]
        )
        self._families: list[_Counter | _Histogram] = [
            self.requests, self.errors, self.fallbacks, self.duration, self.ttft, self.tokens,
            self.overhead, self.stage, self.exclusions, self.cost, self.cost_per_request,
            self.key_requests, self.key_tokens, self.key_cost,
        ]  # fmt: skip
        self.registry.register(self)
        self.registry.register(_FleetCollector(fleet))
        self.registry.register(_BudgetCollector(spend))
        self.registry.register(_KeyCollector(keys))

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.collect()

    def describe(self) -> Iterable[Metric]:
        return []

    def __call__(self, batch: list[Outcome]) -> None:
        for o in batch:
            model = o.model if self._known_model(o.model) else "other"
            backend = o.backend or "none"
            self.requests.inc((model, backend, str(o.status), o.api))
            if not o.ok:
                self.errors.inc((o.error_type or f"http_{o.status}", model))
            if o.fallback_model:
                to = o.fallback_model if self._known_model(o.fallback_model) else "other"
                self.fallbacks.inc((model, to))
            if o.backend is not None:
                self._backend_metrics(o, model, backend)
            for stage, ns in o.stage_ns.items():
                self.stage.observe((stage,), ns / 1e9)
            for stage, count in o.exclusions.items():
                self.exclusions.inc((stage,), count)
            if o.key is not None:
                self._key_metrics(o, o.key if self._known_key(o.key) else "other")

    def _key_metrics(self, o: Outcome, key: str) -> None:
        self.key_requests.inc((key, str(o.status)))
        if o.prompt_tokens:
            self.key_tokens.inc((key, "prompt"), o.prompt_tokens)
        if o.completion_tokens:
            self.key_tokens.inc((key, "completion"), o.completion_tokens)
        if o.cost_usd is not None:
            self.key_cost.inc((key,), o.cost_usd)

    def _backend_metrics(self, o: Outcome, model: str, backend: str) -> None:
        key = (model, backend)
        if o.ok:  # the whole answer's timings; a failure's duration means little
            self.duration.observe(key, o.duration_ms / 1000)
            self.overhead.observe((), max(0.0, o.duration_ms - o.upstream_ms) / 1000)
        if o.ttft_ms is not None:  # a first token did come, even if the stream broke later
            self.ttft.observe(key, o.ttft_ms / 1000)
        if o.prompt_tokens:
            self.tokens.inc((model, backend, "prompt"), o.prompt_tokens)
        if o.completion_tokens:
            self.tokens.inc((model, backend, "completion"), o.completion_tokens)
        if o.cost_usd is not None:
            self.cost.inc((backend, model), o.cost_usd)
            self.cost_per_request.observe((model,), o.cost_usd)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FleetCollector(Collector):
    def __init__(self, fleet: Callable[[], FleetView]) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        view = self._fleet()
        in_flight = GaugeMetricFamily(
            "nexus_backend_in_flight", "Requests in flight per backend", labels=["backend"]
        )
        for name, count in view.in_flight.items():
            in_flight.add_metric([name], count)
        yield in_flight
        yield _gauge("nexus_backends_total", "Backends known", len(view.healthy))
        yield _gauge("nexus_backends_healthy", "Healthy backends", sum(view.healthy.values()))
        yield _gauge("nexus_models_available", "Models on healthy backends", view.models_available)
        yield _gauge("nexus_queue_depth", "Requests waiting in the queue", view.queue_depth)
        if view.state_degraded is not None:
            yield _gauge(
                "nexus_state_degraded",
                "1 while the shared state (Redis) is out of reach and this replica enforces its "
                "share of the limits",
                float(view.state_degraded),
            )
            yield CounterMetricFamily(
                "nexus_state_degraded_seconds",
                "Seconds this replica has spent degraded (Redis out of reach)",
                value=view.state_degraded_seconds,
            )

    def describe(self) -> Iterable[Metric]:
        return []


class _BudgetCollector(Collector):
    """The reference's budget gauges (plus what is reserved), read from the ledger."""

    def __init__(self, spend: Callable[[], SpendView | None]) -> None:
        self._spend = spend

    def collect(self) -> Iterator[Metric]:
        view = self._spend()
        if view is None:
            return
        month = [view.month]
        for name, documentation, value in (
            ("nexus_budget_spending_usd", "Spend settled this billing month, USD", view.spent_usd),
            ("nexus_budget_reserved_usd", "Worst-case cost held by calls in flight, USD",
             view.reserved_usd),
            ("nexus_budget_status", "Budget status: 0 Normal, 1 SoftLimit, 2 HardLimit",
             view.status_level),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(name, documentation, labels=["billing_month"])
            gauge.add_metric(month, value)
            yield gauge
        if view.limit_usd is not None:
            utilization = GaugeMetricFamily(
                "nexus_budget_utilization_percent",
                "Share of the monthly limit spent, percent",
                labels=["billing_month"],
            )
            utilization.add_metric(month, view.spent_usd / view.limit_usd * 100)
            yield utilization
            yield _gauge("nexus_budget_limit_usd", "The monthly limit, USD", view.limit_usd)
        events = CounterMetricFamily("nexus_budget_events", "Budget events", labels=["event_type"])
        events.add_metric(["month_rollover"], view.rollovers)
        yield events

    def describe(self) -> Iterable[Metric]:
        return []


class _KeyCollector(Collector):
    """Per-key gauges from the key set: the month's spend (restarts included), the budget, and
    the calls in flight. As many series as keys, which only an admin makes."""

    def __init__(self, keys: Callable[[], list[KeyView]]) -> None:
        self._keys = keys

    def collect(self) -> Iterator[Metric]:
        views = self._keys()
        if not views:
            return
        spent = GaugeMetricFamily(
            "nexus_key_spending_usd",
            "What each client key spent this billing month (UTC), USD",
            labels=["key", "billing_month"],
        )
        limit = GaugeMetricFamily(
            "nexus_key_budget_limit_usd",
            "Each client key's monthly_budget_usd (keys that have one)",
            labels=["key"],
        )
        in_flight = GaugeMetricFamily(
            "nexus_key_in_flight", "Requests in flight per client key", labels=["key"]
        )
        for view in views:
            spent.add_metric([view.name, view.month], view.spent_usd)
            if view.limit_usd is not None:
                limit.add_metric([view.name], view.limit_usd)
            in_flight.add_metric([view.name], view.in_flight)
        yield spent
        yield limit
        yield in_flight

    def describe(self) -> Iterable[Metric]:
        return []


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf``, ``0.5``, ``1.0``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
