"""Secrets out of what Nexus shows, and the client's credentials only to backends the user added."""

from __future__ import annotations

import pytest

from nexus.dispatch import upstream_headers
from nexus.redact import redact_url, scrub, scrub_bytes
from nexus.registry import Backend
from nexus.routing.planner import Step


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:s3cret-pass@host:8000/x", "http://user:***@host:8000/x"),
        ("https://:only-a-password@host", "https://:***@host"),
        ("http://u:p@ss@host", "http://u:***@host"),  # an unescaped @ in the password
        ("http://user@host", "http://user@host"),  # no password: nothing to hide
        ("http://host:8000", "http://host:8000"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_scrub_removes_keys_and_url_passwords_but_not_short_values():
    text = "key sk-abcdef123 rejected at http://bob:hunter2@10.0.0.1:80/v1; id x"
    assert scrub(text, ["sk-abcdef123", "x", None]) == (
        "key *** rejected at http://bob:***@10.0.0.1:80/v1; id x"
    )
    assert scrub("http://host:8000/path and a@b", []) == "http://host:8000/path and a@b"


def test_scrub_bytes_keeps_bytes_it_cannot_decode():
    body = b"\xff\xfe key=sk-abcdef123"
    assert scrub_bytes(body, ["sk-abcdef123"]) == b"\xff\xfe key=***"
    assert scrub_bytes(b"\xff nothing", ["sk-abcdef123"]) == b"\xff nothing"


def test_a_backend_redacts_its_own_key_and_password():
    backend = Backend("b", "http://me:pass-word-1@h:1", "vllm", api_key="sk-abcdef123")
    assert backend.shown_url == "http://me:***@h:1"
    assert backend.redact("bad key sk-abcdef123 for pass-word-1") == "bad key *** for ***"


@pytest.mark.parametrize(
    ("source", "forwarded"), [("static", True), ("manual", True), ("mdns", False), ("probe", False)]
)
def test_the_clients_authorization_goes_only_to_backends_the_user_added(source, forwarded):
    backend = Backend("b", "http://h:1", "vllm", source=source)
    headers = upstream_headers(Step(backend, "m"), {"authorization": "Bearer mine"}, "rid")
    assert headers.get("Authorization") == ("Bearer mine" if forwarded else None)


@pytest.mark.parametrize("source", ["static", "manual", "mdns", "probe"])
def test_a_configured_key_always_wins(source):
    backend = Backend("b", "http://h:1", "openai", api_key="sk-config", source=source)
    headers = upstream_headers(Step(backend, "m"), {"authorization": "Bearer mine"}, "rid")
    assert headers["Authorization"] == "Bearer sk-config"
