"""Managed local backends: a ``llama-server`` child process that Nexus starts, watches and stops.

Nexus picks a free loopback port (unless one is configured), starts the server, waits until its
``/health`` says ready, and only then lets the health checker and the router at it. If the child
dies it is started again with a growing backoff (1 s, 2 s, 4 s ... 30 s); on shutdown it is sent
SIGTERM (SIGKILL after 5 s). On Linux the child also gets SIGTERM if Nexus itself dies, so no
orphan keeps a port and gigabytes of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from .backends.http1 import HTTP1Client, ProtocolError
from .config import BackendSettings, ManagedSettings, cache_dir
from .registry import Backend

log = logging.getLogger("nexus.managed")

STOP_GRACE_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 30.0
STABLE_SECONDS = 60.0


class ManagedError(Exception):
    """The managed server cannot be started (no binary, no model file)."""


def find_binary(configured: str | None) -> str:
    """The configured binary, else the build cached by ``scripts/build-llama-server``, else PATH."""
    if configured:
        found = shutil.which(configured) or (configured if Path(configured).is_file() else None)
        if found is None:
            raise ManagedError(f"llama-server binary '{configured}' not found")
        return found
    cached = sorted(cache_dir().glob("llama.cpp-*/bin/llama-server"))
    if cached:
        return str(cached[-1])
    found = shutil.which("llama-server")
    if found is None:
        raise ManagedError(
            "no llama-server found: run scripts/build-llama-server, put llama-server on PATH "
            "or set [backends.managed] binary"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


SHIPPED_TEMPLATES = Path(__file__).parent / "chat_templates"


def chat_template_file(name: str) -> Path:
    """A managed backend's ``chat_template``: one shipped with Nexus by name, else a file path."""
    shipped = SHIPPED_TEMPLATES / f"{name}.jinja"
    path = shipped if "/" not in name and shipped.is_file() else Path(name).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SHIPPED_TEMPLATES.glob("*.jinja")))
        raise ManagedError(f"chat template '{name}' is neither a file nor one of: {known}")
    return path


def command(binary: str, settings: ManagedSettings, port: int) -> list[str]:
    args = [
        binary,
        "--model", settings.model,
        "--alias", settings.model_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--ctx-size", str(settings.context),
        "--parallel", str(settings.slots),
    ]  # fmt: skip
    if settings.threads:
        args += ["--threads", str(settings.threads)]
    if settings.embeddings:
        args += ["--embeddings", "--pooling", settings.pooling]
    if settings.chat_template:
        args += ["--chat-template-file", str(chat_template_file(settings.chat_template))]
    return args + list(settings.extra_args)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ManagedServer:
    """Runs one managed backend's process for as long as ``run`` is awaited."""

    def __init__(
        self,
        backend: Backend,
        settings: ManagedSettings,
        client: HTTP1Client,
        *,
        on_down: Callable[[Backend, str], None],
        on_ready: Callable[[Backend], object],
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.client = client
        self.on_down = on_down
        self.on_ready = on_ready
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.ready = asyncio.Event()
        self._stopping = False
        self._log_file = cache_dir() / "logs" / f"{_safe(backend.name)}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _prepare(self) -> str:
        """The binary to run, once the model file is known to exist; the log folder made."""
        binary = find_binary(self.settings.binary)
        if not Path(self.settings.model).is_file():
            raise ManagedError(f"model file {self.settings.model} does not exist")
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        return binary

    async def start(self) -> None:
        """Start the process and wait until it serves; raises ManagedError if it cannot."""
        binary = self._prepare()
        port = self.settings.port or free_port()
        with self._log_file.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *command(binary, self.settings, port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.backend.url = f"http://127.0.0.1:{port}"
        log.info(
            "managed backend %s: started llama-server (pid %d) on %s serving %s",
            self.backend.name,
            self.process.pid,
            self.backend.url,
            self.settings.model_name,
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.startup_timeout_seconds
        url = self.backend.url + "/health"
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise ManagedError(
                    f"llama-server exited with status {self.process.returncode} while starting; "
                    f"see {self._log_file}"
                )
            with contextlib.suppress(OSError, TimeoutError, ProtocolError):
                if await self.client.status_of(url, limit=2) == 200:
                    self.ready.set()
                    return
            await asyncio.sleep(0.1)  # the server is loading its model; ask again shortly
        raise ManagedError(
            f"llama-server was not ready within {self.settings.startup_timeout_seconds:g}s; "
            f"see {self._log_file}"
        )

    async def supervise(self) -> None:
        """Start the process again whenever it dies (or failed to start), until ``stop``.

        The wait between attempts doubles up to 30 s, and falls back to 1 s once a server has
        stayed up for a minute."""
        loop = asyncio.get_running_loop()
        backoff = 1.0
        while not self._stopping:
            if self.process is not None and self.process.returncode is None:
                started = loop.time()
                code = await self.process.wait()
                if self._stopping:
                    return
                if loop.time() - started > STABLE_SECONDS:
                    backoff = 1.0
                self.ready.clear()
                reason = f"managed llama-server exited with status {code}"
                log.warning("managed backend %s: %s", self.backend.name, reason)
                self.on_down(self.backend, reason)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            try:
                await self.start()
            except ManagedError as exc:
                log.error(
                    "managed backend %s: %s (next try in %gs)", self.backend.name, exc, backoff
                )
                self.on_down(self.backend, str(exc))
                await self._terminate()
                continue
            self.restarts += 1
            result = self.on_ready(self.backend)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self) -> None:
        self._stopping = True
        await self._terminate()

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        log.info("managed backend %s: stopped (pid %d)", self.backend.name, process.pid)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "smollm2-135m"


def embedded_default(enabled: bool) -> list[BackendSettings]:
    """The first-run backend: SmolLM2-135M on a managed llama-server, when both are cached
    (``scripts/serve`` puts them there). Used only when no backend is configured."""
    model = cache_dir() / "models" / EMBEDDED_MODEL_FILE
    if not enabled or not model.is_file():
        return []
    try:
        find_binary(None)
    except ManagedError:
        return []
    managed = ManagedSettings(
        model=str(model),
        alias=EMBEDDED_MODEL_NAME,
        slots=4,
        context=8192,
        threads=2,
        chat_template="chatml-tools",  # SmolLM2's own template drops tools: agents need them
    )
    return [BackendSettings(name="embedded", type="llamacpp", managed=managed)]
