"""The live-state commands (``nexus backends|models|health|stats``): the installed console script,
run as a subprocess, against a real Nexus on a loopback port with fake upstreams behind it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeOllama, FakeOpenAI
from tests.harness import settings_for

NEXUS = Path(sys.executable).parent / "nexus"
EMPTY_CACHE = tempfile.mkdtemp(prefix="nexus-test-cache-")
ADMIN_VAR = "CLI_TEST_ADMIN_KEY"
ADMIN_KEY = "admin-secret-4242"


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NEXUS), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(env),
        cwd=cwd,
    )


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without NEXUS_* variables or the admin key, plus ``extra``; a wide
    terminal so that table cells are not cut."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_") and k != ADMIN_VAR}
    env["NEXUS_CACHE_DIR"] = EMPTY_CACHE
    env["COLUMNS"] = "250"
    env.update(extra or {})
    return env


def run_ok(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def cli_json(nexus, *args: str, **kwargs: Any) -> Any:
    return json.loads(run_ok(*args, "--json", "--url", nexus.url, **kwargs).stdout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def without(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in keys}


def chat(client, url: str, model: str) -> None:
    resp = client.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 200, resp.text


@pytest.fixture
def nexus(start_fake, start_nexus):
    fake = start_fake(FakeOpenAI(["alpha-model"], max_model_len=4096))
    return start_nexus(settings_for(("box", fake, "vllm")))


# --- nexus backends list ---------------------------------------------------------------------


def test_backends_list_table_shows_the_backend_healthy(nexus):
    result = run_ok("backends", "list", "--url", nexus.url)
    out = result.stdout
    for column in ("Name", "Type", "Status", "URL", "Models", "In flight", "capacity", "Latency"):
        assert column in out
    row = next(line for line in out.splitlines() if "box" in line)
    assert "vllm" in row
    assert "healthy" in row and "unhealthy" not in row
    assert nexus.gateway.registry.get("box").url in row
    assert "0/100" in row  # in flight / capacity (the default)


def test_backends_list_json_is_the_servers_list(nexus, client):
    listed = cli_json(nexus, "backends", "list")
    server = client.get(f"{nexus.url}/v1/backends").json()
    assert listed["object"] == "list"
    assert [b["name"] for b in listed["data"]] == ["box"]
    assert listed["data"][0]["status"] == "healthy"
    assert listed["data"][0]["models"] == ["alpha-model"]
    # Latencies are measurements and may move between the two reads; the rest is the same.
    volatile = ("latency_ms", "probe_latency_ms", "ttft_ms")
    assert [without(b, *volatile) for b in listed["data"]] == [
        without(b, *volatile) for b in server["data"]
    ]


def test_backends_list_status_filter(start_fake, start_nexus):
    fake = start_fake(FakeOpenAI())
    down = f"http://127.0.0.1:{free_port()}"
    nexus = start_nexus(
        settings_for(
            backends=[
                {"name": "up", "url": fake.url, "type": "vllm"},
                {"name": "down", "url": down, "type": "vllm"},
            ]
        )
    )
    healthy = cli_json(nexus, "backends", "list", "--status", "healthy")
    unhealthy = cli_json(nexus, "backends", "list", "--status", "unhealthy")
    assert [b["name"] for b in healthy["data"]] == ["up"]
    assert [b["name"] for b in unhealthy["data"]] == ["down"]
    table = run_ok("backends", "list", "--status", "unhealthy", "--url", nexus.url).stdout
    assert "down" in table and "up " not in table
    assert "down:" in table  # the reason it is unhealthy is shown under the table
    none = run_ok("backends", "list", "--status", "unknown", "--url", nexus.url).stdout
    assert "No backends are unknown" in none


# --- nexus backends add / remove -------------------------------------------------------------


def test_add_lists_and_serves_then_remove(nexus, start_fake, client):
    second = start_fake(FakeOpenAI(["beta-model"]))
    added = run_ok(
        "backends",
        "add",
        second.url,
        "--name",
        "second",
        "--type",
        "vllm",
        "--priority",
        "7",
        "--tier",
        "2",
        "--max-concurrent",
        "3",
        "--url",
        nexus.url,
    )
    assert "Added backend 'second'" in added.stdout
    assert "healthy" in added.stdout and "1 model(s)" in added.stdout

    listed = {b["name"]: b for b in cli_json(nexus, "backends", "list")["data"]}
    assert set(listed) == {"box", "second"}
    entry = listed["second"]
    assert (entry["type"], entry["priority"], entry["tier"], entry["capacity"]) == (
        "vllm",
        7,
        2,
        3,
    )
    assert entry["source"] == "manual"
    assert entry["status"] == "healthy"
    models = client.get(f"{nexus.url}/v1/models").json()
    assert {m["id"]: m["backends"] for m in models["data"]}["beta-model"] == ["second"]
    chat(client, nexus.url, "beta-model")
    assert second.calls("/v1/chat/completions")

    removed = run_ok("backends", "remove", "second", "--url", nexus.url)
    assert "Removed backend 'second'" in removed.stdout
    assert [b["name"] for b in cli_json(nexus, "backends", "list")["data"]] == ["box"]
    ids = [m["id"] for m in client.get(f"{nexus.url}/v1/models").json()["data"]]
    assert "beta-model" not in ids


def test_add_detects_ollama_and_names_it_host_port(nexus, start_fake):
    ollama = start_fake(FakeOllama(["llama3.2:latest"]))
    result = run_ok("backends", "add", ollama.url, "--url", nexus.url)
    name = f"127.0.0.1:{ollama.port}"
    assert f"'{name}' (ollama)" in result.stdout
    backend = nexus.gateway.registry.get(name)
    assert backend is not None and backend.type == "ollama"
    assert ollama.calls("/api/tags")


def test_add_detects_an_openai_compatible_server_as_generic(nexus, start_fake):
    other = start_fake(FakeOpenAI(["gamma-model"]))
    result = run_ok("backends", "add", other.url + "/v1/", "--name", "gen", "--url", nexus.url)
    assert "'gen' (generic)" in result.stdout
    backend = nexus.gateway.registry.get("gen")
    assert backend is not None
    assert (backend.type, backend.url) == ("generic", other.url)
    assert other.calls("/api/tags") and other.calls("/v1/models")


def test_add_with_nothing_to_detect_adds_generic_with_a_note(nexus):
    down = f"http://127.0.0.1:{free_port()}"
    result = run_ok("backends", "add", down, "--name", "later", "--url", nexus.url)
    assert "could not detect" in result.stderr and "--type" in result.stderr
    assert "'later' (generic)" in result.stdout and "unhealthy" in result.stdout
    assert nexus.gateway.registry.get("later") is not None


def test_add_duplicate_and_remove_unknown_print_the_servers_message(nexus, start_fake):
    other = start_fake(FakeOpenAI())
    dup = run_cli(
        "backends", "add", other.url, "--name", "box", "--type", "vllm", "--url", nexus.url
    )
    assert dup.returncode == 1
    assert "already exists" in dup.stderr and "box" in dup.stderr
    assert "Traceback" not in dup.stderr
    assert len(dup.stderr.strip().splitlines()) == 1

    gone = run_cli("backends", "remove", "nope", "--url", nexus.url)
    assert gone.returncode == 1
    assert "No backend named 'nope'" in gone.stderr
    assert "404" in gone.stderr
    assert "Traceback" not in gone.stderr


def test_add_rejects_a_url_that_is_not_http_before_calling_nexus(nexus):
    result = run_cli("backends", "add", "ftp://box", "--type", "vllm", "--url", nexus.url)
    assert result.returncode == 1
    assert "ftp://box" in result.stderr and "Traceback" not in result.stderr
    assert [b.name for b in nexus.gateway.registry] == ["box"]


# --- nexus models / health / stats -----------------------------------------------------------


def test_models_json_matches_v1_models_and_table_shows_them(nexus, client):
    assert cli_json(nexus, "models") == client.get(f"{nexus.url}/v1/models").json()
    table = run_ok("models", "--url", nexus.url).stdout
    for column in ("Model", "Backends", "Context", "Capabilities"):
        assert column in table
    row = next(line for line in table.splitlines() if "alpha-model" in line)
    assert "box" in row and "4,096" in row


def test_health_json_matches_health_and_table_shows_it(nexus, client):
    from_cli = cli_json(nexus, "health")
    server = client.get(f"{nexus.url}/health").json()
    assert without(from_cli, "uptime_seconds") == without(server, "uptime_seconds")
    assert isinstance(from_cli["uptime_seconds"], int | float)
    table = run_ok("health", "--url", nexus.url).stdout
    assert "healthy" in table
    assert server["version"] in table
    assert "1 healthy, 0 unhealthy, 1 total" in table


def test_stats_json_matches_v1_stats_and_table_shows_rows(nexus, client):
    chat(client, nexus.url, "alpha-model")
    chat(client, nexus.url, "alpha-model")
    from_cli = cli_json(nexus, "stats")
    server = client.get(f"{nexus.url}/v1/stats").json()
    assert without(from_cli, "uptime_seconds") == without(server, "uptime_seconds")
    assert from_cli["requests"]["requests"] == 2
    table = run_ok("stats", "--url", nexus.url).stdout
    assert "2 (2 ok, 0 errors)" in table
    backend_row = next(line for line in table.splitlines() if "box" in line)
    assert "healthy" in backend_row
    model_row = next(line for line in table.splitlines() if "alpha-model" in line)
    assert " 2 " in model_row


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["backends", "list"],
        ["backends", "remove", "x"],
        ["backends", "add", "http://127.0.0.1:9", "--type", "vllm"],
        ["models"],
        ["health", "--json"],
        ["stats"],
    ],
)
def test_unreachable_nexus_is_one_clear_line_and_exit_1(command):
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli(*command, "--url", url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"Error: cannot reach Nexus at {url} (connection refused). "
        "Is `nexus serve` running? Use --url to point elsewhere."
    )


def test_a_url_that_is_not_nexus_is_reported(start_fake):
    other = start_fake(FakeOpenAI())  # answers 404 with a body that is not an OpenAI envelope
    result = run_cli("backends", "list", "--url", other.url)
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr and "is this a Nexus?" in result.stderr
    assert "Traceback" not in result.stderr


def test_url_defaults_to_the_configs_server_address(nexus, tmp_path):
    config = tmp_path / "nexus.toml"
    config.write_text(f"[server]\nhost = '0.0.0.0'\nport = {nexus.port}\n", encoding="utf-8")
    by_flag = run_ok("health", "--json", "-c", str(config))
    assert json.loads(by_flag.stdout)["backends"]["total"] == 1
    by_env = run_ok("health", "--json", env={"NEXUS_CONFIG": str(config)})
    assert json.loads(by_env.stdout)["backends"]["total"] == 1
    by_cwd = run_ok("health", "--json", cwd=tmp_path)  # ./nexus.toml
    assert json.loads(by_cwd.stdout)["backends"]["total"] == 1
    by_port_env = run_ok("health", "--json", env={"NEXUS_PORT": str(nexus.port)}, cwd=Path("/"))
    assert json.loads(by_port_env.stdout)["backends"]["total"] == 1


def test_a_broken_config_is_reported_without_traceback(tmp_path):
    config = tmp_path / "nexus.toml"
    config.write_text("[server]\nprot = 1\n", encoding="utf-8")
    result = run_cli("health", "-c", str(config))
    assert result.returncode == 1
    assert "server.prot" in result.stderr and "Traceback" not in result.stderr


# --- the admin key ---------------------------------------------------------------------------


@pytest.fixture
def keyed(start_fake, start_nexus, monkeypatch, tmp_path):
    """A Nexus whose admin API needs ADMIN_KEY, and a config file naming the variable."""
    monkeypatch.setenv(ADMIN_VAR, ADMIN_KEY)
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("box", fake, "vllm"), server={"admin_key_env": ADMIN_VAR}))
    config = tmp_path / "nexus.toml"
    config.write_text(f"[server]\nadmin_key_env = '{ADMIN_VAR}'\n", encoding="utf-8")
    return nexus, config


def test_admin_key_from_the_config_is_sent_and_accepted(keyed, start_fake):
    nexus, config = keyed
    other = start_fake(FakeOpenAI(["keyed-model"]))
    env = {ADMIN_VAR: ADMIN_KEY}
    args = ("--url", nexus.url, "-c", str(config))
    added = run_ok("backends", "add", other.url, "--name", "k", "--type", "vllm", *args, env=env)
    assert "Added backend 'k'" in added.stdout
    assert nexus.gateway.registry.get("k") is not None
    removed = run_ok("backends", "remove", "k", *args, env=env)
    assert "Removed backend 'k'" in removed.stdout
    assert nexus.gateway.registry.get("k") is None


def test_missing_or_wrong_admin_key_prints_the_401_message(keyed, start_fake):
    nexus, config = keyed
    other = start_fake(FakeOpenAI())
    add = ("backends", "add", other.url, "--name", "k", "--type", "vllm", "--url", nexus.url)
    for env in ({}, {ADMIN_VAR: "wrong-key"}):
        result = run_cli(*add, "-c", str(config), env=env)
        assert result.returncode == 1
        assert "HTTP 401" in result.stderr
        assert "Missing or wrong admin key" in result.stderr
        assert "Traceback" not in result.stderr
    assert nexus.gateway.registry.get("k") is None
