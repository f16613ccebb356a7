"""The agent tier: the real Claude Code and Codex CLIs (pinned, from npm, installed by
scripts/install-agents into the Nexus cache) run non-interactively against a real Nexus.

Each CLI gets a private HOME (and CODEX_HOME) and an environment built from scratch, so nothing
of the user's own agent setup or keys leaks in. A run is bounded: on timeout its whole process
group is killed by id and the test fails with what the CLI printed so far.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.fakes import DONE, FakeOpenAI, Reply, chunk, sse

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install-agents"
RUN_TIMEOUT = 120.0  # seconds one CLI run may take (scripted upstream)
MODEL = "agent-model"
FINAL_TEXT = "DONE-42"


@dataclass(frozen=True)
class Agents:
    claude: str
    codex: str


@pytest.fixture(scope="session")
def agents() -> Agents:
    """The two CLIs; scripts/install-agents answers at once when they are cached. When they
    cannot be installed (no npm, no registry), the tier skips and says why."""
    if os.environ.get("NEXUS_SKIP_AGENTS") == "1":
        pytest.skip("agent tier: NEXUS_SKIP_AGENTS=1")
    try:
        done = subprocess.run(
            [str(INSTALL)], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"agent tier: scripts/install-agents did not run: {exc}")
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"agent tier: the coding agents could not be installed ({last})")
    return Agents(claude=lines[0], codex=lines[1])


@dataclass(repr=False)
class Run:
    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:
        return (
            f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}\n"
            f"--- stderr ---\n{self.stderr[-4000:]}"
        )


def run_agent(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = RUN_TIMEOUT) -> Run:
    """Run a CLI in its own process group; on timeout kill that group by id and fail."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv[0]} hung for {timeout:.0f} s:\n{Run(-9, out, err)}")
    finally:  # interrupted: leave no agent (or its children) behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Run(proc.returncode, out, err)


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: only PATH and locale from ours, a private HOME."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
    }


def claude_env(home: Path, nexus_url: str, model: str) -> dict[str, str]:
    """Claude Code pointed at Nexus exactly as the README shows."""
    return {
        **base_env(home),
        "ANTHROPIC_BASE_URL": nexus_url,
        "ANTHROPIC_API_KEY": "x",
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }


CODEX_CONFIG = """\
model = "{model}"
model_provider = "nexus"
approval_policy = "never"
check_for_update_on_startup = false

[model_providers.nexus]
name = "Nexus"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "NEXUS_API_KEY"

[features]
plugins = false
remote_plugin = false
apps = false
in_app_updates = false
"""


def codex_env(home: Path, nexus_url: str, model: str) -> dict[str, str]:
    """Codex with the README's ``config.toml`` in a private CODEX_HOME."""
    env = base_env(home)
    codex_home = home / ".codex"
    codex_home.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(CODEX_CONFIG.format(model=model, url=nexus_url))
    return {**env, "CODEX_HOME": str(codex_home), "NEXUS_API_KEY": "x"}


# --- the scripted upstream --------------------------------------------------------------------


def tool_call_stream(
    model: str, calls: list[tuple[str, str, dict[str, Any]]], reasoning: str = ""
) -> list[bytes]:
    """Streamed tool calls ``(id, name, arguments)`` as vLLM sends them: optional reasoning
    first, then per call its name, then its arguments in fragments."""
    events = [sse(chunk(model, role="assistant", content=None))]
    if reasoning:
        events += [sse(chunk(model, reasoning_content=part)) for part in reasoning.split(" ")]
    for index, (call_id, name, arguments) in enumerate(calls):
        text = orjson.dumps(arguments).decode()
        third = max(1, len(text) // 3)
        pieces = [text[:third], text[third : 2 * third], text[2 * third :]]
        function = {"name": name, "arguments": ""}
        head = {"index": index, "id": call_id, "type": "function", "function": function}
        events.append(sse(chunk(model, tool_calls=[head])))
        events += [
            sse(chunk(model, tool_calls=[{"index": index, "function": {"arguments": piece}}]))
            for piece in pieces
        ]
    final = chunk(model)
    final["choices"][0]["finish_reason"] = "tool_calls"
    return [*events, sse(final), sse(usage_chunk(model)), DONE]


def text_answer_stream(model: str, text: str) -> list[bytes]:
    events = [sse(chunk(model, role="assistant", content=""))]
    events += [sse(chunk(model, content=piece)) for piece in (text[:3], text[3:])]
    final = chunk(model)
    final["choices"][0]["finish_reason"] = "stop"
    return [*events, sse(final), sse(usage_chunk(model)), DONE]


def usage_chunk(model: str) -> dict[str, Any]:
    last = chunk(model)
    last["choices"] = []
    last["usage"] = {"prompt_tokens": 1200, "completion_tokens": 20, "total_tokens": 1220}
    return last


def completion_message(model: str, message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-agent",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 20, "total_tokens": 1220},
    }


class AgentUpstream(FakeOpenAI):
    """An OpenAI-compatible model scripted for one agent turn, by what each request holds
    rather than by arrival order (agents may send side requests, e.g. a title):

    - it holds no tool result yet and offers one of ``calls`` (tool name -> arguments, first
      offered wins: Codex's shell tool is ``exec_command``, older ones named it ``shell``): call
      it (with ``parallel``, call every offered one in one answer, after ``reasoning``);
    - it holds a tool result: answer ``FINAL_TEXT``;
    - anything else: a short plain answer.
    """

    def __init__(
        self, calls: dict[str, dict[str, Any]], parallel: bool = False, reasoning: str = ""
    ) -> None:
        super().__init__([MODEL])
        self.candidates = calls
        self.parallel = parallel
        self.reasoning = reasoning

    def chats(self) -> list[dict[str, Any]]:
        return [r.json for r in self.calls("/v1/chat/completions")]

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if path != "/v1/chat/completions":
            return super().default(method, path, raw)
        body = orjson.loads(raw)
        model = body.get("model", MODEL)
        messages = body.get("messages") or []
        offered = {(t.get("function") or {}).get("name") for t in body.get("tools") or []}
        if any(m.get("role") == "tool" for m in messages):
            message: dict[str, Any] = {"role": "assistant", "content": FINAL_TEXT}
            if body.get("stream"):
                return Reply(events=text_answer_stream(model, FINAL_TEXT))
            return Reply(json=completion_message(model, message, "stop"))
        tools = [name for name in self.candidates if name in offered]
        if tools:
            chosen = tools if self.parallel else tools[:1]
            calls = [(f"call_{i}", name, self.candidates[name]) for i, name in enumerate(chosen)]
            if body.get("stream"):
                return Reply(events=tool_call_stream(model, calls, self.reasoning))
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": orjson.dumps(args).decode()},
                    }
                    for call_id, name, args in calls
                ],
            }
            return Reply(json=completion_message(model, message, "tool_calls"))
        if body.get("stream"):
            return Reply(events=text_answer_stream(model, "ok"))
        return Reply(json=completion_message(model, {"role": "assistant", "content": "ok"}, "stop"))


def tool_results(chats: list[dict[str, Any]]) -> list[str]:
    """The text of every ``tool`` message the upstream was sent, in order."""
    found = []
    for body in chats:
        for message in body.get("messages") or []:
            if message.get("role") != "tool":
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(str(part.get("text", "")) for part in content)
            found.append(str(content))
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "work"
    folder.mkdir()
    yield folder


def history(nexus_url: str) -> list[dict[str, Any]]:
    """Nexus's own record of the requests it served (``GET /v1/history``)."""
    answer = httpx2.get(nexus_url + "/v1/history", timeout=10)
    answer.raise_for_status()
    entries: list[dict[str, Any]] = answer.json()["data"]
    return entries
