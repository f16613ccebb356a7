"""The installed ``nexus`` console script, run as a subprocess, and the settings precedence."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from nexus import __version__
from nexus.config import ConfigError, load_settings
from tests.fakes import FakeOpenAI, Reply, completion

NEXUS = Path(sys.executable).parent / "nexus"
START_DEADLINE = 30.0
EXIT_DEADLINE = 15.0
EMPTY_CACHE = tempfile.mkdtemp(prefix="nexus-test-cache-")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NEXUS), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(env),
    )


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any NEXUS_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_CACHE_DIR"] = EMPTY_CACHE  # no embedded default from the machine's cache
    env.update(extra or {})
    return env


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unused_url() -> str:
    """A loopback URL nothing listens on (a backend that is down)."""
    return f"http://127.0.0.1:{free_port()}"


# --- --version, config init, config check ----------------------------------------------------


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert "nexus" in result.stdout
    assert __version__ in result.stdout


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout and "config" in result.stdout


def test_config_init_writes_a_file_that_check_accepts(tmp_path):
    target = tmp_path / "nexus.toml"
    result = run_cli("config", "init", "-o", str(target))
    assert result.returncode == 0, result.stderr
    assert target.exists()
    text = target.read_text(encoding="utf-8")
    assert "[[backends]]" in text
    check = run_cli("config", "check", str(target))
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout
    assert "backend(s)" in check.stdout


def test_config_init_commented_backends_are_valid_when_uncommented(tmp_path):
    """The commented examples in `nexus config init` (the cloud ones among them) work as written
    once their `#` is removed."""
    target = tmp_path / "nexus.toml"
    assert run_cli("config", "init", "-o", str(target)).returncode == 0
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in target.read_text(encoding="utf-8").splitlines():
        if line == "# [[backends]]":
            current = []
            blocks.append(current)
        elif current is not None and (" = " in line or line.startswith("# [backends.")):
            current.append(line[2:])
        else:
            current = None  # anything else ends the example being read
    wanted = [block for block in blocks if any("type = " in line for line in block)]
    types = {line.split("=")[1].strip().strip('"') for b in wanted for line in b if "type" in line}
    assert {"openai", "anthropic", "google"} <= types
    cloud = "".join("\n[[backends]]\n" + "\n".join(block) + "\n" for block in wanted)
    cloud_only = write(tmp_path / "cloud.toml", "[embedded]\nenabled = false\n" + cloud)
    settings = load_settings(cloud_only)
    by_type = {backend.type: backend for backend in settings.backends}
    assert by_type["anthropic"].url == "https://api.anthropic.com"
    assert by_type["google"].url == "https://generativelanguage.googleapis.com"
    assert by_type["anthropic"].api_key_env == "ANTHROPIC_API_KEY"


def test_config_init_refuses_to_overwrite_without_force(tmp_path):
    target = write(tmp_path / "nexus.toml", "# my precious config\n")
    result = run_cli("config", "init", "-o", str(target))
    assert result.returncode != 0
    assert "--force" in result.stderr
    assert target.read_text(encoding="utf-8") == "# my precious config\n"

    forced = run_cli("config", "init", "-o", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "[[backends]]" in target.read_text(encoding="utf-8")
    assert run_cli("config", "check", str(target)).returncode == 0


def test_config_check_missing_file_fails(tmp_path):
    result = run_cli("config", "check", str(tmp_path / "absent.toml"))
    assert result.returncode != 0
    assert "absent.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_invalid_toml_fails(tmp_path):
    path = write(tmp_path / "bad.toml", "[server\nport = 1\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode != 0
    assert "invalid TOML" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("[server]\nprot = 8000\n", "server.prot", "port"),
        (
            "[health_check]\nfailure_treshold = 2\n",
            "health_check.failure_treshold",
            "failure_threshold",
        ),
        ("[routing]\nstrategi = 'smart'\n", "routing.strategi", "strategy"),
        (
            "[[backends]]\nname = 'box'\nurl = 'http://127.0.0.1:1'\ntype = 'vllm'\npriorty = 3\n",
            "priorty",
            "priority",
        ),
    ],
)
def test_config_check_unknown_key_names_it_with_did_you_mean(tmp_path, text, key, suggestion):
    path = write(tmp_path / "nexus.toml", text)
    result = run_cli("config", "check", str(path))
    assert result.returncode != 0
    assert key in result.stderr
    assert "unknown key" in result.stderr
    assert f"did you mean '{suggestion}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_unknown_section_names_it(tmp_path):
    path = write(tmp_path / "nexus.toml", "[sever]\nport = 1\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode != 0
    assert "sever" in result.stderr
    assert "did you mean 'server'" in result.stderr


BACKEND = "[[backends]]\nname = 'box'\nurl = 'http://127.0.0.1:1'\n"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (BACKEND + "type = 'vllm'\nzone = 'public'\n", "zone"),
        (BACKEND + "type = 'tgi'\n", "type"),
        (BACKEND + "type = 'vllm'\ntier = 9\n", "tier"),
        ("[[backends]]\nname = 'box'\nurl = 'ftp://x'\ntype = 'vllm'\n", "url"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[logging]\nlevel = 'loud'\n", "logging.level"),
        ("[routing]\nstrategy = 'fastest'\n", "routing.strategy"),
    ],
)
def test_config_check_invalid_values_are_rejected(tmp_path, text, needle):
    path = write(tmp_path / "nexus.toml", text)
    result = run_cli("config", "check", str(path))
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_names_the_backend_with_a_bad_value(tmp_path):
    path = write(tmp_path / "nexus.toml", BACKEND + "type = 'vllm'\nzone = 'public'\n")
    result = run_cli("config", "check", str(path))
    assert "backends[0] (box).zone" in result.stderr
    assert "public" in result.stderr


def test_config_check_accepts_case_and_llama_cpp_spelling(tmp_path):
    path = write(
        tmp_path / "nexus.toml",
        "[[backends]]\nname = 'box'\nurl = 'http://127.0.0.1:1/v1'\ntype = 'llama.cpp'\n"
        "zone = 'Open'\n",
    )
    result = run_cli("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    settings = load_settings(path, environ={})
    assert settings.backends[0].type == "llamacpp"
    assert settings.backends[0].zone == "open"
    assert settings.backends[0].url == "http://127.0.0.1:1"


def test_alias_cycle_is_rejected_naming_the_alias(tmp_path):
    path = write(
        tmp_path / "nexus.toml",
        "[routing.aliases]\nsmart-one = 'clever-one'\nclever-one = 'smart-one'\n",
    )
    result = run_cli("config", "check", str(path))
    assert result.returncode != 0
    assert "cycle" in result.stderr
    assert "smart-one" in result.stderr
    assert "Traceback" not in result.stderr


def test_alias_to_itself_is_a_cycle(tmp_path):
    path = write(tmp_path / "nexus.toml", "[routing.aliases]\nloop = 'loop'\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode != 0
    assert "cycle" in result.stderr and "loop" in result.stderr


def test_alias_chain_deeper_than_three_hops_is_rejected(tmp_path):
    path = write(
        tmp_path / "nexus.toml",
        "[routing.aliases]\nhop1 = 'hop2'\nhop2 = 'hop3'\nhop3 = 'hop4'\nhop4 = 'target'\n",
    )
    result = run_cli("config", "check", str(path))
    assert result.returncode != 0
    assert "hop1" in result.stderr
    assert "3 hops" in result.stderr


def test_alias_chain_of_three_hops_is_accepted(tmp_path):
    path = write(
        tmp_path / "nexus.toml",
        "[routing.aliases]\nhop1 = 'hop2'\nhop2 = 'hop3'\nhop3 = 'target'\n",
    )
    result = run_cli("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert "3 alias(es)" in result.stdout


def test_config_check_applies_nexus_env(tmp_path):
    path = write(tmp_path / "nexus.toml", "[server]\nport = 8100\n")
    result = run_cli("config", "check", str(path), env={"NEXUS_PORT": "not-a-number"})
    assert result.returncode != 0
    assert "NEXUS_PORT" in result.stderr
    out_of_range = run_cli("config", "check", str(path), env={"NEXUS_PORT": "70000"})
    assert out_of_range.returncode != 0
    assert "NEXUS_PORT" in out_of_range.stderr  # the error says where the value came from


# --- precedence: CLI > NEXUS_* env > file > default ---------------------------------------------


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    path = write(
        tmp_path / "nexus.toml",
        "[server]\nport = 8001\nhost = '10.0.0.1'\n"
        "[logging]\nlevel = 'error'\n[discovery]\nenabled = false\n",
    )
    env = {
        "NEXUS_PORT": "8002",
        "NEXUS_HOST": "10.0.0.2",
        "NEXUS_LOG_LEVEL": "debug",
        "NEXUS_DISCOVERY": "true",
    }
    cli = {
        ("server", "port"): 8003,
        ("server", "host"): None,  # a flag not given does not override
        ("logging", "level"): None,
        ("discovery", "enabled"): False,
    }

    default = load_settings(tmp_path / "absent.toml", environ={})
    assert default.server.port == 8000
    assert default.server.host == "127.0.0.1"
    assert default.logging.level == "info"
    assert default.discovery.enabled is True

    from_file = load_settings(path, environ={})
    assert from_file.server.port == 8001
    assert from_file.server.host == "10.0.0.1"
    assert from_file.logging.level == "error"
    assert from_file.discovery.enabled is False

    from_env = load_settings(path, environ=env)
    assert from_env.server.port == 8002
    assert from_env.server.host == "10.0.0.2"
    assert from_env.logging.level == "debug"
    assert from_env.discovery.enabled is True

    from_cli = load_settings(path, environ=env, overrides=cli)
    assert from_cli.server.port == 8003
    assert from_cli.server.host == "10.0.0.2"
    assert from_cli.logging.level == "debug"
    assert from_cli.discovery.enabled is False

    env_only = load_settings(tmp_path / "absent.toml", environ={"NEXUS_PORT": "8004"})
    assert env_only.server.port == 8004
    # Other keys of a section the env touched keep their file values.
    partial = load_settings(path, environ={"NEXUS_PORT": "8005"})
    assert partial.server.port == 8005
    assert partial.server.host == "10.0.0.1"


def test_empty_env_values_are_ignored(tmp_path):
    path = write(tmp_path / "nexus.toml", "[server]\nport = 8001\n")
    assert load_settings(path, environ={"NEXUS_PORT": ""}).server.port == 8001


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("yes", True), ("off", False), ("FALSE", False)]
)
def test_env_booleans(raw, expected):
    settings = load_settings(None, environ={"NEXUS_HEALTH_CHECK": raw})
    assert settings.health_check.enabled is expected


def test_bad_env_values_are_config_errors_naming_the_variable():
    with pytest.raises(ConfigError, match="NEXUS_DISCOVERY"):
        load_settings(None, environ={"NEXUS_DISCOVERY": "maybe"})
    with pytest.raises(ConfigError, match="NEXUS_PORT"):
        load_settings(None, environ={"NEXUS_PORT": "eighty"})
    with pytest.raises(ConfigError, match="NEXUS_LOG_LEVEL"):
        load_settings(None, environ={"NEXUS_LOG_LEVEL": "chatty"})


def test_require_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={}, require_file=True)


# --- nexus serve -----------------------------------------------------------------------------


class Served:
    """A ``nexus serve`` subprocess on a free port."""

    def __init__(self, config: Path | None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "-p", str(self.port), "--no-discovery"]
        if config is not None:
            args += ["-c", str(config)]
        self.proc = subprocess.Popen(
            [str(NEXUS), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(env),
        )
        self.stdout = ""
        self.stderr = ""

    def wait_ready(self, path: str = "/livez") -> None:
        """Poll ``path`` until it answers 200; fail at once if the process ends first."""
        deadline = time.monotonic() + START_DEADLINE
        with httpx2.Client(timeout=2) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.collect()
                    pytest.fail(f"nexus serve exited with {self.proc.returncode}:\n{self.stderr}")
                try:
                    if http.get(self.url + path).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                time.sleep(0.05)  # poll interval of a deadline-bounded wait
        self.stop()
        pytest.fail(f"nexus serve did not answer {path} within {START_DEADLINE}s:\n{self.stderr}")

    def collect(self, timeout: float = EXIT_DEADLINE) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        return self.proc.returncode

    def signal_and_wait(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            return self.collect(EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.collect()
            pytest.fail(f"nexus serve did not exit within {EXIT_DEADLINE}s of signal {sig}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.collect()


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(config: Path | None, env: dict[str, str] | None = None) -> Served:
        served = Served(config, env=env)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.stop()


def serve_config(tmp_path: Path, backend_url: str, **server: Any) -> Path:
    extra = "".join(f"{key} = {value!r}\n" for key, value in server.items())
    return write(
        tmp_path / "nexus.toml",
        "[server]\nhost = '127.0.0.1'\n"
        + extra
        + "[discovery]\nenabled = false\n"
        + "[health_check]\ninterval_seconds = 3600\n"
        + f"[[backends]]\nname = 'box'\nurl = '{backend_url}'\ntype = 'vllm'\n",
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_signal(tmp_path, serve, sig):
    served = serve(serve_config(tmp_path, unused_url()))
    served.wait_ready()
    with httpx2.Client(timeout=5) as http:
        health = http.get(served.url + "/health").json()
        assert health["backends"] == {"total": 1, "healthy": 0, "unhealthy": 1}
        assert http.get(served.url + "/readyz").status_code == 503
    code = served.signal_and_wait(sig)
    assert code == 0, served.stderr
    assert "Traceback" not in served.stderr
    assert "Traceback" not in served.stdout


def test_serve_with_bad_config_exits_non_zero_without_traceback(tmp_path):
    path = write(tmp_path / "nexus.toml", "[server]\nprot = 1\n")
    result = run_cli("serve", "-c", str(path), "-p", str(free_port()), "--no-discovery")
    assert result.returncode != 0
    assert "server.prot" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_reads_config_path_from_nexus_config_env(tmp_path, serve):
    config = serve_config(tmp_path, unused_url())
    served = serve(None, env={"NEXUS_CONFIG": str(config)})
    served.wait_ready()
    with httpx2.Client(timeout=5) as http:
        assert http.get(served.url + "/health").json()["backends"]["total"] == 1
    served.stop()


def test_serve_config_flag_wins_over_nexus_config_env(tmp_path, serve):
    config = serve_config(tmp_path, unused_url())
    other = write(tmp_path / "other.toml", "[server]\nprot = 1\n")  # would not even load
    served = serve(config, env={"NEXUS_CONFIG": str(other)})
    served.wait_ready()
    with httpx2.Client(timeout=5) as http:
        assert http.get(served.url + "/health").json()["backends"]["total"] == 1
    served.stop()


def test_in_flight_request_completes_after_sigterm(tmp_path, serve, start_fake):
    fake = start_fake(FakeOpenAI())
    fake.push("/v1/chat/completions", Reply(json=completion(content="slow but sure"), delay=1.0))
    served = serve(serve_config(tmp_path, fake.url))
    served.wait_ready("/readyz")

    result: dict[str, Any] = {}

    def send() -> None:
        try:
            with httpx2.Client(timeout=30) as http:
                result["response"] = http.post(
                    served.url + "/v1/chat/completions",
                    json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
                )
        except Exception as exc:  # reported by the assertions below
            result["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + START_DEADLINE
    while not fake.calls("/v1/chat/completions"):  # wait until the upstream holds the request
        assert time.monotonic() < deadline, "the request never reached the upstream"
        assert sender.is_alive(), f"the request ended early: {result}"
        time.sleep(0.01)  # poll interval of a deadline-bounded wait
    assert sender.is_alive(), f"the request finished before SIGTERM: {result}"

    code = served.signal_and_wait(signal.SIGTERM)
    sender.join(timeout=EXIT_DEADLINE)
    assert not sender.is_alive()
    assert "error" not in result, result.get("error")
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "slow but sure"
    assert code == 0, served.stderr
    assert "Traceback" not in served.stderr
