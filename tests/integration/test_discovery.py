"""mDNS discovery on loopback (zeroconf pinned to 127.0.0.1, IPv4: nothing leaves the machine),
Nexus announcing itself, the usual local ports, and a zero-config start."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from nexus.registry import Status
from tests.fakes import FakeOllama, FakeOpenAI
from tests.harness import LoopThread, settings_for, wait_for
from tests.integration.test_routing import HOLD, GatedOpenAI, InBackground

LOOPBACK = ["127.0.0.1"]
CHAT = "/v1/chat/completions"


class Announcer:
    """Registers services on loopback from the test's background loop."""

    def __init__(self, loop_thread: LoopThread) -> None:
        self.loop = loop_thread
        self.zc: AsyncZeroconf | None = None
        self.infos: list[AsyncServiceInfo] = []

    async def _open(self) -> None:
        self.zc = AsyncZeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)

    def announce(self, service: str, instance: str, port: int, **txt: str) -> AsyncServiceInfo:
        if self.zc is None:
            self.loop.run(self._open())
        info = AsyncServiceInfo(
            service,
            f"{instance}.{service}",
            port=port,
            properties=txt,
            parsed_addresses=["127.0.0.1"],
            server=f"{instance}.local.",
        )
        assert self.zc is not None
        self.loop.run(self._register(info))
        self.infos.append(info)
        return info

    async def _register(self, info: AsyncServiceInfo) -> None:
        assert self.zc is not None
        await (await self.zc.async_register_service(info))  # until announced

    def withdraw(self, info: AsyncServiceInfo) -> None:
        assert self.zc is not None
        self.loop.run(self.zc.async_unregister_service(info))
        self.infos.remove(info)

    def close(self) -> None:
        if self.zc is not None:
            for info in list(self.infos):
                self.withdraw(info)
            self.loop.run(self.zc.async_close())


@pytest.fixture
def announcer(loop_thread):
    a = Announcer(loop_thread)
    yield a
    a.close()


def discovering(*backends: tuple[str, Any, str], grace: int = 1, **discovery: Any):
    return settings_for(
        *backends,
        discovery={
            "enabled": True,
            "interfaces": LOOPBACK,
            "grace_period_seconds": grace,
            "probe_local_ports": [],
            "advertise": False,
            **discovery,
        },
    )


def model_ids(client, nexus) -> list[str]:
    return [m["id"] for m in client.get(nexus.url + "/v1/models").json()["data"]]


def test_an_announced_ollama_appears_and_goes_after_the_grace_period(
    start_fake, start_nexus, announcer, client
):
    fake = start_fake(FakeOllama(models=["qwen2.5:latest"]))
    nexus = start_nexus(discovering())
    announcer_info = announcer.announce(
        "_ollama._tcp.local.", "test_node", fake.port, version="0.5"
    )
    assert wait_for(lambda: model_ids(client, nexus) == ["qwen2.5:latest"], timeout=15)
    backend = nexus.gateway.registry.get("test node")
    assert backend is not None and backend.source == "mdns" and backend.type == "ollama"
    assert backend.url == fake.url
    assert backend.version == "0.5"
    reply = client.post(
        nexus.url + CHAT, json={"model": "qwen2.5", "messages": [{"role": "user", "content": "x"}]}
    )
    assert reply.status_code == 200 and reply.headers["x-nexus-backend"] == "test node"

    announcer.withdraw(announcer_info)
    assert wait_for(lambda: model_ids(client, nexus) == [], timeout=15)
    assert wait_for(lambda: nexus.gateway.registry.get("test node") is None, timeout=15)


def test_a_service_back_within_the_grace_period_is_routable_again_at_once(
    start_fake, start_nexus, announcer, client
):
    fake = start_fake(FakeOllama(models=["m:latest"]))
    nexus = start_nexus(discovering(grace=60))
    info = announcer.announce("_ollama._tcp.local.", "flappy", fake.port)
    assert wait_for(lambda: model_ids(client, nexus) == ["m:latest"], timeout=15)
    backend = nexus.gateway.registry.get("flappy")

    announcer.withdraw(info)
    assert wait_for(lambda: backend.status is Status.UNHEALTHY, timeout=15)
    assert backend.last_error == "service disappeared from mDNS"

    announcer.announce("_ollama._tcp.local.", "flappy", fake.port)
    assert wait_for(lambda: backend.status is Status.HEALTHY, timeout=15)  # not stuck unknown
    assert nexus.gateway.registry.get("flappy") is backend


def test_txt_type_and_api_path_give_the_url_without_v1_twice(
    start_fake, start_nexus, announcer, client
):
    fake = start_fake(FakeOpenAI(models=["served-by-vllm"]))
    nexus = start_nexus(discovering())
    announcer.announce("_llm._tcp.local.", "gpu-box", fake.port, type="vLLM", api_path="/v1")
    assert wait_for(lambda: model_ids(client, nexus) == ["served-by-vllm"], timeout=15)
    backend = nexus.gateway.registry.get("gpu-box")
    assert backend.type == "vllm" and backend.url == fake.url
    paths = {r.path for r in fake.requests}
    assert "/v1/models" in paths and not any(p.startswith("/v1/v1") for p in paths)


def test_a_static_backend_with_the_same_url_wins(start_fake, start_nexus, announcer, client):
    fake = start_fake(FakeOllama(models=["m:latest"]))
    other = start_fake(FakeOllama(models=["other:latest"]))
    nexus = start_nexus(discovering(("static-one", fake, "ollama")))
    announcer.announce("_ollama._tcp.local.", "dupe", fake.port)
    announcer.announce("_ollama._tcp.local.", "marker", other.port)
    # once the later service is in, the earlier one has been handled too
    assert wait_for(lambda: nexus.gateway.registry.get("marker") is not None, timeout=15)
    names = sorted(b.name for b in nexus.gateway.registry)
    assert names == ["marker", "static-one"]


def test_nexus_announces_itself_and_advertise_false_turns_it_off(start_nexus):
    nexus = start_nexus(discovering(advertise=True))
    found = browse("_nexus._tcp.local.", lambda info: info.port == nexus.settings.server.port)
    assert found is not None
    assert found.properties[b"api_path"] == b"/v1"
    assert found.properties[b"version"]
    assert found.parsed_addresses() == ["127.0.0.1"]


def test_with_advertise_false_nothing_is_announced(start_nexus):
    nexus = start_nexus(discovering(advertise=False))
    assert nexus.gateway is not None
    assert browse("_nexus._tcp.local.", lambda info: True, wait=2.0) is None


def browse(service: str, match, wait: float = 10.0):
    """A plain zeroconf browser on loopback; the first resolved service that matches."""
    zc = Zeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    seen: list[Any] = []

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Added:
            info = zeroconf.get_service_info(service_type, name, timeout=3000)
            if info is not None and match(info):
                seen.append(info)

    browser = ServiceBrowser(zc, service, handlers=[on_change])
    try:
        wait_for(lambda: bool(seen), timeout=wait)
        return seen[0] if seen else None
    finally:
        browser.cancel()
        zc.close()


def test_zero_config_start_then_a_backend_is_picked_up_when_found(
    start_fake, start_nexus, announcer, client
):
    nexus = start_nexus(discovering())
    health = client.get(nexus.url + "/health").json()
    assert health["status"] == "unhealthy"
    assert health["backends"]["total"] == 0
    reply = client.post(
        nexus.url + CHAT, json={"model": "anything", "messages": [{"role": "user", "content": "x"}]}
    )
    assert reply.status_code == 503
    message = reply.json()["error"]["message"]
    assert "[[backends]]" in message and "11434" in message

    fake = start_fake(FakeOllama(models=["llama3.2:latest"]))
    announcer.announce("_ollama._tcp.local.", "late", fake.port)
    assert wait_for(lambda: model_ids(client, nexus) == ["llama3.2:latest"], timeout=15)
    reply = client.post(
        nexus.url + CHAT, json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
    )
    assert reply.status_code == 200


def test_usual_local_ports_are_probed_once_at_start(start_fake, start_nexus, client, caplog):
    ollama = start_fake(FakeOllama(models=["local:latest"]))
    generic = start_fake(FakeOpenAI(models=["lms-model"]))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent_port = silent.getsockname()[1]
    silent.close()
    with caplog.at_level(logging.INFO, logger="nexus.discovery"):
        nexus = start_nexus(discovering(probe_local_ports=[ollama.port, generic.port, silent_port]))
    backends = {b.name: b for b in nexus.gateway.registry}
    assert backends[f"ollama-{ollama.port}"].type == "ollama"
    assert backends[f"generic-{generic.port}"].type == "generic"
    assert len(backends) == 2
    assert sorted(model_ids(client, nexus)) == ["lms-model", "local:latest"]
    assert any(f"127.0.0.1:{ollama.port}" in r.getMessage() for r in caplog.records)


def test_without_multicast_nexus_warns_and_keeps_serving(
    start_fake, start_nexus, client, monkeypatch, caplog
):
    import nexus.discovery

    def broken(interfaces):
        raise OSError("no multicast here")

    monkeypatch.setattr(nexus.discovery, "open_zeroconf", broken)
    fake = start_fake(FakeOpenAI())
    server = start_nexus(discovering(("static", fake, "vllm")))
    assert client.get(server.url + "/v1/models").status_code == 200
    assert any("mDNS is unavailable" in r.getMessage() for r in caplog.records)


def test_a_backend_found_on_mdns_serves_the_queue_at_once(
    start_fake, start_nexus, announcer, client
):
    busy = start_fake(GatedOpenAI())
    found = start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(
            backends=[{"name": "busy", "url": busy.url, "type": "vllm", "max_concurrent": 1}],
            discovery=discovering().discovery.model_dump(),
            queue={"max_wait_seconds": 10},
        )
    )
    body = {"model": "mock-model", "messages": [{"role": "user", "content": f"hold {HOLD}"}]}
    try:
        held = InBackground(lambda http: http.post(nexus.url + CHAT, json=body))
        assert wait_for(lambda: nexus.gateway.registry.get("busy").in_flight == 1)
        queued = {"model": "mock-model", "messages": [{"role": "user", "content": "waits"}]}
        waiting = InBackground(lambda http: http.post(nexus.url + CHAT, json=queued))
        assert wait_for(lambda: nexus.gateway.dispatcher.queue.depth == 1)

        announcer.announce("_llm._tcp.local.", "found", found.port, type="vllm")

        resp = waiting.result()
        assert resp.status_code == 200 and resp.headers["x-nexus-backend"] == "found"
        assert nexus.gateway.registry.get("busy").in_flight == 1
    finally:
        busy.release.set()
    assert held.result().status_code == 200


def test_an_instance_name_unfit_for_a_header_is_made_fit(start_fake, start_nexus, announcer):
    fake = start_fake(FakeOllama(models=["m:latest"]))
    nexus = start_nexus(discovering())
    announcer.announce("_ollama._tcp.local.", "Küche/GPU (2)", fake.port)
    assert wait_for(lambda: nexus.gateway.registry.get("Kuche-GPU -2-") is not None, timeout=15)
