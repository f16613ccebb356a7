"""Running the app under uvicorn, with a shutdown that ends the process cleanly."""

from __future__ import annotations

import gc
import math
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from .app import create_app
from .config import Settings
from .server_protocol import (
    ConnectionLimits,
    NexusHTTPProtocol,
    NexusWebSocketProtocol,
    ensure_fd_limit,
)


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully, so the process would
    end as "killed by signal" (or, under click, "Aborted!"). After a clean shutdown we exit 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def uvicorn_config(settings: Settings, app: ASGIApp, **overrides: Any) -> uvicorn.Config:
    """The one uvicorn configuration; ``nexus serve`` and the test harness both use it."""
    server = settings.server
    options: dict[str, Any] = dict(
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=NexusHTTPProtocol.with_limits(ConnectionLimits.of(server)),
        ws=NexusWebSocketProtocol,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # clients talk to Nexus directly: X-Forwarded-For is not trusted
        # 0 means now (uvicorn's None would wait forever); a fraction rounds up to whole seconds.
        timeout_graceful_shutdown=math.ceil(server.shutdown_timeout_seconds),
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


def serve(settings: Settings) -> None:
    ensure_fd_limit(settings.server)
    config = uvicorn_config(settings, create_app(settings))
    # Everything built so far lives as long as the process: keep it out of the collector's
    # way so that full collections stay short under load (fewer latency spikes).
    gc.collect()
    gc.freeze()
    GracefulServer(config).run()
