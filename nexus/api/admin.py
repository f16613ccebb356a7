"""Liveness and health: ``/health`` (summary), ``/livez`` (process), ``/readyz`` (routable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from .. import __version__
from ..errors import InvalidRequest, ServiceUnavailable
from ..gateway import Gateway
from ..keys.ring import KeyRing
from ..telemetry.metrics import CONTENT_TYPE
from ..telemetry.stats import Tally
from .http import dumps, send_json
from .openai import gateway_of


def health_summary(gateway: Gateway) -> dict[str, object]:
    backends = list(gateway.registry)
    healthy = sum(1 for b in backends if b.healthy)
    if backends and healthy == len(backends):
        status = "healthy"
    elif healthy:
        status = "degraded"
    else:
        status = "unhealthy"
    summary: dict[str, object] = {
        "status": status,
        "version": __version__,
        "uptime_seconds": gateway.uptime_seconds(),
        "backends": {
            "total": len(backends),
            "healthy": healthy,
            "unhealthy": len(backends) - healthy,
        },
        "models": len(gateway.registry.model_ids(healthy_only=True)),
    }
    gate = gateway.gate
    if gate is not None:  # replicas: the shared state's reach
        summary["state"] = {
            "backend": "redis",
            "status": "degraded" if gate.down else "ok",
            "reason": gate.down,
            "replicas": gate.replicas,
            "degraded_seconds": round(gate.degraded_total(), 3),
        }
        if gate.down and status == "healthy":
            summary["status"] = "degraded"
    return summary


class Health:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, dumps(health_summary(gateway_of(scope))))


class Live:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, b'{"status":"ok"}')


class Ready:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = gateway_of(scope)
        healthy = sum(1 for b in gateway.registry if b.healthy)
        if not healthy:
            raise ServiceUnavailable(
                "Not ready: no backend is healthy. Add a [[backends]] entry to the config "
                "or start a local server (Ollama, llama.cpp, vLLM, LM Studio)."
            )
        await send_json(send, 200, dumps({"status": "ready", "healthy_backends": healthy}))


class Metrics:
    """``GET /metrics``: Prometheus text."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = gateway_of(scope)
        gateway.telemetry.drain()  # what finished just now is in the numbers
        body = gateway.metrics.render()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Stats:
    """``GET /v1/stats``: totals, per backend and per model, percentiles, in flight, queue, the
    month's spend (per backend, per model) and budget, and each client key's month."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, dumps(stats_of(gateway_of(scope))))


def stats_of(gateway: Gateway) -> dict[str, object]:
    gateway.telemetry.drain()
    stats = gateway.stats
    fleet = gateway.fleet()
    spend = month_spend(gateway)
    backends = []
    for backend in gateway.registry:
        tally = stats.backends.get(backend.name)
        row: dict[str, object] = {
            "name": backend.name,
            "status": backend.status.value,
            "in_flight": backend.in_flight,
            "capacity": backend.capacity(gateway.settings.routing.default_max_concurrent),
        }
        row.update(tally.summary() if tally else {"requests": 0, "success": 0, "errors": 0})
        if spend is not None:
            row["cost_usd"] = round(spend.backends.get(backend.name, 0.0), 6)
        backends.append(row)
    models = []
    # A model with spend this month but no request since the start still gets its row.
    names = stats.models.keys() | (spend.models.keys() if spend is not None else set())
    for name in sorted(names):
        tally = stats.models.get(name) or Tally()
        model_row: dict[str, object] = {"name": name, **tally.summary()}
        if spend is not None:
            model_row["cost_usd"] = round(spend.models.get(name, 0.0), 6)
        models.append(model_row)
    view: dict[str, object] = {
        "uptime_seconds": gateway.uptime_seconds(),
        "requests": stats.total.summary(),
        "in_flight": sum(fleet.in_flight.values()),
        "queue_depth": fleet.queue_depth,
        "backends": backends,
        "models": models,
    }
    if spend is not None:
        view["cost_usd"] = spend.budget["current_spending_usd"]
        view["budget"] = spend.budget
    ring = gateway.key_ring()
    if ring is not None:
        view["keys"] = key_rows(ring)
    return view


def key_rows(ring: KeyRing) -> list[dict[str, object]]:
    """Each client key's month to date (kept across restarts by the key set), its calls in flight
    and its limits. A key is shown by name and prefix only: never the secret, and not its owner
    either (``/v1/stats`` and the dashboard are open to whoever reaches the port; the admin API,
    which shows owners, is not). Revoked keys keep their row: their month still counts."""
    now = ring.clock()
    rows: list[dict[str, object]] = []
    for key in sorted(ring, key=lambda k: k.name):
        limits = key.limits
        if key.revoked_at is not None:
            status = "revoked"
        elif now >= key.expires:
            status = "expired"
        else:
            status = "active"
        rows.append(
            {
                "name": key.name,
                "prefix": key.prefix,
                "source": key.source,
                "status": status,
                **key.usage.view(),
                "in_flight": key.window.in_flight,
                "reserved_usd": round(key.reserved_usd, 8),
                "limits": {
                    "rpm": limits.rpm,
                    "tpm": limits.tpm,
                    "max_concurrent": limits.max_concurrent,
                    "monthly_budget_usd": limits.monthly_budget_usd,
                },
            }
        )
    return rows


@dataclass(slots=True)
class MonthSpend:
    """Month-to-date cost per backend and per model, and the ledger's ``budget`` object."""

    budget: dict[str, Any]
    backends: dict[str, float]
    models: dict[str, float]


def month_spend(gateway: Gateway) -> MonthSpend | None:
    meter = gateway.meter
    if meter is None:
        return None
    ledger = meter.ledger
    budget = ledger.snapshot()  # first: a new month starts the totals again
    backends: dict[str, float] = {}
    models: dict[str, float] = {}
    for (backend, model), totals in ledger.totals.items():
        backends[backend] = backends.get(backend, 0.0) + totals.cost_usd
        name = model if gateway.known_model(model) else "other"  # bounded like the requests
        models[name] = models.get(name, 0.0) + totals.cost_usd
    return MonthSpend(budget, backends, models)


class History:
    """``GET /v1/history?limit=N``: the last requests, newest last, without content."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = gateway_of(scope)
        gateway.telemetry.drain()
        most = max(1, gateway.settings.history.max_entries)
        limit = _limit(scope.get("query_string", b""), most)
        await send_json(send, 200, dumps({"data": gateway.history.last(limit)}))


def _limit(query: bytes, most: int) -> int | None:
    """``limit`` from the query: a whole number from 1 to ``most`` (None when absent)."""
    values = [
        v for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k == "limit"
    ]
    if not values:
        return None
    value = values[-1]
    # Checked as text first: int() of thousands of digits is slow, and refused past 4,300.
    if (
        not (value.isascii() and value.isdigit())
        or len(value) > len(str(most))
        or not 1 <= int(value) <= most
    ):
        raise InvalidRequest(f"'limit' must be a whole number from 1 to {most}", param="limit")
    return int(value)
