"""Claude Code and Codex with a Nexus key (issue 12): ``[auth] enabled = true``, a key made
through the admin API, and each agent configured the README's way with that key (Claude Code's
``ANTHROPIC_API_KEY`` goes out as ``x-api-key``, Codex's ``env_key`` as a bearer token). The tool
turn works, history names the key, and the key never reaches the upstream. A wrong key stops
each agent with the 401's message, not a hang."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import httpx2
import orjson

from tests.harness import NexusServer, settings_for

from .conftest import (
    FINAL_TEXT,
    MODEL,
    Agents,
    AgentUpstream,
    claude_env,
    codex_env,
    history,
    run_agent,
    tool_results,
)

SHELL: dict[str, dict[str, Any]] = {"exec_command": {"cmd": "cat secret.txt"}}


def keyed_nexus(start_fake, start_nexus, upstream: AgentUpstream) -> tuple[NexusServer, str]:
    fake = start_fake(upstream)
    nexus = start_nexus(settings_for(("vllm", fake, "vllm"), auth={"enabled": True}))
    made = httpx2.post(nexus.url + "/admin/keys", json={"name": "agent", "rpm": 600})
    assert made.status_code == 201, made.text
    return nexus, str(made.json()["key"])


def never_upstream(upstream: AgentUpstream, key: str) -> None:
    for call in upstream.requests:
        assert key not in repr(call.headers), call.headers


def test_claude_code_with_a_nexus_key(
    agents: Agents, start_fake, start_nexus, workdir: Path, tmp_path: Path
) -> None:
    token = f"nexus-agent-ok-{secrets.token_hex(4)}"
    upstream = AgentUpstream({"Bash": {"command": f"echo {token}", "description": "Echo"}})
    nexus, key = keyed_nexus(start_fake, start_nexus, upstream)
    argv = [agents.claude, "-p", "Run the echo, then say you are done."]
    argv += ["--output-format", "json", "--permission-mode", "acceptEdits"]
    argv += ["--allowedTools", "Bash"]
    env = {**claude_env(tmp_path / "home", nexus.url, MODEL), "ANTHROPIC_API_KEY": key}
    run = run_agent(argv, env, workdir)

    assert run.returncode == 0, run
    assert any(token in text for text in tool_results(upstream.chats())), upstream.chats()[-1]
    assert FINAL_TEXT in orjson.loads(run.stdout)["result"], run
    served = [e for e in history(nexus.url) if e["api"] == "messages"]
    assert served and all(e["status"] == 200 and e["key"] == "agent" for e in served), served
    never_upstream(upstream, key)

    env["ANTHROPIC_API_KEY"] = "nx-not-a-key"
    run = run_agent(argv, env, workdir)
    assert run.returncode != 0, run
    result = orjson.loads(run.stdout)
    assert result["is_error"] is True and "Invalid API key" in str(result["result"]), run


def test_codex_with_a_nexus_key(
    agents: Agents, start_fake, start_nexus, workdir: Path, tmp_path: Path
) -> None:
    token = f"nexus-agent-ok-{secrets.token_hex(4)}"
    (workdir / "secret.txt").write_text(token + "\n")
    upstream = AgentUpstream(SHELL)
    nexus, key = keyed_nexus(start_fake, start_nexus, upstream)
    argv = [agents.codex, "exec", "--skip-git-repo-check", "Print the secret, then say done."]
    env = {**codex_env(tmp_path / "home", nexus.url, MODEL), "NEXUS_API_KEY": key}
    run = run_agent(argv, env, workdir)

    assert run.returncode == 0, run
    assert any(token in text for text in tool_results(upstream.chats())), upstream.chats()[-1]
    assert FINAL_TEXT in run.stdout, run
    served = [e for e in history(nexus.url) if e["api"] == "responses"]
    assert served and all(e["status"] == 200 and e["key"] == "agent" for e in served), served
    never_upstream(upstream, key)

    env["NEXUS_API_KEY"] = "nx-not-a-key"
    run = run_agent(argv, env, workdir)
    assert run.returncode != 0, run
    assert "Invalid API key" in run.stderr, run
