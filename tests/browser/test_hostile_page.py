"""A hostile web page in the user's browser cannot drive Nexus (issue 8, point 1).

Debian's Chromium (``/usr/bin/chromium``, through Playwright, as in ``test_dashboard``) opens a
page served from a second loopback origin (``http://127.0.0.2:<port>``) that tries what a real
attack would: a ``text/plain`` POST to ``/admin/backends`` (no CORS preflight), reads of
``/v1/history``, a form POST to ``/v1/chat/completions``, the ``/ws`` feed. A second page runs
in a rebound origin (``rebound.example`` resolved to 127.0.0.1 by the browser, as DNS rebinding
would) and reads Nexus same-origin. Afterwards nothing in Nexus has changed, no request reached
the fake upstream, and Nexus never contacted the hostile origin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from tests.browser.test_dashboard import CHROMIUM, CHROMIUM_ARGS, playwright_api  # noqa: F401
from tests.fakes import FakeOpenAI
from tests.harness import LoopThread, NexusServer, settings_for

CHAT = "/v1/chat/completions"
SECRET_VAR = "NEXUS_BROWSER_TEST_SECRET"
REBOUND = "rebound.example"
WAIT_MS = 30_000

ATTACK = """
<!doctype html><html><body>
<form id="form" method="POST" enctype="text/plain" target="sink"
      action="{{NEXUS}}/v1/chat/completions">
<input name='{"model":"mock-model","messages":[{"role":"user","content":"x"}],"pad":"' value='"}'>
</form>
<script>
const NEXUS = "{{NEXUS}}";
const results = window.partial = {};
async function attempt(name, run) {
  try { results[name] = await run(); } catch (error) { results[name] = "error: " + error.name; }
}
const entry = JSON.stringify(
  {name: "evil", url: location.origin, type: "vllm", api_key_env: "{{SECRET_VAR}}"});
(async () => {
  await attempt("admin_text_plain", async () => (await fetch(NEXUS + "/admin/backends",
    {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: entry})).type);
  await attempt("admin_json", async () => (await fetch(NEXUS + "/admin/backends",
    {method: "POST", headers: {"Content-Type": "application/json"}, body: entry})).status);
  await attempt("chat_text_plain", async () => (await fetch(NEXUS + "/v1/chat/completions",
    {method: "POST", mode: "no-cors", body: '{"model":"mock-model","messages":[]}'})).type);
  await attempt("history_no_cors", async () => {
    const answer = await fetch(NEXUS + "/v1/history", {mode: "no-cors"});
    return answer.type + ":" + (await answer.text()).length;
  });
  await attempt("history_cors", async () => (await fetch(NEXUS + "/v1/history")).text());
  await attempt("form", () => new Promise((resolve) => {
    const sink = document.createElement("iframe");
    sink.name = "sink";
    document.body.appendChild(sink);
    sink.onload = () => resolve("submitted");
    document.getElementById("form").submit();
  }));
  await attempt("ws", () => new Promise((resolve) => {
    let messages = 0;
    const ws = new WebSocket(NEXUS.replace("http", "ws") + "/ws");
    ws.onmessage = () => { messages += 1; };
    ws.onclose = (event) => resolve("closed " + event.code + " after " + messages + " messages");
  }));
  window.results = results;
})();
</script></body></html>
"""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class HostilePage:
    """Serves the attack page on a second loopback address and records every request to it."""

    def __init__(self, nexus_url: str) -> None:
        self.html = ATTACK.replace("{{NEXUS}}", nexus_url).replace("{{SECRET_VAR}}", SECRET_VAR)
        self.seen: list[Seen] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.2", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.2:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.path, dict(request.headers)))
        if request.path == "/":
            return web.Response(text=self.html, content_type="text/html")
        return web.json_response({"object": "list", "data": [{"id": "caught"}]})


@pytest.fixture(scope="module")
def rebinding_browser(playwright_api: Any) -> Any:  # noqa: F811
    """Chromium that resolves ``rebound.example`` to 127.0.0.1, as a rebound DNS name would."""
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def hostile(loop_thread: LoopThread, nexus: NexusServer) -> Any:
    page = HostilePage(nexus.url)
    loop_thread.run(page.start())
    yield page
    loop_thread.run(page.stop())


@pytest.fixture
def fake(start_fake: Any) -> FakeOpenAI:
    fake: FakeOpenAI = start_fake(FakeOpenAI())
    return fake


@pytest.fixture
def nexus(fake: FakeOpenAI, start_nexus: Any, monkeypatch: pytest.MonkeyPatch) -> NexusServer:
    monkeypatch.setenv(SECRET_VAR, "the-servers-secret-value")
    server: NexusServer = start_nexus(settings_for(("main", fake, "vllm")))
    return server


def assert_unchanged(nexus: NexusServer, fake: FakeOpenAI) -> None:
    assert [b.name for b in nexus.gateway.registry] == ["main"]
    assert fake.calls(CHAT) == [] and fake.calls("/v1/embeddings") == []
    nexus.gateway.telemetry.drain()
    assert nexus.gateway.history.last(100) == []


def test_a_page_from_another_origin_changes_nothing(
    rebinding_browser, nexus, fake, hostile, caplog
):
    caplog.set_level(logging.DEBUG, logger="nexus.api")
    context = rebinding_browser.new_context()
    try:
        page = context.new_page()
        page.goto(hostile.url + "/")
        page.wait_for_function("window.results !== undefined", timeout=WAIT_MS)
        results = page.evaluate("window.results")
    finally:
        context.close()

    # The browser sent what it could, and could read nothing back.
    assert results["admin_text_plain"] == "opaque"
    assert results["chat_text_plain"] == "opaque"
    assert results["admin_json"] == "error: TypeError"  # its preflight was not approved
    assert results["history_no_cors"] == "opaque:0"
    assert results["history_cors"] == "error: TypeError"
    assert results["form"] == "submitted"
    assert results["ws"] == "closed 1006 after 0 messages"

    assert_unchanged(nexus, fake)
    # Nexus never probed the page's origin, so no key of the server went there: the page's
    # server saw only the browser (the page and its icon).
    assert {(s.method, s.path) for s in hostile.seen} <= {("GET", "/"), ("GET", "/favicon.ico")}
    assert not any("authorization" in {k.lower() for k in s.headers} for s in hostile.seen)

    # Nexus saw the attempts and refused them before any handler ran.
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert any("POST /admin/backends" in line for line in refused), refused
    assert sum(f"POST {CHAT}" in line for line in refused) == 2, refused  # fetch and form
    assert any("WebSocket /ws" in line for line in refused), refused


def test_a_rebound_name_reads_nothing(rebinding_browser, nexus, fake):
    origin = f"http://{REBOUND}:{nexus.port}"
    context = rebinding_browser.new_context()
    try:
        page = context.new_page()
        first = page.goto(origin + "/")  # the attacker's name now resolves to Nexus
        assert first is not None and first.status == 421
        # Same origin now, so the page could read whatever Nexus answered.
        answers = page.evaluate(
            """async () => {
                const out = {};
                for (const path of ["/v1/history", "/metrics", "/v1/backends"]) {
                    const answer = await fetch(path);
                    out[path] = [answer.status, await answer.text()];
                }
                out.admin = (await fetch("/admin/backends", {method: "POST",
                    headers: {"Content-Type": "application/json"},
                    body: JSON.stringify({name: "evil", url: "http://127.0.0.2:9", type: "vllm"})
                })).status;
                out.ws = await new Promise((resolve) => {
                    const ws = new WebSocket("ws://" + location.host + "/ws");
                    let messages = 0;
                    ws.onmessage = () => { messages += 1; };
                    ws.onclose = (e) => resolve("closed " + e.code + " after " + messages);
                });
                return out;
            }"""
        )
    finally:
        context.close()
    for path in ("/v1/history", "/metrics", "/v1/backends"):
        status, body = answers[path]
        assert status == 421 and '"code":"invalid_host"' in body, (path, body)
        assert "main" not in body  # nothing of Nexus's state
    assert answers["admin"] == 421
    assert answers["ws"] == "closed 1006 after 0"
    assert_unchanged(nexus, fake)
