"""``create_app(settings)``: the one place everything is wired. The lifespan owns every task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

import aiohttp
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp

from .api.admin import Health, Live, Ready
from .api.errors import HANDLERS
from .api.middleware import GatewayMiddleware
from .api.openai import ChatCompletions, Embeddings, Models
from .backends import SUPPORTED_TYPES, Adapters, Timeouts
from .config import BackendSettings, Settings
from .dispatch import Dispatcher
from .gateway import Gateway
from .health import HealthChecker
from .registry import Backend, Registry, Status

log = logging.getLogger("nexus.app")


def create_app(settings: Settings, *, environ: Mapping[str, str] | None = None) -> Starlette:
    registry = Registry(backend_from(spec, environ) for spec in settings.backends)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server = settings.server
        timeouts = Timeouts(
            connect=server.connect_timeout_seconds,
            request=server.request_timeout_seconds,
            stream_idle=server.stream_idle_timeout_seconds,
            probe=settings.health_check.timeout_seconds,
        )
        # Idle upstream connections are dropped after 4 s, before servers built on uvicorn
        # (vLLM among them; 5 s) close theirs: a POST on a connection the server already closed
        # would fail for nothing.
        connector = aiohttp.TCPConnector(
            limit=server.max_concurrent_requests, ttl_dns_cache=60, keepalive_timeout=4
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            adapters = Adapters(session, timeouts)
            health = HealthChecker(registry, adapters, settings.health_check)
            dispatcher = Dispatcher(registry, adapters, health, settings.routing)
            app.state.gateway = Gateway(settings, registry, health, dispatcher)
            for backend in registry:
                if backend.config_error:
                    log.warning("backend %s is unusable: %s", backend.name, backend.config_error)
            await health.start()
            tasks = [asyncio.create_task(health.run())] if settings.health_check.enabled else []
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    hot_routes: dict[str, ASGIApp] = {
        "/v1/chat/completions": ChatCompletions(),
        "/v1/embeddings": Embeddings(),
    }
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in hot_routes.items()),
        Route("/v1/models", Models(), methods=["GET"]),
        Route("/health", Health(), methods=["GET"]),
        Route("/livez", Live(), methods=["GET"]),
        Route("/readyz", Ready(), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(GatewayMiddleware, hot_routes=hot_routes)],
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )


def backend_from(spec: BackendSettings, environ: Mapping[str, str] | None = None) -> Backend:
    backend = Backend(
        name=spec.name,
        url=spec.url,
        type=spec.type,
        priority=spec.priority,
        zone=spec.effective_zone,
        tier=spec.tier,
        api_key=spec.api_key(environ),
    )
    if spec.type not in SUPPORTED_TYPES:
        backend.config_error = f"backend type '{spec.type}' is not supported yet"
    elif spec.api_key_env and backend.api_key is None:
        backend.config_error = f"environment variable {spec.api_key_env} (api_key_env) is not set"
    elif spec.type == "openai" and not spec.api_key_env:
        backend.config_error = "type 'openai' needs api_key_env naming the variable with its key"
    if backend.config_error:
        backend.status = Status.UNHEALTHY
        backend.last_error = backend.config_error
    return backend
