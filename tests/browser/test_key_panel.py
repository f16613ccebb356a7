"""The dashboard's Keys panel (issue 12): each client key's month (requests, tokens, cost against
its budget, its limits and calls in flight), live over the WebSocket, at desktop and phone width,
in headless Debian Chromium. It stays hidden while there are no keys, and shows no secret."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser import test_dashboard as dashboard
from tests.browser.test_dashboard import WAIT_MS, screenshot, watch
from tests.fakes import FakeOpenAI
from tests.harness import NexusServer, settings_for

# The dashboard tests' Chromium fixtures, shared by name (skipped with them without Chromium).
playwright_api = dashboard.playwright_api
browser = dashboard.browser
expect = dashboard.expect

KEY_VAR = "KEY_PANEL_TEST_OPENAI_KEY"
# FakeOpenAI's answer: 5 prompt and 2 completion tokens, $0.009 at these prices
PRICING = [{"model_pattern": "*", "input_per_mtok": 1000, "output_per_mtok": 2000}]


def chat(client: Any, nexus: NexusServer, secret: str, request_id: str, model: str = "m") -> int:
    headers = {"Authorization": f"Bearer {secret}", "X-Request-Id": request_id}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    return int(
        client.post(nexus.url + "/v1/chat/completions", json=body, headers=headers).status_code
    )


def create(client: Any, nexus: NexusServer, **settings: Any) -> str:
    resp = client.post(nexus.url + "/admin/keys", json=settings)
    assert resp.status_code == 201, resp.text
    secret: str = resp.json()["key"]
    return secret


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch, start_fake: Any, start_nexus: Any) -> NexusServer:
    monkeypatch.setenv(KEY_VAR, "sk-panel")
    cloud = start_fake(FakeOpenAI(["m"]))
    backend = {"name": "cloud", "url": cloud.url, "type": "openai", "api_key_env": KEY_VAR}
    nexus: NexusServer = start_nexus(
        settings_for(backends=[backend], pricing=PRICING, auth={"enabled": True})
    )
    return nexus


def no_overflow(page: Any) -> None:
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page is {overflow}px wider than its viewport"


def test_the_keys_panel_shows_each_keys_month_as_it_happens(browser, expect, keyed, client):
    nexus = keyed
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
    try:
        page = context.new_page()
        errors = watch(page)
        page.goto(nexus.url + "/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        panel = page.locator("#keys")
        expect(panel).to_be_hidden()  # no keys yet: nothing to show

        alice = create(
            client, nexus, name="alice", owner="alice@lab", rpm=60, tpm=10000, max_concurrent=4,
            monthly_budget_usd=0.1,
        )  # fmt: skip
        bob = create(client, nexus, name="bob")
        expect(panel).to_be_visible(timeout=WAIT_MS)
        row = panel.locator('tr[data-key="alice"]')
        expect(row.locator(".requests")).to_have_text("0", timeout=WAIT_MS)
        expect(row.locator(".spent")).to_have_text("$0.00")
        expect(row.locator(".about")).to_have_text(f"{alice[:8]}…")
        expect(row.locator(".limits")).to_have_text("60 rpm · 10,000 tpm · 0 / 4 in flight")
        expect(row.locator(".budget")).to_have_text("of $0.100")

        assert chat(client, nexus, alice, "k-1") == 200
        assert chat(client, nexus, alice, "k-2") == 200
        assert chat(client, nexus, bob, "k-3") == 200
        expect(row.locator(".requests")).to_have_text("2", timeout=WAIT_MS)
        expect(row.locator(".total")).to_have_text("14")
        expect(row.locator(".split")).to_have_text("10 + 4")
        expect(row.locator(".spent")).to_have_text("$0.0180")
        expect(row.locator('[role="meter"]')).to_have_attribute("aria-valuenow", "18.0")
        bob_row = panel.locator('tr[data-key="bob"]')
        expect(bob_row.locator(".requests")).to_have_text("1")
        expect(bob_row.locator(".limits")).to_have_text("0 in flight")  # no limits
        assert bob_row.locator('[role="meter"]').count() == 0  # no budget, no bar
        # the feed says which key each request came with
        feed_row = page.locator('#feed-rows tr[data-request-id="k-3"]')
        expect(feed_row).to_contain_text("key bob", timeout=WAIT_MS)

        assert client.delete(nexus.url + "/admin/keys/bob").status_code == 200
        expect(bob_row).to_have_attribute("data-status", "revoked", timeout=WAIT_MS)
        expect(bob_row.locator(".about")).to_contain_text("revoked")
        expect(bob_row.locator(".requests")).to_have_text("1")  # its month still counts
        screenshot(page, "dashboard-keys.png")

        content = page.content()
        assert alice not in content and bob not in content
        assert "alice@lab" not in content  # owners stay in the admin API
        no_overflow(page)
        assert errors == []
    finally:
        context.close()


def test_the_keys_panel_fits_a_phone(browser, expect, keyed, client):
    nexus = keyed
    name = "a-key-with-a-rather-long-name-" + "k" * 34  # 64 characters, the longest allowed
    secret = create(
        client, nexus, name=name, owner="someone with a long owner string " * 4,
        rpm=10_000_000, tpm=10_000_000_000, max_concurrent=100_000, monthly_budget_usd=1000,
    )  # fmt: skip
    for index in range(3):
        assert chat(client, nexus, secret, f"p-{index}") == 200
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
        row = page.locator(f'#keys tr[data-key="{name}"]')
        expect(row.locator(".requests")).to_have_text("3", timeout=WAIT_MS)
        expect(row.locator(".spent")).to_have_text("$0.0270")
        expect(row.locator(".name")).to_have_text(name)
        expect(row.locator(".limits")).to_be_visible()
        no_overflow(page)
        screenshot(page, "dashboard-keys-phone-dark.png")
        assert secret not in page.content()
        assert errors == []
    finally:
        context.close()
