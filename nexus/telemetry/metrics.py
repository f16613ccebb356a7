"""Every Prometheus metric, on a private registry, fed from outcomes and read at scrape time.

Labels stay bounded: a model label is a model some backend lists or an alias in the config,
anything else is counted as ``other`` (a client inventing model names cannot grow the series);
backend labels are backend names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .outcomes import Outcome

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
STAGE_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005)


@dataclass(frozen=True, slots=True)
class FleetView:
    """What the scrape-time gauges read: filled by the gateway, which owns the state."""

    in_flight: dict[str, int]
    healthy: dict[str, bool]
    models_available: int
    queue_depth: int


class Metrics:
    def __init__(self, known_model: Callable[[str], bool], fleet: Callable[[], FleetView]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._known_model = known_model
        r = self.registry
        self.requests = Counter(
            "nexus_requests", "Requests by model, backend and status",
            ["model", "backend", "status"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "nexus_errors", "Failed requests by error type", ["error_type", "model"], registry=r
        )
        self.fallbacks = Counter(
            "nexus_fallbacks", "Requests served by a fallback model",
            ["from_model", "to_model"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "nexus_request_duration_seconds", "Whole request, streams included",
            ["model", "backend"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "nexus_time_to_first_token_seconds", "Time to the first streamed event",
            ["model", "backend"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "nexus_tokens", "Tokens reported by backends", ["model", "backend", "type"], registry=r
        )
        self.overhead = Histogram(
            "nexus_overhead_seconds", "Time Nexus itself added to a request (not upstream)",
            buckets=OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage = Histogram(
            "nexus_reconciler_duration_seconds", "Planner stage time per request",
            ["reconciler"], buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.exclusions = Counter(
            "nexus_reconciler_exclusions", "Backends a planner stage left out", ["reconciler"],
            registry=r,
        )  # fmt: skip
        r.register(_FleetCollector(fleet))

    def __call__(self, batch: list[Outcome]) -> None:
        for o in batch:
            model = o.model if self._known_model(o.model) else "other"
            backend = o.backend or "none"
            self.requests.labels(model, backend, str(o.status)).inc()
            if not o.ok:
                self.errors.labels(o.error_type or f"http_{o.status}", model).inc()
            if o.fallback_model:
                to = o.fallback_model if self._known_model(o.fallback_model) else "other"
                self.fallbacks.labels(model, to).inc()
            if o.backend is not None:
                self._backend_metrics(o, model, backend)
            for stage, ns in o.stage_ns.items():
                self.stage.labels(stage).observe(ns / 1e9)
            for stage, count in o.exclusions.items():
                self.exclusions.labels(stage).inc(count)

    def _backend_metrics(self, o: Outcome, model: str, backend: str) -> None:
        if o.ok:  # the whole answer's timings; a failure's duration means little
            self.duration.labels(model, backend).observe(o.duration_ms / 1000)
            self.overhead.observe(max(0.0, o.duration_ms - o.upstream_ms) / 1000)
        if o.ttft_ms is not None:  # a first token did come, even if the stream broke later
            self.ttft.labels(model, backend).observe(o.ttft_ms / 1000)
        if o.prompt_tokens:
            self.tokens.labels(model, backend, "prompt").inc(o.prompt_tokens)
        if o.completion_tokens:
            self.tokens.labels(model, backend, "completion").inc(o.completion_tokens)

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

    def describe(self) -> Iterable[Metric]:
        return []


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
