"""Claude Code and Codex against the real llama-server tier: SmolLM2-135M managed by Nexus.

SmolLM2 is tiny, so only the plumbing is asserted: each agent exits 0 with some answer. Claude
Code runs without tools (``--tools ""``). Codex always sends its tools: SmolLM2 is served as the
embedded default serves it, with the ChatML template shipped with Nexus that takes them. With
SmolLM2's own template, which cannot take tools (llama-server's /props says so), Codex gets the
actionable error instead.
Left alone, SmolLM2 often rambles on such prompts until the context is full, so it is nudged to
end its turn (a logit bias on ``<|im_end|>``) and Claude Code's own output cap bounds a run that
rambles anyway.
With a context smaller than the prompt, Nexus refuses before calling the model, and the agent
must show that refusal (with the numbers a user needs) and stop, not hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from nexus.managed import EMBEDDED_MODEL_FILE, EMBEDDED_MODEL_NAME
from tests.harness import LoopThread, NexusServer
from tests.real.conftest import cached, llama_server, start

from .conftest import Agents, claude_env, codex_env, history, run_agent

pytestmark = pytest.mark.real
SMOLLM_CONTEXT = 8192  # SmolLM2's trained context
SMALL_CONTEXT = 2048  # smaller than either agent's prompt
BRIEF = ["--logit-bias", "2+4"]  # token 2 is SmolLM2's <|im_end|>
REAL_TIMEOUT = 300.0  # prompt processing of ~5k tokens on 2 shared cores
PROMPT = "Say hello in one line."
# The README's trim of Codex's prompt for a local model with an 8k context.
SMALL_MODEL_FEATURES = "multi_agent = false\ngoals = false\n"


def managed_smollm(
    loop_thread: LoopThread, context: int, chat_template: str | None = "chatml-tools"
) -> NexusServer:
    managed: dict[str, object] = {
        "model": str(cached(EMBEDDED_MODEL_FILE)),
        "binary": llama_server(),
        "alias": EMBEDDED_MODEL_NAME,
        "slots": 1,
        "context": context,
        "threads": 2,
        "extra_args": BRIEF,
    }
    if chat_template:
        managed["chat_template"] = chat_template
    return start(loop_thread, managed, "llama")


@pytest.fixture(scope="module")
def smollm(loop_thread: LoopThread) -> Iterator[NexusServer]:
    server = managed_smollm(loop_thread, SMOLLM_CONTEXT)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smollm_own_template(loop_thread: LoopThread) -> Iterator[NexusServer]:
    server = managed_smollm(loop_thread, SMOLLM_CONTEXT, chat_template=None)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_smollm(loop_thread: LoopThread) -> Iterator[NexusServer]:
    server = managed_smollm(loop_thread, SMALL_CONTEXT)
    yield server
    server.stop()


def served(nexus: NexusServer, api: str) -> list[dict[str, object]]:
    return [e for e in history(nexus.url) if e["api"] == api]


def test_claude_code_answers_from_smollm(
    agents: Agents, smollm: NexusServer, workdir: Path, tmp_path: Path
) -> None:
    # No tools (``--tools ""``): SmolLM2 cannot call any, and a plain answer needs none.
    argv = [agents.claude, "-p", PROMPT, "--output-format", "json", "--tools", ""]
    env = claude_env(tmp_path / "home", smollm.url, EMBEDDED_MODEL_NAME)
    env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = "256"
    run = run_agent(argv, env, workdir, timeout=REAL_TIMEOUT)

    assert run.returncode == 0, f"{run}\n{history(smollm.url)}"
    result = orjson.loads(run.stdout)
    assert result["is_error"] is False, run
    assert str(result["result"]).strip(), run
    entries = served(smollm, "messages")
    assert entries and all(e["status"] == 200 and e["backend"] == "llama" for e in entries)


def test_codex_answers_from_smollm(
    agents: Agents, smollm: NexusServer, workdir: Path, tmp_path: Path
) -> None:
    """Codex sends its tools with every request; the shipped template shows them to SmolLM2.
    Codex's full prompt (about 9k tokens) is more than SmolLM2's 8k context, so it is trimmed as
    the README tells users of small local models to: without the multi-agent and goal tools."""
    argv = [agents.codex, "exec", "--skip-git-repo-check", PROMPT]
    env = codex_env(tmp_path / "home", smollm.url, EMBEDDED_MODEL_NAME)
    with (Path(env["CODEX_HOME"]) / "config.toml").open("a") as config:
        config.write(SMALL_MODEL_FEATURES)
    run = run_agent(argv, env, workdir, timeout=REAL_TIMEOUT)

    assert run.returncode == 0, f"{run}\n{history(smollm.url)}"
    assert run.stdout.strip(), run  # codex exec prints the final answer on stdout
    entries = served(smollm, "responses")
    assert entries and all(e["status"] == 200 and e["backend"] == "llama" for e in entries)


def test_codex_is_told_that_smollms_own_template_takes_no_tools(
    agents: Agents, smollm_own_template: NexusServer, workdir: Path, tmp_path: Path
) -> None:
    """With SmolLM2's own template, which takes no tools (llama-server says so in /props):
    rather than a model that cannot see the tools, Codex is told why (issue 11, point 6), and
    stops."""
    argv = [agents.codex, "exec", "--skip-git-repo-check", PROMPT]
    env = codex_env(tmp_path / "home", smollm_own_template.url, EMBEDDED_MODEL_NAME)
    run = run_agent(argv, env, workdir, timeout=REAL_TIMEOUT)

    assert run.returncode != 0, run
    assert "lacks tools" in run.stderr, run
    entries = served(smollm_own_template, "responses")
    assert entries and entries[-1]["error_type"] == "capability_mismatch", entries


def test_claude_code_shows_why_the_context_is_too_small(
    agents: Agents, small_smollm: NexusServer, workdir: Path, tmp_path: Path
) -> None:
    argv = [agents.claude, "-p", PROMPT, "--output-format", "json"]
    env = claude_env(tmp_path / "home", small_smollm.url, EMBEDDED_MODEL_NAME)
    run = run_agent(argv, env, workdir)

    assert run.returncode != 0, run
    result = orjson.loads(run.stdout)
    assert result["is_error"] is True and result["api_error_status"] == 400, run
    shown = str(result["result"])
    assert f"{SMALL_CONTEXT} tokens" in shown, shown  # what the model has, so the user can act
    assert served(small_smollm, "messages")[-1]["error_type"] == "capability_mismatch"


def test_codex_shows_why_the_context_is_too_small(
    agents: Agents, small_smollm: NexusServer, workdir: Path, tmp_path: Path
) -> None:
    argv = [agents.codex, "exec", "--skip-git-repo-check", PROMPT]
    env = codex_env(tmp_path / "home", small_smollm.url, EMBEDDED_MODEL_NAME)
    run = run_agent(argv, env, workdir)

    assert run.returncode != 0, run
    assert f"{SMALL_CONTEXT} tokens" in run.stderr, run
    assert served(small_smollm, "responses")[-1]["error_type"] == "capability_mismatch"
