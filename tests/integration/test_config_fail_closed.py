"""Config fails closed (issue 8, point 10): bad log levels are config errors, a missing admin key
stops start-up, and ``shutdown_timeout_seconds = 0`` shuts down at once."""

from __future__ import annotations

import signal
import threading
from typing import Any

import httpx2
import pytest

from nexus.app import create_app
from nexus.config import ConfigError
from tests.fakes import FakeOpenAI, Reply, completion
from tests.harness import settings_for, wait_for
from tests.integration.test_cli import (
    EXIT_DEADLINE,
    free_port,
    run_cli,
    serve,  # noqa: F401 (a fixture)
    serve_config,
    unused_url,
    write,
)

ADMIN_VAR = "NEXUS_FAIL_CLOSED_ADMIN_KEY"


@pytest.mark.parametrize("level", ["loud", "verbose", "", "INFO2"])
def test_config_check_rejects_a_bad_component_level_naming_the_key(tmp_path, level):
    path = write(tmp_path / "nexus.toml", f'[logging.component_levels]\nhealth = "{level}"\n')
    result = run_cli("config", "check", str(path))
    assert result.returncode != 0
    assert "logging.component_levels.health" in result.stderr
    assert "Traceback" not in result.stderr


def test_component_levels_accept_the_level_names_in_any_case(tmp_path):
    text = '[logging.component_levels]\nhealth = "DEBUG"\ndiscovery = "warn"\napi = "Trace"\n'
    result = run_cli("config", "check", str(write(tmp_path / "nexus.toml", text)))
    assert result.returncode == 0, result.stderr


def test_serve_stops_when_the_admin_key_variable_is_not_set(tmp_path):
    path = serve_config(tmp_path, unused_url(), admin_key_env=ADMIN_VAR)
    port = free_port()
    result = run_cli("serve", "-c", str(path), "-p", str(port), "--no-discovery")
    assert result.returncode != 0
    assert ADMIN_VAR in result.stderr and "server.admin_key_env" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(httpx2.TransportError):  # it never listened
        httpx2.get(f"http://127.0.0.1:{port}/livez", timeout=2)


def test_config_check_warns_of_key_variables_that_are_not_set(tmp_path):
    path = serve_config(tmp_path, unused_url(), admin_key_env=ADMIN_VAR)
    result = run_cli("config", "check", str(path))
    assert result.returncode == 0, result.stderr  # the variable may be set where it runs
    assert f"server.admin_key_env names {ADMIN_VAR}, which is not set" in result.stderr


@pytest.mark.parametrize("environ", [{}, {ADMIN_VAR: ""}, {ADMIN_VAR: " \n"}])
def test_create_app_refuses_a_missing_or_empty_admin_key(environ):
    settings = settings_for(server={"admin_key_env": ADMIN_VAR})
    with pytest.raises(ConfigError, match=ADMIN_VAR):
        create_app(settings, environ=environ)
    create_app(settings, environ={ADMIN_VAR: "set"})  # set: fine


def test_shutdown_timeout_zero_shuts_down_at_once(tmp_path, serve, start_fake):  # noqa: F811
    fake = start_fake(FakeOpenAI())
    fake.push("/v1/chat/completions", Reply(json=completion(), delay=3600))  # never answers
    served = serve(serve_config(tmp_path, fake.url, shutdown_timeout_seconds=0))
    served.wait_ready("/readyz")

    result: dict[str, Any] = {}

    def send() -> None:
        try:
            with httpx2.Client(timeout=60) as http:
                result["response"] = http.post(
                    served.url + "/v1/chat/completions",
                    json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
                )
        except httpx2.TransportError as exc:  # cut off by the shutdown: expected
            result["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    assert wait_for(lambda: bool(fake.calls("/v1/chat/completions")), 30), "never reached upstream"
    assert sender.is_alive()

    # With "wait forever" (the old reading of 0) this would not return within the deadline.
    code = served.signal_and_wait(signal.SIGTERM)
    sender.join(timeout=EXIT_DEADLINE)
    assert not sender.is_alive()
    assert code == 0, served.stderr
    assert "timeout graceful shutdown exceeded" in served.stderr  # cut off, not finished
    assert "Traceback" not in served.stderr  # said in one line, not as an application error
    assert result["response"].status_code == 503, result
    assert "shutting down" in result["response"].json()["error"]["message"]


def test_a_stream_cut_by_the_shutdown_ends_with_an_error_event(tmp_path, serve, start_fake):  # noqa: F811
    fake = start_fake(FakeOpenAI())
    first = b'data: {"id":"1","object":"chat.completion.chunk","choices":[]}\n\n'
    fake.push("/v1/chat/completions", Reply(events=[first], hang_after=1))
    served = serve(serve_config(tmp_path, fake.url, shutdown_timeout_seconds=0))
    served.wait_ready("/readyz")
    body = {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with (
        httpx2.Client(timeout=60) as http,
        http.stream("POST", served.url + "/v1/chat/completions", json=body) as resp,
    ):
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:")) == first.decode().strip()
        assert served.signal_and_wait(signal.SIGTERM) == 0, served.stderr
        rest = [line for line in lines if line.startswith("data:")]
    assert "shutting down" in rest[0] and '"error"' in rest[0], rest
    assert rest[-1] == "data: [DONE]"
    assert "Traceback" not in served.stderr
