"""Claude Code and Codex, the real CLIs, drive one tool turn through Nexus: a scripted
OpenAI-compatible model first asks for a shell command, the agent runs it in a temporary folder
and sends the result back, and the model's final text reaches the agent's output."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from nexus.config import Settings
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


def nexus_for(
    start_fake: Callable[[AgentUpstream], AgentUpstream],
    start_nexus: Callable[[Settings], NexusServer],
    upstream: AgentUpstream,
) -> NexusServer:
    fake = start_fake(upstream)
    return start_nexus(settings_for(("vllm", fake, "vllm")))


def answered_both(upstream: AgentUpstream) -> bool:
    """A later request holds the one assistant turn with both calls, and a result for each."""
    for body in upstream.chats():
        messages = body.get("messages") or []
        for at, message in enumerate(messages):
            ids = {call["id"] for call in message.get("tool_calls") or []}
            answered = {m.get("tool_call_id") for m in messages[at + 1 :] if m["role"] == "tool"}
            if len(ids) == 2 and ids <= answered:
                return True
    return False


def test_claude_code_runs_a_bash_tool_through_nexus(
    agents: Agents, start_fake, start_nexus, workdir: Path, tmp_path: Path
) -> None:
    token = f"nexus-agent-ok-{secrets.token_hex(4)}"
    command = f"echo {token} > marker.txt && cat marker.txt"
    upstream = AgentUpstream({"Bash": {"command": command, "description": "Write the marker"}})
    nexus = nexus_for(start_fake, start_nexus, upstream)
    argv = [agents.claude, "-p", "Write the marker file, then say you are done."]
    argv += ["--output-format", "json", "--permission-mode", "acceptEdits"]
    argv += ["--allowedTools", "Bash,Read"]
    run = run_agent(argv, claude_env(tmp_path / "home", nexus.url, MODEL), workdir)

    assert run.returncode == 0, run
    marker = workdir / "marker.txt"
    assert marker.is_file() and marker.read_text().strip() == token, run
    assert any(token in text for text in tool_results(upstream.chats())), upstream.chats()[-1]
    result = orjson.loads(run.stdout)
    assert result["is_error"] is False, run
    assert FINAL_TEXT in result["result"], run
    served = [e for e in history(nexus.url) if e["api"] == "messages"]
    assert len(served) >= 2 and all(e["status"] == 200 and e["backend"] == "vllm" for e in served)


def test_codex_runs_exec_command_through_nexus(
    agents: Agents, start_fake, start_nexus, workdir: Path, tmp_path: Path
) -> None:
    token = f"nexus-agent-ok-{secrets.token_hex(4)}"
    (workdir / "secret.txt").write_text(token + "\n")
    shell: dict[str, dict[str, Any]] = {
        "exec_command": {"cmd": "cat secret.txt"},
        "shell": {"command": ["cat", "secret.txt"]},
    }
    upstream = AgentUpstream(shell)
    nexus = nexus_for(start_fake, start_nexus, upstream)
    argv = [agents.codex, "exec", "--skip-git-repo-check", "Print the secret, then say done."]
    run = run_agent(argv, codex_env(tmp_path / "home", nexus.url, MODEL), workdir)

    assert run.returncode == 0, run
    assert any(token in text for text in tool_results(upstream.chats())), upstream.chats()[-1]
    assert FINAL_TEXT in run.stdout, run
    served = [e for e in history(nexus.url) if e["api"] == "responses"]
    assert len(served) >= 2 and all(e["status"] == 200 and e["backend"] == "vllm" for e in served)


def test_claude_code_runs_parallel_calls_after_thinking(
    agents: Agents, start_fake, start_nexus, workdir: Path, tmp_path: Path
) -> None:
    """A reasoning model's answer: thinking, then Bash and Read at once; both results return."""
    token = f"nexus-agent-ok-{secrets.token_hex(4)}"
    (workdir / "notes.txt").write_text(token + "\n")
    calls = {
        "Bash": {"command": "echo bash-ran", "description": "Say that bash ran"},
        "Read": {"file_path": str(workdir / "notes.txt")},
    }
    upstream = AgentUpstream(calls, parallel=True, reasoning="Both tools, at once.")
    nexus = nexus_for(start_fake, start_nexus, upstream)
    argv = [agents.claude, "-p", "Run both tools.", "--output-format", "json"]
    argv += ["--permission-mode", "acceptEdits", "--allowedTools", "Bash,Read"]
    run = run_agent(argv, claude_env(tmp_path / "home", nexus.url, MODEL), workdir)

    assert run.returncode == 0, run
    assert answered_both(upstream), upstream.chats()[-1]
    results = tool_results(upstream.chats())
    assert any("bash-ran" in text for text in results), results
    assert any(token in text for text in results), results
    assert FINAL_TEXT in orjson.loads(run.stdout)["result"], run


def test_codex_runs_parallel_calls_after_reasoning(
    agents: Agents, start_fake, start_nexus, workdir: Path, tmp_path: Path
) -> None:
    token = f"nexus-agent-ok-{secrets.token_hex(4)}"
    (workdir / "secret.txt").write_text(token + "\n")
    calls: dict[str, dict[str, Any]] = {
        "exec_command": {"cmd": "cat secret.txt"},
        "view_image": {"path": "missing.png"},  # fails: its error still goes back
    }
    upstream = AgentUpstream(calls, parallel=True, reasoning="Two calls, at once.")
    nexus = nexus_for(start_fake, start_nexus, upstream)
    argv = [agents.codex, "exec", "--skip-git-repo-check", "Run both tools."]
    run = run_agent(argv, codex_env(tmp_path / "home", nexus.url, MODEL), workdir)

    assert run.returncode == 0, run
    assert answered_both(upstream), upstream.chats()[-1]
    results = tool_results(upstream.chats())
    assert any(token in text for text in results), results
    assert any("missing.png" in text for text in results), results
    assert FINAL_TEXT in run.stdout, run
