"""Finding backends by themselves: mDNS (zeroconf), the usual local ports, and announcing Nexus.

A service seen on mDNS becomes a backend (name from the instance, type from TXT ``type`` or the
service type, URL from its address, port and TXT ``api_path``), is probed at once, and is routable
as soon as it answers. A static backend with the same URL wins. A service that disappears is
unroutable at once and removed after ``grace_period_seconds``; if it comes back first, it is
restored and probed straight away.

Multicast never has to work: if zeroconf cannot start, Nexus logs a warning and keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import unicodedata
from collections.abc import Awaitable, Coroutine, Mapping

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from . import __version__
from .backends.http1 import HTTP1Client, ProtocolError
from .config import (
    BACKEND_NAME,
    BACKEND_NAME_MAX,
    DiscoverySettings,
    ServerSettings,
    normalise_url,
)
from .health import HealthChecker
from .registry import Backend, Registry, Status

log = logging.getLogger("nexus.discovery")

NEXUS_SERVICE = "_nexus._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
_TXT_TYPES = {
    "ollama": "ollama",
    "vllm": "vllm",
    "llamacpp": "llamacpp",
    "llama.cpp": "llamacpp",
    "exo": "exo",
    "lmstudio": "lmstudio",
    "generic": "generic",
}
_PORT_TYPES = {11434: "ollama", 1234: "lmstudio", 8080: "llamacpp", 52415: "exo"}


class Discovery:
    def __init__(
        self,
        registry: Registry,
        health: HealthChecker,
        settings: DiscoverySettings,
        server: ServerSettings,
        client: HTTP1Client,
    ) -> None:
        self.registry = registry
        self.health = health
        self.settings = settings
        self.server = server
        self.client = client
        self.zeroconf: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.announced: AsyncServiceInfo | None = None
        self._by_instance: dict[str, str] = {}  # mDNS instance name -> backend name
        self._removals: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._announcing: Awaitable[object] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Browse mDNS and announce Nexus (the local ports are probed separately, earlier)."""
        try:
            self.zeroconf = open_zeroconf(self.settings.interfaces)
            types = [_fqdn(t) for t in self.settings.service_types]
            if types:
                self.browser = AsyncServiceBrowser(
                    self.zeroconf.zeroconf, types, handlers=[self._on_change]
                )
            if self.settings.advertise:
                self._spawn(self._advertise_when_listening())
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("mDNS is unavailable here (%s); serving without discovery", exc)
            await self._close_zeroconf()

    async def stop(self) -> None:
        for handle in self._removals.values():
            handle.cancel()
        self._removals.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_zeroconf()

    async def _close_zeroconf(self) -> None:
        if isinstance(self._announcing, asyncio.Future) and not self._announcing.done():
            self._announcing.cancel()
            await asyncio.gather(self._announcing, return_exceptions=True)
        with contextlib.suppress(Exception):  # shutting down: nothing useful to do with errors
            if self.browser is not None:
                await self.browser.async_cancel()
            if self.zeroconf is not None:
                if self.announced is not None:
                    await self.zeroconf.async_unregister_service(self.announced)
                await self.zeroconf.async_close()
        self.browser = self.zeroconf = self.announced = None

    # --- mDNS ------------------------------------------------------------------------------
    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._service_gone(name)
            return
        self._spawn(self._resolve(service_type, name))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self.zeroconf is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.zeroconf.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS service %s did not resolve", name)
            return
        found = backend_from_service(service_type, name, info)
        if found is None:
            return
        known = self.registry.get(self._by_instance.get(name, ""))
        if known is not None:
            await self._service_back(name, known, found.url)
            return
        if any(normalise_url(b.url) == found.url for b in self.registry):
            log.info("mDNS: %s at %s is already configured; the static entry wins", name, found.url)
            return
        found.name = self._unique_name(found.name)
        self.registry.add(found)
        self._by_instance[name] = found.name
        version = f" version {found.version}" if found.version else ""
        log.info("mDNS: found %s%s backend %s at %s", found.type, version, found.name, found.url)
        await self.health.check(found)

    async def _service_back(self, instance: str, backend: Backend, url: str) -> None:
        handle = self._removals.pop(instance, None)
        if handle is not None:
            handle.cancel()
            log.info("mDNS: %s is back within the grace period", backend.name)
        backend.url = url
        await self.health.revive(backend)

    def _service_gone(self, instance: str) -> None:
        backend = self.registry.get(self._by_instance.get(instance, ""))
        if backend is None or instance in self._removals:
            return
        backend.status = Status.UNHEALTHY
        backend.last_error = "service disappeared from mDNS"
        grace = self.settings.grace_period_seconds
        log.info("mDNS: %s disappeared; removed in %ss unless it returns", backend.name, grace)
        self._removals[instance] = asyncio.get_running_loop().call_later(
            grace, self._remove, instance
        )

    def _remove(self, instance: str) -> None:
        self._removals.pop(instance, None)
        name = self._by_instance.pop(instance, None)
        if name is not None and self.registry.remove(name) is not None:
            log.info("mDNS: removed backend %s", name)

    def _unique_name(self, name: str) -> str:
        candidate, n = name, 2
        while self.registry.get(candidate) is not None:
            suffix = f"-{n}"
            candidate, n = name[: BACKEND_NAME_MAX - len(suffix)].rstrip(" ") + suffix, n + 1
        return candidate

    async def _advertise_when_listening(self) -> None:
        """Announce only once the server accepts connections (start-up runs before it binds),
        so that whoever finds Nexus can use it straight away."""
        host = "127.0.0.1" if self.server.host in ("0.0.0.0", "") else self.server.host
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            try:
                _, writer = await asyncio.open_connection(host, self.server.port)
            except OSError:
                await asyncio.sleep(0.05)  # not listening yet
                continue
            writer.close()
            break
        try:
            await self._advertise()
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("mDNS: could not announce Nexus (%s)", exc)

    async def _advertise(self) -> None:
        assert self.zeroconf is not None
        addresses = advertised_addresses(self.server.host, self.settings.interfaces)
        if not addresses:
            log.info("Nexus listens on %s only: not announcing it on the network", self.server.host)
            return
        host = socket.gethostname().split(".")[0] or "nexus"
        info = AsyncServiceInfo(
            NEXUS_SERVICE,
            f"Nexus on {host}-{self.server.port}.{NEXUS_SERVICE}",
            port=self.server.port,
            properties={"version": __version__, "api_path": "/v1", "type": "nexus"},
            parsed_addresses=addresses,
            server=f"{host}.local.",
        )
        # The returned task repeats the announcement for a second; it is not waited for.
        self._announcing = await self.zeroconf.async_register_service(info, allow_name_change=True)
        self.announced = info
        log.info("mDNS: announced as %s on %s", info.name, ", ".join(addresses))

    # --- the usual local ports -------------------------------------------------------------
    async def probe_local_ports(self) -> None:
        """Look once at 127.0.0.1's usual inference ports and add what answers."""
        found = await asyncio.gather(
            *(self._probe_port(p) for p in self.settings.probe_local_ports)
        )
        for backend in found:
            if backend is None:
                continue
            backend.name = self._unique_name(backend.name)
            self.registry.add(backend)
            log.info("found %s on %s (probed its usual port)", backend.type, backend.url)

    async def _probe_port(self, port: int) -> Backend | None:
        url = f"http://127.0.0.1:{port}"
        if any(normalise_url(b.url) == url for b in self.registry):
            return None
        for path, kind in (
            ("/api/tags", "ollama"),
            ("/v1/models", _PORT_TYPES.get(port, "generic")),
        ):
            try:
                if await self.client.status_of(url + path, limit=1) == 200:
                    return discovered(f"{kind}-{port}", url, kind, source="probe")
            except (OSError, TimeoutError, ProtocolError):
                return None  # nothing listens there (or it is not HTTP)
        return None


def open_zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    """Every interface by default; pinned to the listed addresses (IPv4 only when they all are)."""
    if interfaces is None:
        return AsyncZeroconf()
    v4_only = all(_is_ipv4(address) for address in interfaces)
    return AsyncZeroconf(
        interfaces=list(interfaces), ip_version=IPVersion.V4Only if v4_only else IPVersion.All
    )


def advertised_addresses(host: str, interfaces: list[str] | None) -> list[str]:
    if interfaces is not None:
        return list(interfaces)
    if host in ("0.0.0.0", "::", ""):
        return []  # zeroconf would pick; be explicit only when we know
    if ipaddress.ip_address(host).is_loopback:
        return []
    return [host]


def backend_from_service(
    service_type: str, instance: str, info: AsyncServiceInfo
) -> Backend | None:
    props = _decode(info.properties)
    addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
    if not addresses or not info.port:
        return None
    kind = props.get("type", "").lower()
    if kind == "openai":
        log.warning("mDNS: %s says type=openai; cloud backends need a key, configure it", instance)
        return None
    backend_type = _TXT_TYPES.get(kind) or ("ollama" if "_ollama." in service_type else "generic")
    default_path = "" if backend_type == "ollama" else "/v1"
    address = addresses[0]
    host = f"[{address}]" if ":" in address else address
    try:
        url = normalise_url(f"http://{host}:{info.port}{props.get('api_path', default_path)}")
    except ValueError:
        return None
    label = instance.removesuffix("." + service_type).removesuffix(service_type)
    name = backend_name(label.replace("_", " ")) or backend_name(address) or backend_type
    backend = discovered(name, url, backend_type, source="mdns")
    backend.version = props.get("version") or None
    return backend


def backend_name(label: str) -> str:
    """An mDNS instance name fit to be a backend name (it goes into headers, logs and paths):
    accents dropped, any other character outside the allowed set replaced by '-', cut to the
    length limit; empty when nothing usable is left."""
    text = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    name = _UNUSABLE.sub("-", text).strip(" ")[:BACKEND_NAME_MAX].rstrip(" ")
    return name if BACKEND_NAME.fullmatch(name) else ""


_UNUSABLE = re.compile(r"[^A-Za-z0-9 ._:-]+")


def discovered(name: str, url: str, backend_type: str, *, source: str) -> Backend:
    return Backend(name=name, url=url, type=backend_type, zone="restricted", source=source)


def _decode(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    return {
        key.decode(errors="replace").lower(): (value or b"").decode(errors="replace")
        for key, value in properties.items()
    }


def _fqdn(service_type: str) -> str:
    return service_type if service_type.endswith(".") else service_type + "."


def _is_ipv4(address: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address)
    except ValueError:
        return False
