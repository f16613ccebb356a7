"""Run the real Nexus app (uvicorn, a real loopback socket) and fake upstreams in a background loop.

Tests stay synchronous and use real clients (httpx, the ``openai`` SDK, raw sockets) against real
ports; they can still look at the gateway's state (``nexus.gateway``) directly.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from nexus.app import create_app
from nexus.config import Settings, settings_from_dict
from nexus.gateway import Gateway
from nexus.serving import uvicorn_config

from .fakes import FakeUpstream

T = TypeVar("T")
READY_TIMEOUT = 20.0


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class NexusServer:
    """The app from ``create_app`` served by uvicorn on a free loopback port."""

    def __init__(self, loop: LoopThread, settings: Settings) -> None:
        self.loop = loop
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their proto
        # says TCP; without it every answer written in two parts waits ~40 ms for a delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        server = settings.server.model_copy(update={"port": self.port})
        update: dict[str, Any] = {"server": server}
        self.state_dir: str | None = None
        if settings.state.path is None:  # each server its own spend, never the user's
            self.state_dir = tempfile.mkdtemp(prefix="nexus-state-")
            state = Path(self.state_dir) / "state.db"
            update["state"] = settings.state.model_copy(update={"path": str(state)})
        self.settings = settings.model_copy(update=update)
        self.app = create_app(self.settings)
        # The real server configuration (connection caps, deadlines), served on our socket.
        self.server = uvicorn.Server(
            uvicorn_config(self.settings, self.app, timeout_graceful_shutdown=2)
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    def start(self) -> NexusServer:
        self.loop.run(self._start(), timeout=READY_TIMEOUT + 5)
        return self

    async def _start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
        while not self.server.started:  # readiness of the server, not a timing assumption
            if self.task.done():
                self.task.result()
                raise RuntimeError("Nexus stopped during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("Nexus did not start")
            await asyncio.sleep(0.005)

    def stop(self) -> None:
        self.loop.run(self._stop(), timeout=15)
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    async def _stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


def settings_for(*backends: tuple[str, FakeUpstream, str], **sections: Any) -> Settings:
    """Settings with discovery off and slow health rounds, for ``(name, fake, type)`` backends."""
    data: dict[str, Any] = {
        "discovery": {"enabled": False, "interfaces": ["127.0.0.1"]},
        "health_check": {"interval_seconds": 3600},
        "embedded": {"enabled": False},
        "backends": [
            {"name": name, "url": fake.url, "type": kind} for name, fake, kind in backends
        ],
    }
    for key, value in sections.items():
        if key == "backends" or isinstance(value, list):  # e.g. pricing=[{...}]
            data[key] = value
        else:
            data[key] = {**data.get(key, {}), **value}
    return settings_from_dict(data)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Check ``condition`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        time.sleep(0.01)
    return True


def data_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (``[DONE]`` included)."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        lines = [line[5:].strip() for line in block.split("\n") if line.startswith("data:")]
        if lines:
            events.append("\n".join(lines))
    return events
