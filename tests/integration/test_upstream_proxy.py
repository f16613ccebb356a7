"""Cloud traffic the corporate way: ``HTTPS_PROXY`` / ``HTTP_PROXY`` honoured (a CONNECT tunnel
for https, absolute-form requests for http), TLS verified against the trusted CAs
(``SSL_CERT_FILE`` honoured), loopback always direct. The proxy and the TLS server are real
servers on loopback; the test CA is made for the test."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trustme

from nexus.registry import Status
from tests.fake_proxy import FakeProxy
from tests.fakes import FakeOpenAI
from tests.harness import LoopThread, settings_for, wait_for
from tests.integration.test_anthropic_backend import KEY, KEY_VAR, MODEL, FakeAnthropic

HOST = "api.anthropic.test"
USER, PASSWORD = "corp user", "p@ss:word"
PROXY_URL_USERINFO = "corp%20user:p%40ss%3Aword"


@pytest.fixture
def start_proxy(loop_thread: LoopThread) -> Iterator[Callable[[FakeProxy], FakeProxy]]:
    started: list[FakeProxy] = []

    def start(proxy: FakeProxy) -> FakeProxy:
        loop_thread.run(proxy.start())
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        loop_thread.run(proxy.stop())


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path / "corporate-ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def tls_anthropic(authority: trustme.CA, start_fake: Callable[[Any], Any]) -> FakeAnthropic:
    fake = FakeAnthropic([MODEL])
    fake.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(HOST).configure_cert(fake.tls)
    started: FakeAnthropic = start_fake(fake)
    return started


def anthropic_settings(fake: FakeAnthropic) -> Any:
    url = f"https://{HOST}:{fake.port}"
    backend = {"name": "claude", "url": url, "type": "anthropic", "api_key_env": KEY_VAR}
    return settings_for(backends=[backend])


def test_https_goes_through_a_connect_tunnel_with_tls_end_to_end(
    monkeypatch, ca, start_fake, start_proxy, start_nexus
):
    authority, ca_file = ca
    fake = tls_anthropic(authority, start_fake)
    proxy = start_proxy(FakeProxy({HOST: fake.port}, credentials=f"{USER}:{PASSWORD}"))
    monkeypatch.setenv(KEY_VAR, KEY)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setenv("HTTPS_PROXY", f"http://{PROXY_URL_USERINFO}@127.0.0.1:{proxy.port}")
    nexus = start_nexus(anthropic_settings(fake))
    backend = nexus.gateway.registry.get("claude")
    assert backend is not None
    assert wait_for(lambda: backend.status is Status.HEALTHY), backend.last_error

    sdk = openai.OpenAI(base_url=nexus.url + "/v1", api_key="client-key", max_retries=0)
    answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello!"
    stream = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello"

    assert proxy.connects and set(proxy.connects) == {f"{HOST}:{fake.port}"}
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert set(proxy.authorizations) == {expected}
    # The key went to Anthropic inside TLS: the proxy relayed it without being able to read it.
    assert len(fake.messages()) == 2
    assert proxy.relayed and KEY.encode() not in proxy.relayed
    assert b"Hello" not in proxy.relayed


def test_a_server_the_trusted_cas_do_not_vouch_for_is_refused(
    monkeypatch, ca, start_fake, start_proxy, start_nexus, client
):
    authority, _ = ca  # the system store does not know this CA, and SSL_CERT_FILE is not set
    fake = tls_anthropic(authority, start_fake)
    proxy = start_proxy(FakeProxy({HOST: fake.port}))
    monkeypatch.setenv(KEY_VAR, KEY)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("https_proxy", proxy.url)
    nexus = start_nexus(anthropic_settings(fake))
    backend = nexus.gateway.registry.get("claude")
    assert backend is not None
    assert wait_for(lambda: backend.status is Status.UNHEALTHY)
    assert "CERTIFICATE_VERIFY_FAILED" in (backend.last_error or ""), backend.last_error
    assert proxy.connects  # it did try, through the tunnel
    assert fake.calls("/v1/models") == []  # and sent nothing to a server it could not trust


def test_a_proxy_refusing_the_tunnel_is_a_clear_reason(
    monkeypatch, ca, start_fake, start_proxy, start_nexus
):
    authority, ca_file = ca
    fake = tls_anthropic(authority, start_fake)
    proxy = start_proxy(FakeProxy({HOST: fake.port}, credentials="right:secret"))
    monkeypatch.setenv(KEY_VAR, KEY)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setenv("HTTPS_PROXY", f"http://wrong:guess-me@127.0.0.1:{proxy.port}")
    nexus = start_nexus(anthropic_settings(fake))
    backend = nexus.gateway.registry.get("claude")
    assert backend is not None
    assert wait_for(lambda: backend.status is Status.UNHEALTHY)
    reason = backend.last_error or ""
    assert "407" in reason and "proxy" in reason, reason
    assert "guess-me" not in reason  # the proxy password is masked wherever it is shown


def test_http_goes_through_the_proxy_in_absolute_form_and_loopback_goes_direct(
    monkeypatch, start_fake, start_proxy, start_nexus
):
    remote = start_fake(FakeOpenAI(["remote-model"]))
    local = start_fake(FakeOpenAI(["local-model"]))
    proxy = start_proxy(FakeProxy({"gpu.corp.test": remote.port}, credentials="u:pw"))
    monkeypatch.setenv("HTTP_PROXY", f"http://u:pw@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://u:pw@127.0.0.1:{proxy.port}")
    backends = [
        {"name": "remote", "url": f"http://gpu.corp.test:{remote.port}", "type": "vllm"},
        {"name": "local", "url": local.url, "type": "vllm"},
    ]
    nexus = start_nexus(settings_for(backends=backends))
    registry = nexus.gateway.registry
    assert wait_for(lambda: all(b.status is Status.HEALTHY for b in registry)), [
        b.last_error for b in registry
    ]
    # The SDK reads HTTP_PROXY too: this client reaches Nexus directly, as a NO_PROXY would.
    direct = openai.DefaultHttpxClient(trust_env=False)
    sdk = openai.OpenAI(base_url=nexus.url + "/v1", api_key="k", max_retries=0, http_client=direct)
    for model in ("remote-model", "local-model"):
        answer = sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "Hello!"

    target = f"http://gpu.corp.test:{remote.port}"
    assert f"POST {target}/v1/chat/completions HTTP/1.1" in proxy.plain
    assert all(line.split(" ")[1].startswith(target) for line in proxy.plain)
    assert proxy.connects == []  # plain http is never tunnelled
    assert remote.calls("/v1/chat/completions") and local.calls("/v1/chat/completions")
    # Loopback never went through the proxy: it saw only the remote backend's requests.
    assert len(proxy.plain) == len(remote.requests)
    assert "proxy-authorization" not in {k.lower() for k in remote.requests[-1].headers}


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("HTTPS_PROXY", "socks5://user:hunter22@proxy:1080", "http:// proxy"),
        ("HTTP_PROXY", "http://proxy:notaport", "not a proxy URL"),
        ("SSL_CERT_FILE", "/nonexistent/ca.pem", "does not exist"),
    ],
)
def test_an_unusable_network_setting_stops_start_up(variable, value, says):
    from nexus.app import create_app
    from nexus.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        create_app(settings_for(), environ={variable: value})
    assert variable in str(caught.value) and says in str(caught.value)
    assert "hunter22" not in str(caught.value)
