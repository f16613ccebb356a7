"""The guard's decisions on plain ASGI scopes: which Host, Origin and Content-Type pass."""

from __future__ import annotations

import pytest

from nexus.api.guard import Guard
from nexus.config import ConfigError, ServerSettings, settings_from_dict


def scope(method: str = "GET", scheme: str = "http", **headers: str) -> dict[str, object]:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": method, "scheme": scheme, "headers": raw}


def code(guard: Guard, request: dict[str, object]) -> str | None:
    refusal = guard.check(request)
    return None if refusal is None else refusal.code


GUARD = Guard.of(ServerSettings(port=8000, allowed_hosts=["nexus.lan"]))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8000", True),  # the fast path: exact bytes
        ("localhost", True),
        ("LOCALHOST.:9", True),
        ("[::1]:8000", True),
        ("nexus.lan:443", True),
        ("nexus.lan.evil:80", False),
        ("127.0.0.2", False),
        ("[::1", False),
        ("192.168.1.5", False),  # bound to 127.0.0.1: addresses are not all accepted
    ],
)
def test_host(host, allowed):
    assert code(GUARD, scope(host=host)) == (None if allowed else "invalid_host")


def test_on_a_wildcard_bind_any_address_passes_but_not_any_name():
    guard = Guard.of(ServerSettings(host="0.0.0.0"))
    assert code(guard, scope(host="10.1.2.3:8000")) is None
    assert code(guard, scope(host="[fe80::1]")) is None
    assert code(guard, scope(host="gpu-box.lan")) == "invalid_host"


@pytest.mark.parametrize(
    ("origin", "scheme", "allowed"),
    [
        ("http://127.0.0.1:8000", "http", True),
        ("HTTP://127.0.0.1:8000", "http", True),
        ("https://127.0.0.1:8000", "http", False),
        ("http://127.0.0.1:8000", "https", False),
        ("http://127.0.0.1", "http", False),
        ("null", "http", False),
    ],
)
def test_origin_must_be_this_server(origin, scheme, allowed):
    request = scope(
        "POST", scheme, host="127.0.0.1:8000", origin=origin, content_type="application/json"
    )
    assert code(GUARD, request) == (None if allowed else "invalid_origin")


def test_default_ports_are_the_same_origin():
    request = scope(
        "POST", host="localhost", origin="http://localhost:80", content_type="application/json"
    )
    assert code(GUARD, request) is None


def test_reads_need_no_origin_check_or_content_type():
    assert code(GUARD, scope("GET", host="localhost", origin="http://evil.example")) is None


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_state_changing_methods_with_a_body_need_json(method):
    request = scope(method, host="localhost", content_type="text/plain", content_length="2")
    assert code(GUARD, request) == "unsupported_media_type"
    chunked = scope(method, host="localhost", transfer_encoding="chunked")
    assert code(GUARD, chunked) == "unsupported_media_type"


def test_a_bodiless_delete_needs_no_content_type_but_a_bodiless_post_does():
    assert code(GUARD, scope("DELETE", host="localhost")) is None
    assert (
        code(GUARD, scope("POST", host="localhost", content_length="0")) == "unsupported_media_type"
    )


@pytest.mark.parametrize("entry", ["host:80", "a b", "", "http://x", "[::1]:80"])
def test_allowed_hosts_entries_are_names_without_ports(entry):
    with pytest.raises(ConfigError, match="server.allowed_hosts"):
        settings_from_dict({"server": {"allowed_hosts": [entry]}})


def test_allowed_hosts_entries_are_normalised():
    settings = settings_from_dict({"server": {"allowed_hosts": ["Nexus.LAN.", "[FE80::1]", "*"]}})
    assert settings.server.allowed_hosts == ["nexus.lan", "fe80::1", "*"]
