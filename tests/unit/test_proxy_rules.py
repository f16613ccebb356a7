"""Which upstream calls go through a proxy (``NO_PROXY`` as curl, requests and Go read it), how the
proxy variables are read, and the client's tunnel on both event loops Nexus runs on."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
import uvloop

from nexus.backends.http1 import HTTP1Client, Target
from nexus.backends.proxy import ProxyRules
from nexus.config import ConfigError, upstream_network
from tests.fake_proxy import FakeProxy
from tests.fakes import FakeOpenAI

PROXY = "http://proxy.corp:3128"


def rules(no_proxy: str = "", **extra: str) -> ProxyRules:
    return ProxyRules(
        upstream_network({"HTTPS_PROXY": PROXY, "HTTP_PROXY": PROXY, "NO_PROXY": no_proxy, **extra})
    )


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "direct"),
    [
        ("", "api.anthropic.com", 443, False),
        ("", "127.0.0.1", 11434, True),  # loopback is always direct
        ("", "127.8.9.10", 80, True),
        ("", "::1", 80, True),
        ("", "::ffff:127.0.0.1", 80, True),
        ("", "localhost", 80, True),
        ("", "gpu.localhost", 80, True),
        ("", "192.168.1.20", 80, False),
        ("*", "api.anthropic.com", 443, True),
        ("corp.example", "corp.example", 443, True),
        ("corp.example", "gpu.corp.example", 443, True),
        (".corp.example", "gpu.corp.example", 443, True),
        ("*.corp.example", "gpu.corp.example", 443, True),
        ("corp.example", "notcorp.example", 443, False),
        ("CORP.Example", "gpu.corp.example.", 443, True),
        ("192.168.0.0/16", "192.168.1.20", 80, True),
        ("192.168.0.0/16", "10.0.0.1", 80, False),
        ("10.0.0.5", "10.0.0.5", 80, True),
        ("fd00::/8", "fd12::1", 80, True),
        ("gpu.lan:8000", "gpu.lan", 8000, True),
        ("gpu.lan:8000", "gpu.lan", 8001, False),
        ("[fd12::1]:8000", "fd12::1", 8000, True),
        ("gpu.lan:port", "gpu.lan", 80, False),  # malformed: matches nothing
        ("a.example, b.example  c.example", "c.example", 80, True),
    ],
)
def test_no_proxy(no_proxy: str, host: str, port: int, direct: bool) -> None:
    proxy = rules(no_proxy).proxy_for("https", host, port)
    assert (proxy is None) is direct


def test_each_scheme_has_its_own_proxy() -> None:
    only_https = ProxyRules(upstream_network({"HTTPS_PROXY": PROXY}))
    assert only_https.proxy_for("http", "gpu.lan", 80) is None
    assert only_https.proxy_for("https", "api.example", 443) is not None


def test_lower_case_names_win_and_credentials_become_basic_auth() -> None:
    network = upstream_network(
        {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://us%40r:p%3Ass@lower:8080"}
    )
    proxy = network.https_proxy
    assert proxy is not None and (proxy.host, proxy.port) == ("lower", 8080)
    assert proxy.authorization == "Basic " + base64.b64encode(b"us@r:p:ss").decode()
    assert "p%3Ass" not in proxy.shown and "***" in proxy.shown


def test_a_proxy_without_scheme_is_http_and_without_port_is_80() -> None:
    proxy = upstream_network({"HTTP_PROXY": "proxy.corp"}).http_proxy
    assert proxy is not None and (proxy.host, proxy.port, proxy.authorization) == (
        "proxy.corp",
        80,
        None,
    )


@pytest.mark.parametrize(
    "value", ["https://proxy:443", "socks5://proxy:1080", "http://:3128", "http://p:99999"]
)
def test_an_unusable_proxy_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        upstream_network({"HTTPS_PROXY": value})


def test_plain_http_through_a_proxy_names_the_whole_url_and_carries_the_credentials() -> None:
    proxied = Target.parse("http://gpu.lan:8000/v1/models?x=1", rules(**{"HTTP_PROXY": PROXY}))
    assert proxied.path == b"http://gpu.lan:8000/v1/models?x=1"
    assert proxied.proxy_headers == ()
    with_auth = ProxyRules(upstream_network({"HTTP_PROXY": "http://u:p@proxy:1"}))
    target = Target.parse("http://gpu.lan/v1/models", with_auth)
    assert target.path == b"http://gpu.lan/v1/models"
    assert target.proxy_headers == (b"Proxy-Authorization: Basic " + base64.b64encode(b"u:p"),)
    # https is tunnelled: the request line inside the tunnel is the server's own.
    tunnelled = Target.parse("https://api.example/v1/messages", with_auth)
    assert tunnelled.path == b"/v1/messages" and tunnelled.proxy_headers == ()
    direct = Target.parse("http://127.0.0.1:8000/v1/models", with_auth)
    assert direct.path == b"/v1/models" and direct.proxy is None


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_the_tunnel_works_on_both_event_loops(
    new_loop: Callable[[], asyncio.AbstractEventLoop], tmp_path: Path, monkeypatch
) -> None:
    authority = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))

    async def scenario() -> list[int]:
        fake = FakeOpenAI(["m"])
        fake.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("gpu.corp.test").configure_cert(fake.tls)
        await fake.start()
        proxy = FakeProxy({"gpu.corp.test": fake.port})
        await proxy.start()
        client = HTTP1Client(proxies=ProxyRules(upstream_network({"HTTPS_PROXY": proxy.url})))
        statuses = []
        try:
            for _ in range(3):  # the tunnel is pooled like any connection
                response = await client.request(
                    "GET", f"https://gpu.corp.test:{fake.port}/v1/models", {}
                )
                await response.read()
                statuses.append(response.status)
            assert len(proxy.connects) == 1
        finally:
            await client.aclose()
            await proxy.stop()
            await fake.stop()
        return statuses

    loop = new_loop()
    try:
        assert loop.run_until_complete(scenario()) == [200, 200, 200]
    finally:
        loop.close()
