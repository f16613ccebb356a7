"""Liveness and health: ``/health`` (summary), ``/livez`` (process), ``/readyz`` (routable)."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from .. import __version__
from ..errors import ServiceUnavailable
from ..gateway import Gateway
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
    return {
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
