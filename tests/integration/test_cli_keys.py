"""``nexus keys create|list|update|revoke``: the installed console script, run as a subprocess,
against a real Nexus with ``[auth] enabled = true`` and a fake upstream behind it. What the CLI
says is checked against what the key then does on ``/v1/chat/completions``."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from nexus.cli import example_config
from nexus.config import load_settings
from nexus.keys.tokens import hash_of
from tests.fakes import FakeOpenAI
from tests.harness import settings_for, wait_for
from tests.integration.test_cli_live import ADMIN_KEY, ADMIN_VAR, run_cli, run_ok

CHAT = "/v1/chat/completions"
CONFIG_SECRET = "nx-declared-in-the-config-for-the-cli-test-0001"
SECRET = re.compile(r"\bnx-[A-Za-z0-9_-]{43}\b")


@pytest.fixture
def nexus(start_fake, start_nexus):
    """Keys required; one key declared in the config (by hash), one that expired."""
    fake = start_fake(FakeOpenAI(["m", "big"]))
    declared = [
        {"name": "ops", "hash": hash_of(CONFIG_SECRET), "owner": "ops-team", "rpm": 100},
        {"name": "old", "hash": hash_of("nx-old"), "expires_at": "2020-01-01T00:00:00Z"},
    ]
    return start_nexus(
        settings_for(("box", fake, "vllm"), auth={"enabled": True, "keys": declared})
    )


def keys(nexus: Any, *args: str, cwd: Path, **kwargs: Any):
    """``nexus keys ARGS --url NEXUS``, run where no nexus.toml is."""
    return run_cli("keys", *args, "--url", nexus.url, cwd=cwd, **kwargs)


def keys_ok(nexus: Any, *args: str, cwd: Path, **kwargs: Any) -> str:
    result = run_ok("keys", *args, "--url", nexus.url, cwd=cwd, **kwargs)
    return result.stdout


def keys_json(nexus: Any, *args: str, cwd: Path) -> Any:
    return json.loads(keys_ok(nexus, *args, "--json", cwd=cwd))


def chat(client: Any, nexus: Any, key: str, model: str = "m") -> Any:
    return client.post(
        nexus.url + CHAT,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )


def server_view(client: Any, nexus: Any, name: str) -> dict[str, Any]:
    resp = client.get(f"{nexus.url}/admin/keys/{name}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def secret_in(stdout: str) -> str:
    found = SECRET.findall(stdout)
    assert len(found) == 1, stdout
    return str(found[0])


def table_rows(table: str) -> dict[str, str]:
    """Each row of a printed table by its first cell (Unicode or ASCII borders)."""
    rows = {}
    for line in table.splitlines():
        cells = re.split(r"[│|]", line)
        if len(cells) > 2 and cells[1].strip():
            rows[cells[1].strip()] = line
    return rows


def test_create_prints_a_working_key_once_with_its_settings(nexus, client, tmp_path):
    out = keys_ok(
        nexus,
        "create",
        "alice",
        "--owner",
        "alice@lab",
        "--models",
        "m*,other",
        "--models",
        "third",
        "--rpm",
        "5",
        "--max-concurrent",
        "2",
        "--monthly-budget-usd",
        "12.5",
        cwd=tmp_path,
    )
    secret = secret_in(out)
    assert "shown once" in out
    assert "Created key 'alice'" in out and "owner alice@lab" in out and "5 rpm" in out
    view = server_view(client, nexus, "alice")
    assert view["prefix"] == secret[:8]
    assert (view["owner"], view["models"], view["rpm"]) == (
        "alice@lab",
        ["m*", "other", "third"],
        5,
    )
    assert (view["max_concurrent"], view["monthly_budget_usd"], view["tpm"]) == (2, 12.5, None)
    resp = chat(client, nexus, secret)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ratelimit-limit-requests"] == "5"
    refused = chat(client, nexus, secret, "big")  # outside its globs
    assert refused.status_code == 403 and "m*" in refused.json()["error"]["message"]


def test_create_json_is_the_whole_answer_and_the_key_in_it_works(nexus, client, tmp_path):
    made = keys_json(
        nexus,
        "create",
        "ci",
        "--tpm",
        "1000",
        "--expires-at",
        "2999-01-01T02:00:00+02:00",
        cwd=tmp_path,
    )
    assert made["name"] == "ci" and made["tpm"] == 1000 and made["source"] == "api"
    assert made["key"].startswith("nx-") and made["prefix"] == made["key"][:8]
    expires = datetime.fromisoformat(made["expires_at"])
    assert expires == datetime(2999, 1, 1, tzinfo=UTC)  # the instant given, offset and all
    resp = chat(client, nexus, made["key"])
    assert resp.status_code == 200 and resp.headers["x-ratelimit-limit-tokens"] == "1000"


def test_list_shows_settings_state_and_usage_but_never_a_secret(nexus, client, tmp_path):
    alice = secret_in(
        keys_ok(
            nexus,
            "create",
            "alice",
            "--owner",
            "alice@lab",
            "--rpm",
            "50",
            "--monthly-budget-usd",
            "5",
            cwd=tmp_path,
        )
    )
    gone = secret_in(keys_ok(nexus, "create", "gone", cwd=tmp_path))
    keys_ok(nexus, "revoke", "gone", cwd=tmp_path)
    assert chat(client, nexus, alice).status_code == 200
    assert chat(client, nexus, CONFIG_SECRET).status_code == 200
    assert wait_for(lambda: server_view(client, nexus, "alice")["usage"]["requests"] == 1)

    result = run_ok("keys", "list", "--url", nexus.url, cwd=tmp_path)
    table = result.stdout
    for column in (
        "Name",
        "Prefix",
        "Owner",
        "Models",
        "Zone",
        "Limits",
        "budget",
        "Usage",
        "Expires",
        "State",
        "Source",
    ):
        assert column in table, column
    rows = table_rows(table)
    assert f"{alice[:8]}..." in rows["alice"]
    assert "alice@lab" in rows["alice"] and "50 rpm" in rows["alice"]
    assert "1 req, 7 tok" in rows["alice"] and "of $5.00" in rows["alice"]
    assert "active" in rows["alice"] and "never" in rows["alice"]
    assert "revoked" in rows["gone"]
    assert "expired" in rows["old"] and "2020-01-01" in rows["old"]
    assert "config" in rows["ops"] and "ops-team" in rows["ops"] and "100 rpm" in rows["ops"]
    listed = keys_json(nexus, "list", cwd=tmp_path)
    by_name = {k["name"]: k for k in listed["data"]}
    assert set(by_name) == {"alice", "gone", "ops", "old"}
    assert by_name["alice"]["usage"]["requests"] == 1
    assert by_name["gone"]["revoked_at"] is not None
    everything = table + result.stderr + json.dumps(listed)
    for secret in (alice, gone, CONFIG_SECRET):
        assert secret not in everything
    assert all("key" not in entry for entry in listed["data"])


def test_list_says_when_there_are_no_keys(start_fake, start_nexus, tmp_path):
    fake = start_fake(FakeOpenAI(["m"]))
    nexus = start_nexus(settings_for(("box", fake, "vllm"), auth={"enabled": True}))
    assert "No keys" in keys_ok(nexus, "list", cwd=tmp_path)
    assert keys_json(nexus, "list", cwd=tmp_path)["data"] == []


def test_update_changes_only_the_given_settings_and_none_clears(nexus, client, tmp_path):
    secret = secret_in(
        keys_ok(
            nexus,
            "create",
            "bob",
            "--owner",
            "bob",
            "--rpm",
            "5",
            "--tpm",
            "1000",
            "--models",
            "m",
            cwd=tmp_path,
        )
    )
    out = keys_ok(nexus, "update", "bob", "--rpm", "2", cwd=tmp_path)
    assert "Updated key 'bob'" in out and "2 rpm" in out
    view = server_view(client, nexus, "bob")
    assert (view["rpm"], view["tpm"], view["owner"], view["models"]) == (2, 1000, "bob", ["m"])
    first = chat(client, nexus, secret)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert chat(client, nexus, secret).status_code == 200
    assert chat(client, nexus, secret).status_code == 429  # the new limit holds

    updated = keys_json(
        nexus,
        "update",
        "bob",
        "--tpm",
        "none",
        "--models",
        "NONE",
        "--max-zone",
        "restricted",
        cwd=tmp_path,
    )
    assert (updated["tpm"], updated["models"], updated["max_zone"], updated["rpm"]) == (
        None,
        None,
        "restricted",
        2,
    )
    assert server_view(client, nexus, "bob")["tpm"] is None
    keys_ok(nexus, "update", "bob", "--rpm", "none", cwd=tmp_path)
    resp = chat(client, nexus, secret, "big")  # every model now; no rate limit left
    assert resp.status_code == 200, resp.text
    assert "x-ratelimit-limit-requests" not in resp.headers
    assert "x-ratelimit-limit-tokens" not in resp.headers


def test_revoke_makes_the_key_get_401(nexus, client, tmp_path):
    secret = secret_in(keys_ok(nexus, "create", "carol", cwd=tmp_path))
    assert chat(client, nexus, secret).status_code == 200
    out = keys_ok(nexus, "revoke", "carol", cwd=tmp_path)
    assert "Revoked key 'carol'" in out
    resp = chat(client, nexus, secret)
    assert resp.status_code == 401 and "revoked" in resp.json()["error"]["message"]
    again = keys_json(nexus, "revoke", "carol", cwd=tmp_path)  # revoking twice is harmless
    assert again["revoked"] is True and again["revoked_at"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--rpm", "abc"), "'--rpm': 'abc' is not a whole number"),
        (("--rpm", "0"), "'--rpm': '0' is not a whole number of 1 or more"),
        (("--tpm", "1.5"), "'--tpm'"),
        (("--max-concurrent", "-3"), "'--max-concurrent'"),
        (("--monthly-budget-usd", "-1"), "'--monthly-budget-usd': '-1' is not an amount"),
        (("--monthly-budget-usd", "lots"), "'--monthly-budget-usd'"),
        (("--expires-at", "2027-01-01T00:00:00"), "RFC 3339 time with its offset"),
        (("--expires-at", "next week"), "'--expires-at'"),
        (("--max-zone", "cloud"), "'--max-zone'"),
        (("--models", "a,,b"), "'--models'"),
        (("--owner", ""), "'--owner'"),
    ],
)
def test_a_bad_flag_value_is_a_clear_error_and_creates_nothing(
    nexus, client, tmp_path, args, needle
):
    result = keys(nexus, "create", "dave", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert client.get(f"{nexus.url}/admin/keys/dave").status_code == 404


def test_what_the_server_refuses_is_one_line_and_exit_1(nexus, client, tmp_path):
    keys_ok(nexus, "create", "erin", cwd=tmp_path)
    cases = [
        (("create", "erin"), "a key named 'erin' already exists (HTTP 409"),
        (("create", "bad name!"), "HTTP 400 for POST /admin/keys"),
        (("create", "frank", "--rpm", "99999999999"), "rpm: "),
        (("update", "ops", "--rpm", "1"), "declared in the config file"),
        (("update", "ghost", "--rpm", "1"), "No key named 'ghost' (HTTP 404 for PATCH"),
        (("revoke", "ghost"), "No key named 'ghost' (HTTP 404 for DELETE /admin/keys/ghost)"),
    ]
    for args, needle in cases:
        result = keys(nexus, *args, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout)
        assert result.stderr.startswith("Error: ") and needle in result.stderr, (
            args,
            result.stderr,
        )
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert client.get(f"{nexus.url}/admin/keys/frank").status_code == 404
    assert server_view(client, nexus, "ops")["rpm"] == 100


def test_update_without_a_setting_is_a_usage_error(nexus, tmp_path):
    result = keys(nexus, "update", "ops", cwd=tmp_path)
    assert result.returncode == 2
    assert "nothing to change" in result.stderr and "--monthly-budget-usd" in result.stderr


def test_the_admin_key_from_the_config_is_sent(start_fake, start_nexus, monkeypatch, tmp_path):
    monkeypatch.setenv(ADMIN_VAR, ADMIN_KEY)
    fake = start_fake(FakeOpenAI(["m"]))
    server = {"admin_key_env": ADMIN_VAR}
    nexus = start_nexus(settings_for(("box", fake, "vllm"), server=server, auth={"enabled": True}))
    config = tmp_path / "nexus.toml"
    config.write_text(f"[server]\nadmin_key_env = '{ADMIN_VAR}'\n", encoding="utf-8")
    refused = keys(nexus, "create", "gina", "-c", str(config), cwd=tmp_path)
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    made = keys(
        nexus, "create", "gina", "-c", str(config), cwd=tmp_path, env={ADMIN_VAR: ADMIN_KEY}
    )
    assert made.returncode == 0, made.stderr
    assert ADMIN_KEY not in made.stdout + made.stderr
    assert "gina" in keys_ok(
        nexus, "list", "-c", str(config), cwd=tmp_path, env={ADMIN_VAR: ADMIN_KEY}
    )


def test_the_example_configs_auth_keys_entry_loads_once_uncommented(tmp_path):
    """`nexus config init`'s `[[auth.keys]]` example, uncommented with the hash that the documented
    `printf %s "$KEY" | sha256sum` gives, is a valid entry; its hash is the one Nexus computes."""
    secret = "nx-a-key-for-the-example-config-test-000000000"
    shell = subprocess.run(
        ["sh", "-c", 'printf %s "$KEY" | sha256sum'],
        capture_output=True,
        text=True,
        env={"KEY": secret, "PATH": "/usr/bin:/bin"},
        check=True,
    )
    digest = "sha256:" + shell.stdout.split()[0]
    assert digest == hash_of(secret)
    lines = example_config().splitlines()
    start = lines.index("# [[auth.keys]]")
    entry = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        entry.append(line[2:].replace("sha256:<64 hex digits>", digest))
    text = "[auth]\nenabled = true\n" + "\n".join(entry) + "\n"
    settings = load_settings(write(tmp_path, text), environ={})
    (key,) = settings.auth.keys
    assert (key.name, key.hash, key.max_zone, key.rpm) == ("ci", hash_of(secret), "restricted", 60)
    assert key.models == ["llama3*", "qwen2.5*"] and key.monthly_budget_usd == 20.0
    assert key.expires_at is not None and key.tpm == 100000 and key.max_concurrent == 4
    assert "[auth]\nenabled = false" in example_config()  # off unless asked for


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(text, encoding="utf-8")
    return path
