"""The admin API (``POST /admin/backends``, ``DELETE /admin/backends/{name}``) at the HTTP level:
validation, the loopback rule and the admin key.

A caller on another machine is simulated without sending traffic anywhere: the running app is
called in-process through ``httpx2.ASGITransport`` with a non-loopback client address, on the
loop that serves it (the gateway's state belongs to that loop)."""

from __future__ import annotations

import socket
from typing import Any

import httpx2
import pytest

from tests.fakes import FakeOpenAI
from tests.harness import NexusServer, settings_for

ADMIN_VAR = "NEXUS_TEST_ADMIN_API_KEY"
ADMIN_KEY = "s3cret-admin-key"
REMOTE = ("203.0.113.5", 1234)  # TEST-NET-3: documentation only, never routed


def error_of(resp: httpx2.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = resp.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def in_process(
    nexus: NexusServer, method: str, path: str, client: tuple[str, int] = REMOTE, **kwargs: Any
) -> httpx2.Response:
    """Call the running app directly, as ``client``; nothing goes over the network."""

    async def call() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=nexus.app, client=client)
        async with httpx2.AsyncClient(transport=transport, base_url="http://localhost") as http:
            resp = await http.request(method, path, **kwargs)
            await resp.aread()
            return resp

    return nexus.loop.run(call())


@pytest.fixture
def fake(start_fake):
    return start_fake(FakeOpenAI(["extra-model"]))


@pytest.fixture
def nexus(start_fake, start_nexus):
    box = start_fake(FakeOpenAI(["box-model"]))
    return start_nexus(settings_for(("box", box, "vllm")))


@pytest.fixture
def keyed(start_fake, start_nexus, monkeypatch):
    monkeypatch.setenv(ADMIN_VAR, ADMIN_KEY)
    box = start_fake(FakeOpenAI(["box-model"]))
    return start_nexus(settings_for(("box", box, "vllm"), server={"admin_key_env": ADMIN_VAR}))


def names(client, nexus) -> list[str]:
    return [b["name"] for b in client.get(f"{nexus.url}/v1/backends").json()["data"]]


# --- from loopback, no key configured -------------------------------------------------------


def test_add_and_remove_from_loopback_without_a_key(nexus, fake, client):
    entry = {
        "name": "extra",
        "url": fake.url + "/v1",
        "type": "vllm",
        "priority": 5,
        "zone": "open",
        "tier": 3,
        "max_concurrent": 4,
    }
    resp = client.post(f"{nexus.url}/admin/backends", json=entry)
    assert resp.status_code == 201, resp.text
    view = resp.json()
    assert view["name"] == "extra"
    assert view["url"] == fake.url  # normalised: no /v1
    assert (view["type"], view["priority"], view["zone"], view["tier"]) == ("vllm", 5, "open", 3)
    assert view["capacity"] == 4
    assert view["source"] == "manual"
    assert view["status"] == "healthy"  # probed before the answer
    assert view["models"] == ["extra-model"]
    assert names(client, nexus) == ["box", "extra"]
    models = client.get(f"{nexus.url}/v1/models").json()["data"]
    assert "extra-model" in [m["id"] for m in models]

    resp = client.delete(f"{nexus.url}/admin/backends/extra")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"removed": "extra"}
    assert names(client, nexus) == ["box"]
    models = client.get(f"{nexus.url}/v1/models").json()["data"]
    assert "extra-model" not in [m["id"] for m in models]


def test_an_added_backend_that_is_down_is_listed_unhealthy(nexus, client):
    # A port from a socket that is bound but never listens: nothing answers there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        resp = client.post(
            f"{nexus.url}/admin/backends", json={"name": "down", "url": url, "type": "vllm"}
        )
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "unhealthy"
    assert resp.json()["last_error"]


def test_duplicate_name_is_400(nexus, fake, client):
    resp = client.post(
        f"{nexus.url}/admin/backends", json={"name": "box", "url": fake.url, "type": "vllm"}
    )
    error = error_of(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert "box" in error["message"] and "already exists" in error["message"]
    assert error["param"] == "name"
    assert names(client, nexus) == ["box"]


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        ({"name": "x", "url": "ftp://somewhere", "type": "vllm"}, ["url", "ftp://somewhere"]),
        ({"name": "x", "url": "not a url", "type": "vllm"}, ["url"]),
        ({"name": "x", "url": "http://127.0.0.1:9", "type": "tgi"}, ["type", "tgi"]),
        (
            {"name": "x", "url": "http://127.0.0.1:9", "type": "vllm", "priorty": 1},
            ["priorty", "unknown key", "priority"],
        ),
        ({"name": "x", "type": "vllm"}, ["url"]),
        ({"url": "http://127.0.0.1:9", "type": "vllm"}, ["name", "missing"]),
        ({"name": "x", "url": "http://127.0.0.1:9", "type": "vllm", "tier": 9}, ["tier"]),
        # names go into response headers: no control characters, bounded
        ({"name": "bad\r\nX-Evil: 1", "url": "http://127.0.0.1:9", "type": "vllm"}, ["name"]),
        ({"name": "n" * 65, "url": "http://127.0.0.1:9", "type": "vllm"}, ["64"]),
        (
            {
                "name": "x",
                "type": "llamacpp",
                "managed": {"model": "/models/m.gguf"},
            },
            ["managed"],
        ),
    ],
)
def test_invalid_entries_are_400_envelopes_naming_the_problem(nexus, client, entry, needles):
    resp = client.post(f"{nexus.url}/admin/backends", json=entry)
    error = error_of(resp, 400)
    assert error["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in error["message"], error["message"]
    assert "invalid configuration" not in error["message"]  # the config-file preamble is cut
    assert names(client, nexus) == ["box"]


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]"])
def test_a_body_that_is_not_a_json_object_is_400(nexus, client, body):
    resp = client.post(
        f"{nexus.url}/admin/backends", content=body, headers={"content-type": "application/json"}
    )
    error_of(resp, 400)


def test_removing_an_unknown_name_is_404(nexus, client):
    error = error_of(client.delete(f"{nexus.url}/admin/backends/nope"), 404)
    assert "nope" in error["message"]
    assert error["code"] == "not_found"
    assert names(client, nexus) == ["box"]


def test_wrong_methods_are_405(nexus, client):
    error_of(client.get(f"{nexus.url}/admin/backends"), 405)
    error_of(client.post(f"{nexus.url}/v1/backends", json={}), 405)


# --- with an admin key configured -------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong-key"), {"Authorization": "Bearer"}, {"Authorization": ADMIN_KEY + "x"}],
    ids=["none", "wrong", "empty", "no-bearer-wrong"],
)
def test_missing_or_wrong_key_is_401(keyed, fake, client, headers):
    entry = {"name": "extra", "url": fake.url, "type": "vllm"}
    error = error_of(client.post(f"{keyed.url}/admin/backends", json=entry, headers=headers), 401)
    assert error["type"] == "authentication_error"
    assert "admin key" in error["message"]
    error = error_of(client.delete(f"{keyed.url}/admin/backends/box", headers=headers), 401)
    assert error["type"] == "authentication_error"
    assert names(client, keyed) == ["box"]
    assert not fake.requests  # nothing was probed


def test_right_key_adds_and_removes(keyed, fake, client):
    entry = {"name": "extra", "url": fake.url, "type": "vllm"}
    resp = client.post(f"{keyed.url}/admin/backends", json=entry, headers=bearer(ADMIN_KEY))
    assert resp.status_code == 201, resp.text
    assert names(client, keyed) == ["box", "extra"]
    resp = client.delete(f"{keyed.url}/admin/backends/extra", headers=bearer(ADMIN_KEY))
    assert resp.status_code == 200, resp.text
    assert names(client, keyed) == ["box"]


def test_the_key_is_checked_before_the_body(keyed, client):
    resp = client.post(
        f"{keyed.url}/admin/backends",
        content=b"not json",
        headers={"Content-Type": "application/json"},
    )
    error_of(resp, 401)


def test_reading_stays_open_with_a_key_configured(keyed, client):
    resp = client.get(f"{keyed.url}/v1/backends")
    assert resp.status_code == 200
    assert [b["name"] for b in resp.json()["data"]] == ["box"]


# --- callers that are not on loopback (in-process, no network) ------------------------------


def test_in_process_loopback_caller_is_accepted(nexus, fake, client):
    # The in-process path itself works: the same call from 127.0.0.1 succeeds.
    entry = {"name": "extra", "url": fake.url, "type": "vllm"}
    resp = in_process(nexus, "POST", "/admin/backends", client=("127.0.0.1", 5555), json=entry)
    assert resp.status_code == 201, resp.text
    resp = in_process(nexus, "DELETE", "/admin/backends/extra", client=("::1", 5555))
    assert resp.status_code == 200, resp.text
    assert names(client, nexus) == ["box"]


def test_non_loopback_caller_is_403_without_a_key(nexus, fake, client):
    entry = {"name": "extra", "url": fake.url, "type": "vllm"}
    error = error_of(in_process(nexus, "POST", "/admin/backends", json=entry), 403)
    assert error["type"] == "permission_error"
    assert "loopback" in error["message"] and "admin_key_env" in error["message"]
    error_of(in_process(nexus, "DELETE", "/admin/backends/box"), 403)
    # Even a bearer token does not help when no key is configured.
    error_of(in_process(nexus, "DELETE", "/admin/backends/box", headers=bearer("x")), 403)
    assert names(client, nexus) == ["box"]
    assert not fake.requests
    # Reading is open to everyone.
    resp = in_process(nexus, "GET", "/v1/backends")
    assert resp.status_code == 200
    assert [b["name"] for b in resp.json()["data"]] == ["box"]


def test_non_loopback_caller_with_the_right_key_is_accepted(keyed, fake, client):
    entry = {"name": "extra", "url": fake.url, "type": "vllm"}
    error_of(in_process(keyed, "POST", "/admin/backends", json=entry), 401)
    error_of(in_process(keyed, "POST", "/admin/backends", json=entry, headers=bearer("no")), 401)
    resp = in_process(keyed, "POST", "/admin/backends", json=entry, headers=bearer(ADMIN_KEY))
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "healthy"
    assert names(client, keyed) == ["box", "extra"]
    resp = in_process(keyed, "DELETE", "/admin/backends/extra", headers=bearer(ADMIN_KEY))
    assert resp.status_code == 200, resp.text
    assert names(client, keyed) == ["box"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("::1a:2b", False),
        ("203.0.113.5", False),
        ("10.0.0.1", False),
        ("", False),
        ("not-an-address", False),
    ],
)
def test_only_real_loopback_addresses_count_as_loopback(host, loopback):
    from nexus.api.backends import is_loopback

    assert is_loopback(host) is loopback
