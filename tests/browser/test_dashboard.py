"""The dashboard: its files, the /ws protocol, and the page itself in headless Debian Chromium.

The browser tests drive ``/usr/bin/chromium`` (Debian's package; ``scripts/test`` installs it)
through Playwright, and skip with the reason when either is missing. They never reload the page:
what they wait for must arrive over the WebSocket, or over polling when it cannot connect.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from nexus.dashboard.ws import LiveFeed
from tests.fakes import FakeOpenAI
from tests.harness import NexusServer, settings_for, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHAT = "/v1/chat/completions"
BODY = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
EVIL = '<img src=x onerror="document.title=1">'  # a model name that is markup
WAIT_MS = 20_000  # the longest Playwright waits for something to show (it returns at once)


def chat(client, nexus: NexusServer, request_id: str, model: str = "mock-model") -> int:
    body = {**BODY, "model": model}
    resp = client.post(nexus.url + CHAT, json=body, headers={"X-Request-Id": request_id})
    return int(resp.status_code)


def live_feed(nexus: NexusServer) -> LiveFeed:
    for route in nexus.app.routes:
        if getattr(route, "path", None) == "/ws":
            endpoint = route.endpoint  # type: ignore[attr-defined]
            assert isinstance(endpoint, LiveFeed)
            return endpoint
    raise AssertionError("no /ws route")


def ws_url(nexus: NexusServer) -> str:
    return nexus.url.replace("http://", "ws://") + "/ws"


def open_feed(nexus: NexusServer) -> ClientConnection:
    # No size limit and no flow control: this client reads everything it is sent.
    return connect(ws_url(nexus), max_size=None, max_queue=None, open_timeout=10)


def next_of(ws: ClientConnection, kind: str, match: Any = None) -> dict[str, Any]:
    """The next message of ``kind`` (for which ``match(data)`` holds), skipping others."""
    while True:
        message: dict[str, Any] = orjson.loads(ws.recv(timeout=15))
        if message["type"] == kind and (match is None or match(message["data"])):
            return message


# --- files ------------------------------------------------------------------------------------


def test_page_and_files_have_their_types_and_cache_headers(start_fake, start_nexus, client):
    nexus = start_nexus(settings_for(("main", start_fake(FakeOpenAI()), "vllm")))
    page = client.get(nexus.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    again = client.get(nexus.url + "/", headers={"If-None-Match": page.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")

    # the page names its files with their version; those are cached for good
    names = dict(re.findall(r'"(dashboard/[a-z]+\.(?:js|css))\?v=([0-9a-f]+)"', page.text))
    assert set(names) == {"dashboard/app.js", "dashboard/style.css"}
    kinds = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}
    for path, version in names.items():
        resp = client.get(f"{nexus.url}/{path}?v={version}")
        assert resp.status_code == 200
        assert resp.headers["content-type"] == kinds[path.rsplit(".", 1)[1]]
        assert resp.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert resp.headers["etag"] == f'"{version}"'
        stale = client.get(f"{nexus.url}/{path}?v=old")
        assert stale.headers["cache-control"] == "no-cache"  # an old page's name: revalidate
    head = client.head(nexus.url + "/dashboard/app.js")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0

    missing = client.get(nexus.url + "/dashboard/secrets.toml")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert client.get(nexus.url + "/dashboard/..%2Fws.py").status_code == 404


# --- the WebSocket protocol -------------------------------------------------------------------


def test_ws_sends_a_snapshot_then_requests_stats_and_backend_changes(
    loop_thread, start_fake, start_nexus, client
):
    main = start_fake(FakeOpenAI())
    many = [f"model-{i:03d}-with-a-long-enough-name" for i in range(400)]
    spare = start_fake(FakeOpenAI(models=many))  # its view alone is > 10 KiB
    nexus = start_nexus(
        settings_for(
            ("main", main, "vllm"), ("spare", spare, "vllm"), health_check={"failure_threshold": 1}
        )
    )
    assert chat(client, nexus, "before") == 200
    with open_feed(nexus) as ws:
        first = orjson.loads(ws.recv(timeout=15))
        assert first["type"] == "snapshot"
        snapshot = first["data"]
        assert set(snapshot) >= {"stats", "backends", "models", "history", "series"}
        assert [entry["request_id"] for entry in snapshot["history"]] == ["before"]
        assert snapshot["stats"]["requests"]["requests"] == 1
        assert {b["name"]: b["status"] for b in snapshot["backends"]} == {
            "main": "healthy",
            "spare": "healthy",
        }
        assert len(orjson.dumps(snapshot["backends"])) > 10 * 1024
        assert {m["id"] for m in snapshot["models"]} == {"mock-model", *many}
        assert sum(row[1] for row in snapshot["series"]["buckets"]) == 1

        assert chat(client, nexus, "after") == 200
        request = next_of(ws, "request")
        assert (request["data"]["request_id"], request["data"]["backend"]) == ("after", "main")
        assert "stage_ns" not in request["data"]  # the public entry, as /v1/history has it

        # a model name at the 256-character limit comes through whole
        long_name = "m" * 256
        assert chat(client, nexus, "long", model=long_name) == 404
        request = next_of(ws, "request")
        assert request["data"]["model"] == long_name

        stats = next_of(ws, "stats", lambda data: data["requests"]["requests"] == 3)
        assert stats["data"]["queue_depth"] == 0

        loop_thread.run(spare.stop())
        loop_thread.run(nexus.gateway.health.check_all())
        change = next_of(ws, "backends", lambda data: any(b["status"] == "unhealthy" for b in data))
        assert len(orjson.dumps(change)) > 10 * 1024  # the Rust gateway dropped these silently
        assert {b["name"]: b["status"] for b in change["data"]} == {
            "main": "healthy",
            "spare": "unhealthy",
        }
        models = next_of(ws, "models")
        assert [m["id"] for m in models["data"]] == ["mock-model"]

    hub = live_feed(nexus).hub
    assert wait_for(lambda: not hub.subscribed and not hub.clients)
    gateway = nexus.gateway
    assert gateway.keys is not None
    assert gateway.telemetry._consumers == [  # unsubscribed: only the built-in ones left
        gateway.metrics,
        gateway.stats,
        gateway.history,
        gateway.keys.count,  # each key's usage, counted from the outcomes
    ]


def test_ws_refuses_a_page_from_another_origin(start_fake, start_nexus):
    nexus = start_nexus(settings_for(("main", start_fake(FakeOpenAI()), "vllm")))
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(nexus), origin=Origin("http://evil.example"), open_timeout=10)
    assert refused.value.response.status_code == 403
    own = Origin(f"http://127.0.0.1:{nexus.port}")
    with connect(ws_url(nexus), origin=own, open_timeout=10) as ws:
        assert orjson.loads(ws.recv(timeout=15))["type"] == "snapshot"


class StalledClient:
    """A WebSocket client that completes the handshake, then reads nothing until told to."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buffer = bytearray()
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.buffer = bytearray(rest)

    def _read(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buffer += chunk

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            self._read()

    def close_code(self) -> int:
        """Read frames until the close frame; its status code."""
        while True:
            self._fill(2)
            opcode, length, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
            if length >= 126:
                start = 4 if length == 126 else 10
                self._fill(start)
                length = int.from_bytes(self.buffer[2:start], "big")
            self._fill(start + length)
            payload = bytes(self.buffer[start : start + length])
            del self.buffer[: start + length]
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")

    def close(self) -> None:
        self.sock.close()


def shrink_send_buffer(nexus: NexusServer, client_sock: socket.socket) -> None:
    """Nexus's end of ``client_sock`` gets a small kernel send buffer."""
    port = client_sock.getsockname()[1]

    def shrunk() -> bool:
        for protocol in list(nexus.server.server_state.connections):
            client = getattr(protocol, "client", None)
            if client and client[1] == port:
                sock = protocol.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                return True
        return False

    assert wait_for(shrunk)


def test_a_client_that_cannot_keep_up_is_dropped_and_the_others_get_everything(
    start_fake, start_nexus, client
):
    nexus = start_nexus(settings_for(("main", start_fake(FakeOpenAI()), "vllm")))
    feed = live_feed(nexus)
    feed.queue_limit = 32  # the clients below get a smaller queue than the default
    big = "x" * 240  # model names are at most 256 characters (issue 8)
    stalled = StalledClient(nexus.port)
    shrink_send_buffer(nexus, stalled.sock)  # so that a few small messages fill it
    try:
        with open_feed(nexus) as ws:
            assert orjson.loads(ws.recv(timeout=15))["type"] == "snapshot"
            assert wait_for(lambda: len(feed.hub.clients) == 2)
            sent: list[str] = []
            received: list[str] = []
            while len(feed.hub.clients) == 2:  # until the stalled client is dropped
                assert len(sent) < 500, "the stalled client was never dropped"
                request_id = f"flood-{len(sent)}"
                assert chat(client, nexus, request_id, model=f"{big}-{len(sent)}") == 404
                sent.append(request_id)
                # in step with this client, so that only the stalled one falls behind
                received.append(next_of(ws, "request")["data"]["request_id"])

            # the stalled client, once it reads, finds it was closed as too slow
            assert stalled.close_code() == 1013

            assert chat(client, nexus, "after-drop") == 200
            sent.append("after-drop")
            received.append(next_of(ws, "request")["data"]["request_id"])
            assert received == sent  # every message, in order, none cut or lost
    finally:
        stalled.close()
    assert wait_for(lambda: not feed.hub.subscribed)


# --- the page in Chromium ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright_api() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is not installed at /usr/bin/chromium "
            "(scripts/test installs it: apt-get install chromium)"
        )
    return pytest.importorskip(
        "playwright.sync_api",
        reason="the playwright package is not installed (scripts/install --dev)",
    )


@pytest.fixture(scope="module")
def browser(playwright_api: Any) -> Any:
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def expect(playwright_api: Any) -> Any:
    return playwright_api.expect


def watch(page: Any) -> list[str]:
    """Errors the page logs or throws; a test expects none."""
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def luminance(css_color: str) -> float:
    red, green, blue = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_the_page_shows_requests_and_backend_status_as_they_happen(
    browser, expect, loop_thread, start_fake, start_nexus, client
):
    main = start_fake(FakeOpenAI(models=["mock-model", EVIL]))
    spare = start_fake(FakeOpenAI(models=["spare-model"]))
    nexus = start_nexus(
        settings_for(
            ("main", main, "vllm"), ("spare", spare, "vllm"), health_check={"failure_threshold": 1}
        )
    )
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
    try:
        page = context.new_page()
        errors = watch(page)
        page.goto(nexus.url + "/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        page.evaluate("window.loadedOnce = true")  # gone if the page were reloaded
        spare_card = page.locator('.backend[data-backend="spare"]')
        expect(spare_card).to_have_attribute("data-status", "healthy", timeout=WAIT_MS)

        for index in range(3):
            assert chat(client, nexus, f"dash-{index}") == 200
        for index in range(3):
            row = page.locator(f'#feed-rows tr[data-request-id="dash-{index}"]')
            expect(row).to_contain_text("mock-model", timeout=WAIT_MS)
            expect(row).to_contain_text("main")
            expect(row).to_contain_text("200")
        expect(page.locator("#s-requests")).to_have_text("3", timeout=WAIT_MS)

        # untrusted names are text, never markup
        expect(page.locator("#matrix")).to_contain_text(EVIL, timeout=WAIT_MS)
        expect(page.locator('.backend[data-backend="main"] .chip').first).to_have_text(EVIL)
        assert page.locator("img").count() == 0
        assert page.title() == "Nexus"

        loop_thread.run(spare.stop())
        loop_thread.run(nexus.gateway.health.check_all())
        expect(spare_card).to_have_attribute("data-status", "unhealthy", timeout=WAIT_MS)
        expect(spare_card.locator(".status")).to_have_text("unhealthy")
        expect(page.locator("#s-backends")).to_have_text("1 / 2", timeout=WAIT_MS)

        assert page.evaluate("window.loadedOnce") is True
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert luminance(background) > 0.8, background  # light mode
        screenshot(page, "dashboard.png")
        assert errors == []
    finally:
        context.close()


def test_the_page_fits_a_phone_in_dark_mode(browser, expect, start_fake, start_nexus, client):
    long_model = "an-unusually-long-model-name-" + "q" * 80
    fake = start_fake(FakeOpenAI(models=["mock-model", long_model]))
    nexus = start_nexus(settings_for(("a-backend-with-a-long-name-" + "b" * 37, fake, "vllm")))
    assert chat(client, nexus, "phone-0", model=long_model) == 200
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        color_scheme="dark",
    )
    try:
        page = context.new_page()
        errors = watch(page)
        page.goto(nexus.url + "/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        expect(page.locator('#feed-rows tr[data-request-id="phone-0"]')).to_contain_text(
            long_model, timeout=WAIT_MS
        )
        assert chat(client, nexus, "phone-1") == 200
        expect(page.locator('#feed-rows tr[data-request-id="phone-1"]')).to_be_visible(
            timeout=WAIT_MS
        )
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page is {overflow}px wider than a phone"
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert luminance(background) < 0.2, background  # dark mode
        screenshot(page, "dashboard-phone-dark.png")
        assert errors == []
    finally:
        context.close()


def test_the_page_polls_while_the_socket_cannot_connect_then_goes_live(
    browser, expect, start_fake, start_nexus, client
):
    nexus = start_nexus(settings_for(("main", start_fake(FakeOpenAI()), "vllm")))
    allowed: list[bool] = []  # empty: every WebSocket is refused

    def socket_route(ws: Any) -> None:
        if allowed:
            ws.connect_to_server()
        else:
            ws.close(code=1011)

    context = browser.new_context()
    try:
        page = context.new_page()
        page.route_web_socket(re.compile(r"/ws$"), socket_route)
        page.goto(nexus.url + "/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "polling", timeout=WAIT_MS)
        assert chat(client, nexus, "polled") == 200
        expect(page.locator('#feed-rows tr[data-request-id="polled"]')).to_contain_text(
            "mock-model", timeout=WAIT_MS
        )
        expect(page.locator(".backend[data-backend='main']")).to_have_attribute(
            "data-status", "healthy"
        )

        allowed.append(True)  # the next retry connects
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=40_000)
        assert chat(client, nexus, "pushed") == 200
        expect(page.locator('#feed-rows tr[data-request-id="pushed"]')).to_be_visible(
            timeout=WAIT_MS
        )
        assert page.locator('#feed-rows tr[data-request-id="polled"]').count() == 1
    finally:
        context.close()


def test_the_spend_panel_shows_what_priced_requests_cost(
    browser, expect, monkeypatch, start_fake, start_nexus, client
):
    monkeypatch.setenv("DASHBOARD_TEST_OPENAI_KEY", "sk-dashboard")
    cloud = start_fake(FakeOpenAI())
    backend = {"name": "cloud", "url": cloud.url, "type": "openai"}
    nexus = start_nexus(
        settings_for(
            backends=[{**backend, "api_key_env": "DASHBOARD_TEST_OPENAI_KEY"}],
            # FakeOpenAI's answer: 5 prompt and 2 completion tokens, $0.009 at these prices
            pricing=[{"model_pattern": "*", "input_per_mtok": 1000, "output_per_mtok": 2000}],
            routing={"budget": {"monthly_limit_usd": 0.01, "soft_limit_percent": 75}},
        )
    )
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    try:
        page = context.new_page()
        errors = watch(page)
        page.goto(nexus.url + "/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        panel = page.locator("#spend")
        expect(panel.locator("#spend-total")).to_have_text("$0.00", timeout=WAIT_MS)
        expect(panel.locator("#spend-limit")).to_have_text("of $0.0100 limit")
        expect(panel).to_have_attribute("data-status", "Normal")

        assert chat(client, nexus, "priced-1") == 200
        row = page.locator('#feed-rows tr[data-request-id="priced-1"]')
        expect(row.locator("td.cost")).to_have_text("$0.00900", timeout=WAIT_MS)
        # spend and status come with the next stats message, at most a second later
        expect(panel.locator("#spend-total")).to_have_text("$0.00900", timeout=WAIT_MS)
        expect(panel).to_have_attribute("data-status", "SoftLimit")  # 90 % of the limit
        expect(panel.locator("#spend-status")).to_have_text("SoftLimit")
        expect(panel.locator("#spend-utilization")).to_contain_text("90.0% used")
        expect(panel.locator("#spend-bar-box")).to_have_attribute("aria-valuenow", "90.0")
        spent = panel.locator('#spend-backends li[data-backend="cloud"]')
        expect(spent).to_contain_text("cloud")
        expect(spent).to_contain_text("$0.00900")
        status_color = page.evaluate(
            "getComputedStyle(document.getElementById('spend-status')).color"
        )
        normal_color = page.evaluate("getComputedStyle(document.documentElement).color")
        assert status_color != normal_color  # the status is coloured

        assert chat(client, nexus, "priced-2") == 200  # past the limit: warn only
        expect(panel).to_have_attribute("data-status", "HardLimit", timeout=WAIT_MS)
        expect(panel.locator("#spend-total")).to_have_text("$0.0180")
        screenshot(page, "dashboard-spend.png")

        # on a phone the cost column folds into the row's "via" line; nothing overflows
        page.set_viewport_size({"width": 390, "height": 844})
        expect(row.locator(".via")).to_have_text("via cloud · $0.00900")
        expect(row.locator(".via")).to_be_visible()
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page is {overflow}px wider than a phone"
        assert errors == []
    finally:
        context.close()
