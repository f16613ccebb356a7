"""Running the app under uvicorn, with a shutdown that ends the process cleanly."""

from __future__ import annotations

import gc
from types import FrameType

import uvicorn

from .app import create_app
from .config import Settings


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully, so the process would
    end as "killed by signal" (or, under click, "Aborted!"). After a clean shutdown we exit 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def serve(settings: Settings) -> None:
    server = settings.server
    config = uvicorn.Config(
        create_app(settings),
        host=server.host,
        port=server.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # clients talk to Nexus directly: X-Forwarded-For is not trusted
        timeout_graceful_shutdown=int(server.shutdown_timeout_seconds) or None,
    )
    # Everything built so far lives as long as the process: keep it out of the collector's
    # way so that full collections stay short under load (fewer latency spikes).
    gc.collect()
    gc.freeze()
    GracefulServer(config).run()
