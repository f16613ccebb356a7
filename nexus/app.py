"""``create_app(settings)``: the one place everything is wired. The lifespan owns every task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sqlite3
from collections.abc import AsyncIterator, Mapping

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp

from .admission import SharedAdmission
from .api.admin import Health, History, Live, Metrics, Ready, Stats
from .api.auth import Auth
from .api.backends import AdminBackends, BackendList
from .api.errors import HANDLERS
from .api.guard import Guard
from .api.keys import AdminKeys, OwnUsage
from .api.messages import CountTokens, Messages
from .api.middleware import GatewayMiddleware
from .api.openai import ChatCompletions, Embeddings, Models
from .api.responses import Responses
from .backends import Adapters, HTTP1Client, ProxyRules, Timeouts
from .config import (
    ConfigError,
    Settings,
    redis_address,
    redis_password,
    state_path,
    upstream_network,
)
from .cost.ledger import Ledger
from .cost.meter import CostMeter
from .cost.pricing import PriceBook
from .dashboard import dashboard_routes
from .discovery import Discovery
from .dispatch import Dispatcher
from .errors import NO_BACKENDS_HINT
from .gateway import Gateway, backend_from
from .health import HealthChecker
from .keys.ring import KeyRing
from .managed import ManagedError, ManagedServer, embedded_default
from .queueing import RequestQueue
from .registry import Backend, Registry, Status
from .routing.planner import Router
from .state.sqlite import SQLiteStore
from .state.store import StateStore, Unreachable

log = logging.getLogger("nexus.app")


def create_app(
    settings: Settings, *, environ: Mapping[str, str] | None = None
) -> GatewayMiddleware:
    settings.server.require_admin_key(environ)
    network = upstream_network(environ)
    specs = settings.backends or embedded_default(settings.embedded.enabled)
    registry = Registry(backend_from(spec, environ) for spec in specs)
    # Keys can be managed (and are kept) with [auth] off; they are required only with it on.
    keys = KeyRing(settings.auth.keys, flush_interval=settings.state.flush_interval_seconds)
    shared = SharedSetup(settings, environ) if settings.state.backend == "redis" else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # Idle upstream connections are dropped after 4 s, before servers built on uvicorn
            # (vLLM among them: 5 s) would close them under a request.
            client = HTTP1Client(
                keepalive_seconds=4,
                connect_timeout=settings.server.connect_timeout_seconds,
                max_connections=settings.server.max_concurrent_requests,
                max_response_bytes=settings.server.max_response_bytes,
                proxies=ProxyRules(network),
            )
            for scheme, proxy in (("http", network.http_proxy), ("https", network.https_proxy)):
                if proxy is not None:
                    log.info(
                        "%s upstreams go through the proxy %s (NO_PROXY: %s; loopback direct)",
                        scheme,
                        proxy.shown,
                        ",".join(network.no_proxy) or "none",
                    )
            stack.push_async_callback(client.aclose)
            meter = await open_meter(settings, environ, shared.store if shared else None)
            stack.push_async_callback(meter.ledger.aclose)
            if meter.ledger.store is not None:
                await keys.attach(meter.ledger.store)
                stack.push_async_callback(keys.aclose)
            router = Router(registry, settings.routing, settings.quality, budget=meter)
            admission = await shared.start(meter, keys, auth, router, stack) if shared else None
            if settings.auth.enabled:
                live = sum(1 for k in keys if k.revoked_at is None)
                log.info("client keys required on the inference routes (%d keys)", live)
            adapters = Adapters(client, timeouts_of(settings))
            health = HealthChecker(registry, adapters, settings.health_check)
            queue = settings.queue
            dispatcher = Dispatcher(
                registry,
                adapters,
                health,
                router,
                queue=RequestQueue(queue.max_size) if queue.enabled and queue.max_size else None,
                max_wait_seconds=queue.max_wait_seconds,
                max_retries=settings.routing.max_retries,
                meter=meter,
                keys=keys,
                shared=admission,
            )
            # Capacity back through health (recovery, discovery, the admin API) wakes the queue.
            health.on_capacity = dispatcher.capacity_returned
            app.state.gateway = Gateway(
                settings, registry, health, dispatcher, meter=meter, keys=keys,
                gate=admission.gate if admission is not None else None,
            )  # fmt: skip
            for backend in registry:
                if backend.unavailable:
                    log.warning("backend %s is unusable: %s", backend.name, backend.unavailable)

            # Managed servers must serve before the first probe; so must the local ports found.
            managed = [
                ManagedServer(
                    registry.get(spec.name) or _missing(spec.name),
                    spec.managed,
                    client,
                    on_down=mark_unhealthy,
                    on_ready=health.revive,
                )
                for spec in specs
                if spec.managed is not None
            ]
            app.state.gateway.managed = managed
            stack.callback(app.state.gateway.telemetry.drain)
            stack.push_async_callback(_stop_all, managed)
            await asyncio.gather(*(start_managed(server) for server in managed))
            discovery = Discovery(registry, health, settings.discovery, settings.server, client)
            if settings.discovery.enabled:
                await discovery.probe_local_ports()
            await health.start()
            if settings.discovery.enabled:
                stack.push_async_callback(discovery.stop)
                await discovery.start()

            tasks = [asyncio.create_task(server.supervise()) for server in managed]
            if settings.health_check.enabled:
                tasks.append(asyncio.create_task(health.run()))
            stack.push_async_callback(_cancel_all, tasks)
            if not settings.backends and specs:
                log.info("no backends configured: serving the embedded default (smollm2-135m)")
            if not len(registry):
                log.warning(NO_BACKENDS_HINT)
            yield

    hot_routes: dict[str, ASGIApp] = {
        "/v1/chat/completions": ChatCompletions(),
        "/v1/embeddings": Embeddings(),
        "/v1/messages": Messages(),
        "/v1/messages/count_tokens": CountTokens(),
        "/v1/responses": Responses(),
    }
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in hot_routes.items()),
        Route("/v1/models", Models(), methods=["GET"]),
        Route("/health", Health(), methods=["GET"]),
        Route("/livez", Live(), methods=["GET"]),
        Route("/readyz", Ready(), methods=["GET"]),
        Route("/metrics", Metrics(), methods=["GET"]),
        Route("/v1/stats", Stats(), methods=["GET"]),
        Route("/v1/history", History(), methods=["GET"]),
        Route("/v1/backends", BackendList(), methods=["GET"]),
        Route("/admin/backends", AdminBackends(), methods=["POST"]),
        Route("/admin/keys", AdminKeys(), methods=["GET", "POST"]),
        Route("/admin/keys/{name}", AdminKeys(), methods=["GET", "PATCH", "DELETE"]),
        Route("/v1/usage", OwnUsage(), methods=["GET"]),
        Route("/admin/backends/{name}", AdminBackends(), methods=["DELETE"]),
        *dashboard_routes(),
    ]
    starlette = Starlette(routes=routes, exception_handlers=HANDLERS, lifespan=lifespan)
    auth = Auth(keys, set(hot_routes)) if settings.auth.enabled else None
    return GatewayMiddleware(starlette, hot_routes, Guard.of(settings.server), auth)


async def open_meter(
    settings: Settings, environ: Mapping[str, str] | None, shared: StateStore | None = None
) -> CostMeter:
    """Prices (the genai-prices snapshot is read off the loop) and the month's spend so far,
    from the SQLite file or, with ``shared``, from Redis (when it can be reached)."""
    prices = PriceBook(settings.pricing)
    await asyncio.to_thread(prices.load)
    store = shared
    if store is None:
        path = state_path(settings.state, environ)
        try:
            store = await asyncio.to_thread(SQLiteStore, path)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state.path: cannot open the state database {path}: {exc}") from None
    ledger = Ledger(
        settings.routing.budget, store, flush_interval=settings.state.flush_interval_seconds
    )
    try:
        await ledger.load()
    except Exception as exc:  # Redis is down: start degraded, the spend is read when it is back
        if shared is None:
            raise
        log.error("the month's spend could not be read from Redis: %s", exc)
    return CostMeter(prices, ledger)


class SharedSetup:
    """``[state] backend = "redis"``: the store, the gate and the admission, for one replica."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None) -> None:
        from .state.redis import RedisStore, RedisTarget  # redis-py only when it is used
        from .state.redis_gate import RedisGate

        state = settings.state
        assert state.redis_url is not None  # checked with the settings
        address = redis_address(state.redis_url)
        target = RedisTarget(
            address.host, address.port, address.db, address.tls, address.username,
            redis_password(state, environ), address.shown,
        )  # fmt: skip
        # the replica's name: what it holds in Redis is kept under it
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.target = target
        client = target.resp_client()  # one pipelined connection for the gate and the batches
        self.store = RedisStore(target, state.redis_prefix, self.replica, client)
        self.gate = RedisGate(target, state.redis_prefix, self.replica, client)
        self._task: asyncio.Task[None] | None = None

    async def start(
        self,
        meter: CostMeter,
        keys: KeyRing,
        auth: Auth | None,
        router: Router,
        stack: contextlib.AsyncExitStack,
    ) -> SharedAdmission:
        """Join the fleet (or start degraded when Redis is down); stopped with ``stack``."""
        gate = self.gate
        admission = SharedAdmission(gate, meter.ledger, keys)
        stack.push_async_callback(self.stop)
        if auth is not None:
            auth.shared = admission  # limited keys are admitted in Redis
        try:
            await gate.renew(admission.holdings())
            await self.store.connect()
            log.info("state in Redis at %s (%s), %d replicas live, this one %s",
                     self.target.shown, await asyncio.to_thread(self.store.persistence),
                     gate.replicas, self.replica)  # fmt: skip
        except Unreachable as exc:
            gate.trouble(exc.__cause__ or exc)  # started degraded: each limit at its share
        gate.on_back.append(self.store.connect)  # a restarted Redis has lost the scripts
        gate.on_back.append(keys.resync)
        gate.on_back.append(meter.ledger.load_once)  # when it started while Redis was down
        learned = None
        if router.routing.shared_affinity and router.routing.affinity:
            router.share_affinity, learned = gate.share_affinity, router.learned
        self._task = asyncio.create_task(gate.run(admission.holdings, keys.refresh, learned))
        return admission

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.gate.aclose()


def timeouts_of(settings: Settings) -> Timeouts:
    server = settings.server
    return Timeouts(
        connect=server.connect_timeout_seconds,
        request=server.request_timeout_seconds,
        stream_idle=server.stream_idle_timeout_seconds,
        probe=settings.health_check.timeout_seconds,
    )


async def start_managed(server: ManagedServer) -> None:
    try:
        await server.start()
    except ManagedError as exc:
        log.error("managed backend %s cannot start: %s", server.backend.name, exc)
        mark_unhealthy(server.backend, str(exc))


def mark_unhealthy(backend: Backend, reason: str) -> None:
    """A managed backend's process is not running: do not probe or route until it is back."""
    backend.unavailable = reason
    backend.status = Status.UNHEALTHY
    backend.last_error = reason


async def _stop_all(servers: list[ManagedServer]) -> None:
    await asyncio.gather(*(server.stop() for server in servers))


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _missing(name: str) -> Backend:
    raise RuntimeError(f"backend {name} vanished from the registry during start-up")
