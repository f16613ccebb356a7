"""Trust (issue 8, points 1 and 2): a web page cannot drive Nexus, and credentials go only where
the user sent them. Each rule through real sockets: httpx with forged headers, raw sockets for
WebSocket handshakes, fake upstreams that record what reached them."""

from __future__ import annotations

import base64
import logging
import os
import socket
from typing import Any

import httpx2
import orjson
import pytest
from websockets.sync.client import connect

from nexus.dashboard.ws import same_origin
from tests.fakes import FakeOpenAI, Reply
from tests.harness import NexusServer, settings_for, wait_for
from tests.integration.test_discovery import Announcer, discovering

CHAT = "/v1/chat/completions"
BODY = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
RAW_BODY = orjson.dumps(BODY)
JSON = {"Content-Type": "application/json"}
FOREIGN = "rebound.example"
KEY_VAR = "NEXUS_TRUST_TEST_KEY"
KEY = "sk-trust-0123456789abcdef"
OTHER_VAR = "NEXUS_TRUST_TEST_OTHER"  # set in the server's environment, named by no config
PASSWORD = "pw-hunter2-in-the-url"


def envelope(resp: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


def names(nexus: NexusServer) -> list[str]:
    return sorted(b.name for b in nexus.gateway.registry)


@pytest.fixture
def fake(start_fake):
    return start_fake(FakeOpenAI())


@pytest.fixture
def nexus(fake, start_nexus):
    return start_nexus(settings_for(("main", fake, "vllm")))


# --- Host: DNS rebinding ----------------------------------------------------------------------

EVERY_ROUTE = [
    ("GET", "/v1/history"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/backends"),
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/no/such/path"),
    ("POST", CHAT),
    ("POST", "/v1/embeddings"),
    ("POST", "/admin/backends"),
    ("DELETE", "/admin/backends/main"),
]


@pytest.mark.parametrize(("method", "path"), EVERY_ROUTE)
def test_a_foreign_host_is_refused_on_every_route(nexus, fake, client, method, path):
    before = len(fake.requests)
    body = RAW_BODY if method == "POST" else None
    headers = {"Host": f"{FOREIGN}:{nexus.port}", **JSON}
    resp = client.request(method, nexus.url + path, content=body, headers=headers)
    error = envelope(resp, 421, "invalid_host")
    assert FOREIGN in error["message"] and "allowed_hosts" in error["message"]
    assert len(resp.headers["x-request-id"]) == 32
    assert len(fake.requests) == before  # nothing reached the upstream
    assert names(nexus) == ["main"]
    assert nexus.gateway.history.last(10) == []


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:1", "LocalHost:8000", "127.0.0.1", "127.0.0.1:9", "[::1]:80", "[::1]"],
)
def test_local_names_are_accepted_whatever_the_port(nexus, client, host):
    resp = client.post(nexus.url + CHAT, content=RAW_BODY, headers={"Host": host, **JSON})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "host", ["localhost.rebound.example", "127.0.0.1.nip.io", "[::1", "[::2]:80"]
)
def test_names_that_only_look_local_are_refused(nexus, client, host):
    resp = client.get(nexus.url + "/v1/history", headers={"Host": host})
    envelope(resp, 421, "invalid_host")


def raw_request(port: int, head: str, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_rebinding_over_a_raw_socket_is_refused_and_http10_without_host_passes(nexus):
    # What a rebinding page's browser sends: the attacker's name in Host, on Nexus's socket.
    head = f"GET /v1/history HTTP/1.1\r\nHost: {FOREIGN}\r\nConnection: close\r\n\r\n"
    answer = raw_request(nexus.port, head)
    assert answer.startswith(b"HTTP/1.1 421 "), answer[:200]
    assert b'"code":"invalid_host"' in answer
    # No Host at all is not a browser (HTTP/1.0 health checkers): it passes.
    answer = raw_request(nexus.port, "GET /health HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        # two Hosts: which is meant is anybody's guess (RFC 9112 says 400)
        (f"GET /v1/history HTTP/1.1\r\nHost: {FOREIGN}\r\nHost: localhost\r\n", 400, "invalid"),
        # absolute-form: its authority, not Host, names the server it is meant for
        (f"GET http://{FOREIGN}/v1/history HTTP/1.1\r\nHost: localhost\r\n", 400, "invalid"),
        ("GET /v1/history HTTP/1.1\r\nHost: localhost:abc\r\n", 421, "invalid_host"),
        ("GET /v1/history HTTP/1.1\r\nHost: [::1]x\r\n", 421, "invalid_host"),
    ],
    ids=["two-hosts", "absolute-form", "port-not-a-number", "junk-after-ipv6"],
)
def test_ambiguous_hosts_are_refused(nexus, head, status, code):
    answer = raw_request(nexus.port, head + "Connection: close\r\n\r\n")
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert f'"code":"{code}'.encode() in answer
    assert b'"data"' not in answer  # no history was served


def test_allowed_hosts_adds_names(fake, start_nexus, client):
    nexus = start_nexus(
        settings_for(("main", fake, "vllm"), server={"allowed_hosts": ["Nexus.LAN"]})
    )
    assert client.get(nexus.url + "/health", headers={"Host": "nexus.lan:8000"}).status_code == 200
    assert client.get(nexus.url + "/health", headers={"Host": "localhost"}).status_code == 200
    envelope(client.get(nexus.url + "/health", headers={"Host": "other.lan"}), 421, "invalid_host")


def test_a_star_accepts_any_host(fake, start_nexus, client):
    nexus = start_nexus(settings_for(("main", fake, "vllm"), server={"allowed_hosts": ["*"]}))
    assert client.get(nexus.url + "/health", headers={"Host": FOREIGN}).status_code == 200


def test_on_a_wildcard_bind_addresses_pass_but_names_must_be_listed(fake, start_nexus, client):
    # The harness still serves on 127.0.0.1; only the guard reads the configured bind address.
    nexus = start_nexus(settings_for(("main", fake, "vllm"), server={"host": "0.0.0.0"}))
    for host in ("192.0.2.7:8000", "[2001:db8::7]:8000", "localhost"):
        assert client.get(nexus.url + "/health", headers={"Host": host}).status_code == 200
    envelope(client.get(nexus.url + "/health", headers={"Host": FOREIGN}), 421, "invalid_host")


def test_the_bind_address_is_accepted(fake, start_nexus, client):
    nexus = start_nexus(settings_for(("main", fake, "vllm"), server={"host": "192.0.2.9"}))
    assert client.get(nexus.url + "/health", headers={"Host": "192.0.2.9:80"}).status_code == 200
    envelope(client.get(nexus.url + "/health", headers={"Host": "192.0.2.8"}), 421, "invalid_host")


# --- Content-Type and Origin on state-changing routes ------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ],
)
@pytest.mark.parametrize("path", [CHAT, "/v1/embeddings", "/admin/backends"])
def test_state_changing_routes_need_json(nexus, fake, client, path, content_type):
    body = (
        orjson.dumps({"name": "evil", "url": fake.url, "type": "vllm"})
        if "admin" in path
        else RAW_BODY
    )
    headers = {} if content_type is None else {"Content-Type": content_type}
    resp = client.post(nexus.url + path, content=body, headers=headers)
    error = envelope(resp, 415, "unsupported_media_type")
    assert "application/json" in error["message"]
    assert fake.calls(CHAT) == [] and fake.calls("/v1/embeddings") == []
    assert names(nexus) == ["main"]


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_json_with_or_without_a_charset_is_accepted(nexus, client, content_type):
    resp = client.post(nexus.url + CHAT, content=RAW_BODY, headers={"Content-Type": content_type})
    assert resp.status_code == 200, resp.text


def foreign_origins(port: int) -> list[str]:
    return [
        f"http://127.0.0.2:{port}",  # another loopback host
        f"http://127.0.0.1:{port + 1}",  # another port
        f"https://127.0.0.1:{port}",  # another scheme
        f"http://localhost:{port}",  # another name for the same server is another origin
        "http://evil.example",
        "null",  # sandboxed frames, file: pages
    ]


@pytest.mark.parametrize("index", range(6))
def test_a_foreign_origin_cannot_change_anything(nexus, fake, client, index):
    origin = foreign_origins(nexus.port)[index]
    headers = {"Origin": origin, **JSON}
    for method, path, body in [
        ("POST", CHAT, RAW_BODY),
        (
            "POST",
            "/admin/backends",
            orjson.dumps({"name": "evil", "url": fake.url, "type": "vllm"}),
        ),
        ("DELETE", "/admin/backends/main", None),
    ]:
        resp = client.request(method, nexus.url + path, content=body, headers=headers)
        error = envelope(resp, 403, "invalid_origin")
        assert origin in error["message"]
    assert fake.calls(CHAT) == []
    assert names(nexus) == ["main"]
    # Reading is left to the browser's same-origin policy: no CORS header lets a page see it.
    read = client.get(nexus.url + "/v1/history", headers={"Origin": origin})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


def test_own_origin_and_no_origin_are_accepted(nexus, fake, client):
    own = client.post(nexus.url + CHAT, content=RAW_BODY, headers={"Origin": nexus.url, **JSON})
    assert own.status_code == 200, own.text
    assert client.post(nexus.url + CHAT, content=RAW_BODY, headers=JSON).status_code == 200
    via_localhost = client.post(
        nexus.url + CHAT,
        content=RAW_BODY,
        headers={
            "Host": f"localhost:{nexus.port}",
            "Origin": f"http://localhost:{nexus.port}",
            **JSON,
        },
    )
    assert via_localhost.status_code == 200, via_localhost.text


def test_a_delete_without_a_body_needs_no_content_type(nexus, fake, client):
    added = client.post(
        nexus.url + "/admin/backends", json={"name": "extra", "url": fake.url, "type": "vllm"}
    )
    assert added.status_code == 201, added.text
    resp = client.delete(nexus.url + "/admin/backends/extra")
    assert resp.status_code == 200, resp.text
    assert names(nexus) == ["main"]


# --- the WebSocket ----------------------------------------------------------------------------


def ws_handshake(port: int, host: str, origin: str | None) -> int:
    """The status of a raw WebSocket handshake to ``/ws``."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        + (f"Origin: {origin}\r\n" if origin else "")
        + "\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_ws_refuses_a_foreign_host_and_a_foreign_origin_scheme_included(nexus, caplog):
    caplog.set_level(logging.DEBUG, logger="nexus.api")
    port = nexus.port
    own_host = f"127.0.0.1:{port}"
    # A handshake is refused with a plain 403: a page never sees a handshake's body anyway.
    assert ws_handshake(port, f"{FOREIGN}:{port}", None) == 403
    foreign = (f"https://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}", "http://127.0.0.2")
    for origin in foreign:
        assert ws_handshake(port, own_host, origin) == 403, origin
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == 4 and FOREIGN in refused[0]
    assert all(origin in line for origin, line in zip(foreign, refused[1:], strict=True))
    assert ws_handshake(port, own_host, f"http://127.0.0.1:{port}") == 101
    assert ws_handshake(port, own_host, None) == 101
    assert ws_handshake(port, f"localhost:{port}", f"http://localhost:{port}") == 101


@pytest.mark.parametrize(
    ("origin", "scheme", "same"),
    [
        ("http://127.0.0.1:8000", "ws", True),
        ("https://127.0.0.1:8000", "ws", False),
        ("https://127.0.0.1:8000", "wss", True),
        ("http://127.0.0.1:8001", "ws", False),
        ("http://127.0.0.2:8000", "ws", False),
    ],
)
def test_the_feed_itself_checks_the_origin_exactly(origin, scheme, same):
    scope = {
        "scheme": scheme,
        "headers": [(b"host", b"127.0.0.1:8000"), (b"origin", origin.encode())],
    }
    assert same_origin(scope) is same


# --- the admin API: key variables and proxies ---------------------------------------------------


@pytest.fixture
def keyed_config(fake, start_nexus, monkeypatch):
    """A config that names KEY_VAR for one backend; OTHER_VAR is set but named nowhere."""
    monkeypatch.setenv(KEY_VAR, KEY)
    monkeypatch.setenv(OTHER_VAR, "server-secret-never-to-leave")
    return start_nexus(
        settings_for(
            backends=[{"name": "main", "url": fake.url, "type": "vllm", "api_key_env": KEY_VAR}]
        )
    )


@pytest.mark.parametrize("variable", [OTHER_VAR, "HOME", "PATH"])
def test_an_added_backend_may_not_read_a_variable_the_config_does_not_name(
    keyed_config, start_fake, client, variable
):
    catcher = start_fake(FakeOpenAI(["caught"]))
    entry = {"name": "evil", "url": catcher.url, "type": "vllm", "api_key_env": variable}
    resp = client.post(keyed_config.url + "/admin/backends", json=entry)
    error = envelope(resp, 400, "invalid_request_error")
    assert error["param"] == "api_key_env"
    assert variable in error["message"] and KEY_VAR in error["message"]
    assert names(keyed_config) == ["main"]
    assert catcher.requests == []  # never probed, so no key was sent anywhere


def test_an_added_backend_may_use_a_variable_the_config_names(keyed_config, start_fake, client):
    other = start_fake(FakeOpenAI(["other-model"]))
    entry = {"name": "second", "url": other.url, "type": "vllm", "api_key_env": KEY_VAR}
    resp = client.post(keyed_config.url + "/admin/backends", json=entry)
    assert resp.status_code == 201, resp.text
    probe = other.calls("/v1/models")[0]
    assert header(probe.headers, "authorization") == f"Bearer {KEY}"


@pytest.mark.parametrize(
    "proxy",
    [
        {"X-Forwarded-For": "203.0.113.5"},
        {"Forwarded": "for=203.0.113.5"},
        {"X-Real-IP": "203.0.113.5"},
    ],
)
def test_a_proxied_request_is_never_loopback_for_the_admin_api(nexus, fake, client, proxy):
    entry = {"name": "extra", "url": fake.url, "type": "vllm"}
    resp = client.post(nexus.url + "/admin/backends", json=entry, headers=proxy)
    error = envelope(resp, 403, "forbidden")
    assert next(iter(proxy)) in error["message"] and "admin_key_env" in error["message"]
    envelope(client.delete(nexus.url + "/admin/backends/main", headers=proxy), 403, "forbidden")
    assert names(nexus) == ["main"]


def test_a_proxied_request_with_the_admin_key_is_accepted(fake, start_nexus, client, monkeypatch):
    monkeypatch.setenv("NEXUS_TRUST_ADMIN", "admin-key-for-trust-tests")
    nexus = start_nexus(
        settings_for(("main", fake, "vllm"), server={"admin_key_env": "NEXUS_TRUST_ADMIN"})
    )
    entry = {"name": "extra", "url": fake.url, "type": "vllm"}
    headers = {
        "X-Forwarded-For": "203.0.113.5",
        "Authorization": "Bearer admin-key-for-trust-tests",
    }
    resp = client.post(nexus.url + "/admin/backends", json=entry, headers=headers)
    assert resp.status_code == 201, resp.text


# --- credentials go only where the user sent them ----------------------------------------------


def header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name), None)


def test_the_clients_authorization_goes_only_to_backends_the_user_added(
    loop_thread, start_fake, start_nexus, client
):
    static = start_fake(FakeOpenAI(["static-model"]))
    manual = start_fake(FakeOpenAI(["manual-model"]))
    probed = start_fake(FakeOpenAI(["probed-model"]))
    announced = start_fake(FakeOpenAI(["mdns-model"]))
    nexus = start_nexus(
        discovering(
            ("static", static, "vllm"),
            probe_local_ports=[probed.port],
            service_types=["_llm._tcp.local"],
        )
    )
    added = client.post(
        nexus.url + "/admin/backends", json={"name": "manual", "url": manual.url, "type": "vllm"}
    )
    assert added.status_code == 201, added.text
    announcer = Announcer(loop_thread)
    try:
        announcer.announce("_llm._tcp.local.", "trust_box", announced.port, type="vllm")
        assert wait_for(
            lambda: any(b.source == "mdns" and b.healthy for b in nexus.gateway.registry), 15
        )
        sources = {b.name: b.source for b in nexus.gateway.registry}
        assert sorted(sources.values()) == ["manual", "mdns", "probe", "static"]

        token = {"Authorization": "Bearer the-clients-own-token"}
        for fake, model in [
            (static, "static-model"),
            (manual, "manual-model"),
            (probed, "probed-model"),
            (announced, "mdns-model"),
        ]:
            resp = client.post(nexus.url + CHAT, json={**BODY, "model": model}, headers=token)
            assert resp.status_code == 200, resp.text
            sent = header(fake.calls(CHAT)[-1].headers, "authorization")
            expected = token["Authorization"] if fake in (static, manual) else None
            assert sent == expected, model
    finally:
        announcer.close()


# --- secrets are never shown -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://bob:{PASSWORD}@127.0.0.1:1",
        f"http://bob:{PASSWORD}@127.0.0.1:1 x",
        f"http://bob:{PASSWORD}@127.0.0.1:99999",
        f"http://bob:{PASSWORD}@",
    ],
)
def test_a_refused_backend_url_is_never_echoed_with_its_password(nexus, client, url):
    resp = client.post(
        nexus.url + "/admin/backends", json={"name": "b", "url": url, "type": "vllm"}
    )
    error = envelope(resp, 400, "invalid_request_error")
    assert PASSWORD not in resp.text
    assert "bob:***@" in error["message"]
    assert names(nexus) == ["main"]


def test_url_passwords_and_echoed_keys_are_redacted_everywhere(
    start_fake, start_nexus, client, monkeypatch, caplog
):
    monkeypatch.setenv(KEY_VAR, KEY)
    echo = start_fake(FakeOpenAI())
    leaky = {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "x", "code": "k"}}
    url = echo.url.replace("http://", f"http://nexus:{PASSWORD}@")
    nexus = start_nexus(
        settings_for(
            backends=[{"name": "echo", "url": url, "type": "vllm", "api_key_env": KEY_VAR}],
            health_check={"failure_threshold": 1},
        )
    )
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []

    # a 4xx passes through as the backend's envelope; a 5xx becomes Nexus's 502 message
    echo.push(
        CHAT, Reply(status=401, json=leaky), Reply(status=500, body=f"bad key {KEY}".encode())
    )
    for status in (401, 502):
        resp = client.post(nexus.url + CHAT, json=BODY)
        assert resp.status_code == status, resp.text
        assert "***" in resp.text
        shown.append(resp.text)
    # an error event inside a stream
    ok = b'data: {"id":"1","object":"chat.completion.chunk","choices":[]}\n\n'
    bad = b"data: " + orjson.dumps(leaky) + b"\n\n"
    echo.push(CHAT, Reply(events=[ok, bad, b"data: [DONE]\n\n"]))
    streamed = client.post(nexus.url + CHAT, json={**BODY, "stream": True})
    assert streamed.status_code == 200 and "Incorrect API key provided: ***" in streamed.text
    shown.append(streamed.text)
    # a probe that fails with the key in its answer: last_error
    echo.push("/v1/models", Reply(status=403, json=leaky))
    nexus.loop.run(nexus.gateway.health.check(nexus.gateway.registry.get("echo")))
    view = client.get(nexus.url + "/v1/backends").json()["data"][0]
    assert view["url"] == url.replace(PASSWORD, "***")
    assert view["last_error"] is not None and "***" in view["last_error"]

    for path in ("/v1/backends", "/v1/stats", "/health", "/metrics", "/v1/history", "/v1/models"):
        shown.append(client.get(nexus.url + path).text)
    with connect(nexus.url.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        shown.append(str(ws.recv(timeout=15)))  # the dashboard's snapshot
    shown.append(caplog.text)
    for text in shown:
        assert KEY not in text and PASSWORD not in text
