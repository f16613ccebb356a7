"""Managed backends: Nexus starts a llama-server child, waits for it, restarts it when it dies
and stops it on shutdown. The child here is a stand-in speaking llama-server's API; the real
binary is exercised by tests/real."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from nexus.registry import Status
from tests.harness import settings_for, wait_for

FAKE_SERVER = Path(__file__).resolve().parent.parent / "fake_llama_server.py"
CHAT = "/v1/chat/completions"


@pytest.fixture
def fake_binary(tmp_path: Path) -> Path:
    """An executable named like llama-server that runs the stand-in with this Python."""
    script = tmp_path / "llama-server"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SERVER}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    model = tmp_path / "tiny-chat.gguf"
    model.write_bytes(b"GGUF fake weights")
    return model


def managed(binary: Path, model: Path, **extra: object) -> dict[str, object]:
    return {
        "name": "local",
        "type": "llamacpp",
        "managed": {"model": str(model), "binary": str(binary), "slots": 2, **extra},
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


def server_of(nexus):
    return nexus.gateway.managed[0]


def test_managed_backend_starts_serves_and_lists_its_model(
    start_nexus, client, fake_binary, model_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("NEXUS_CACHE_DIR", str(tmp_path / "cache"))
    nexus = start_nexus(settings_for(backends=[managed(fake_binary, model_file, alias="tiny")]))
    backend = nexus.gateway.registry.get("local")
    assert backend.status is Status.HEALTHY
    assert backend.url.startswith("http://127.0.0.1:") and not backend.url.endswith(":0")
    models = client.get(nexus.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny"]
    assert models[0]["context_length"] == 2048  # from /props: 4096 shared by 2 slots
    assert backend.slots == 2 and backend.capacity(8) == 2  # capacity learned from its slots
    reply = client.post(
        nexus.url + CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert reply.status_code == 200
    assert f"pid {server_of(nexus).pid} says hi" == reply.json()["choices"][0]["message"]["content"]
    assert (tmp_path / "cache" / "logs" / "local.log").exists()


def test_a_killed_child_is_restarted_and_serves_again(
    start_nexus, client, fake_binary, model_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("NEXUS_CACHE_DIR", str(tmp_path / "cache"))
    nexus = start_nexus(settings_for(backends=[managed(fake_binary, model_file, alias="tiny")]))
    server = server_of(nexus)
    first = server.pid
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: server.pid != first and server.ready.is_set(), timeout=30)
    backend = nexus.gateway.registry.get("local")
    assert wait_for(lambda: backend.status is Status.HEALTHY, timeout=10)
    reply = client.post(
        nexus.url + CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == f"pid {server.pid} says hi"
    assert not alive(first)


def test_the_child_is_stopped_on_shutdown(
    start_nexus, fake_binary, model_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("NEXUS_CACHE_DIR", str(tmp_path / "cache"))
    nexus = start_nexus(settings_for(backends=[managed(fake_binary, model_file)]))
    pid = server_of(nexus).pid
    assert pid is not None and alive(pid)
    nexus.stop()
    assert not alive(pid)


def test_a_missing_model_file_leaves_nexus_serving_with_the_reason(
    start_nexus, client, fake_binary, tmp_path, monkeypatch
):
    monkeypatch.setenv("NEXUS_CACHE_DIR", str(tmp_path / "cache"))
    missing = tmp_path / "nope.gguf"
    nexus = start_nexus(settings_for(backends=[managed(fake_binary, missing)]))
    backend = nexus.gateway.registry.get("local")
    assert backend.status is Status.UNHEALTHY
    assert "does not exist" in (backend.last_error or "")
    assert client.get(nexus.url + "/health").json()["status"] == "unhealthy"


def test_embedded_default_needs_both_binary_and_model(tmp_path, monkeypatch, fake_binary):
    from nexus.managed import EMBEDDED_MODEL_FILE, embedded_default

    cache = tmp_path / "cache"
    monkeypatch.setenv("NEXUS_CACHE_DIR", str(cache))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    assert embedded_default(True) == []
    (cache / "models").mkdir(parents=True)
    (cache / "models" / EMBEDDED_MODEL_FILE).write_bytes(b"GGUF")
    assert embedded_default(True) == []  # no llama-server anywhere
    build = cache / "llama.cpp-1" / "bin"
    build.mkdir(parents=True)
    (build / "llama-server").symlink_to(fake_binary)
    (spec,) = embedded_default(True)
    assert spec.managed is not None and spec.managed.model_name == "smollm2-135m"
    assert spec.managed.slots == 4
    # SmolLM2's own template drops tools, and agents always send them (issue 11).
    assert spec.managed.chat_template == "chatml-tools"
    assert embedded_default(False) == []


def test_the_shipped_tool_template_makes_tools_a_reported_capability(
    start_nexus, client, fake_binary, model_file, tmp_path, monkeypatch
):
    """``chat_template = "chatml-tools"`` hands llama-server the template shipped with Nexus;
    the server's /props then says the template takes tools, and /v1/models shows it."""
    from nexus.managed import SHIPPED_TEMPLATES

    monkeypatch.setenv("NEXUS_CACHE_DIR", str(tmp_path / "cache"))
    backend = managed(fake_binary, model_file, alias="tiny", chat_template="chatml-tools")
    nexus = start_nexus(settings_for(backends=[backend]))
    (model,) = client.get(nexus.url + "/v1/models").json()["data"]
    assert model["capabilities"]["tools"] is True
    argv = Path(f"/proc/{server_of(nexus).pid}/cmdline").read_bytes().split(b"\0")
    shipped = SHIPPED_TEMPLATES / "chatml-tools.jinja"
    assert argv[argv.index(b"--chat-template-file") + 1] == str(shipped).encode()


def test_a_chat_template_may_be_a_file_and_a_wrong_name_says_what_exists(
    start_nexus, client, fake_binary, model_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("NEXUS_CACHE_DIR", str(tmp_path / "cache"))
    own = tmp_path / "plain.jinja"
    own.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    nexus = start_nexus(
        settings_for(backends=[managed(fake_binary, model_file, chat_template=str(own))])
    )
    (model,) = client.get(nexus.url + "/v1/models").json()["data"]
    assert model["capabilities"]["tools"] is False  # the server's word for a template without
    nexus.stop()

    wrong = managed(fake_binary, model_file, chat_template="chatml-tool")
    nexus = start_nexus(settings_for(backends=[wrong]))
    backend = nexus.gateway.registry.get("local")
    assert backend.status is Status.UNHEALTHY
    assert "chat template 'chatml-tool'" in (backend.last_error or "")
    assert "chatml-tools" in (backend.last_error or "")  # what could have been meant
