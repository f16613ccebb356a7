"""Fakes for the agent protocols' tests (``/v1/messages``, ``/v1/responses``): a full Anthropic
upstream (model list, Messages, count_tokens) and scripted answers with a tool call, in each
upstream dialect, whose arguments arrive in several fragments where the dialect streams them.

``Rig`` is one Nexus in front of one fake of a given kind, with the kind's paths and scripts,
so a test is written once and run against an OpenAI-compatible, an Ollama and an Anthropic
upstream alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from tests.fakes import (
    DONE,
    FakeOllama,
    FakeOpenAI,
    FakeUpstream,
    Recorded,
    Reply,
    chunk,
    sse,
    text_stream,
)
from tests.fakes import completion as chat_completion
from tests.harness import NexusServer

ANTHROPIC_KEY_VAR = "NEXUS_TEST_AGENT_ANTHROPIC_KEY"
ANTHROPIC_KEY = "sk-ant-agent-test-key-0123456789"
CLAUDE = "claude-sonnet-5-5"
DIRECT = {"type": "direct"}

# --- Anthropic ---------------------------------------------------------------------------------


def claude_event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def claude_message(*content: dict[str, Any], stop: str = "end_turn") -> dict[str, Any]:
    return {
        "id": "msg_fake01",
        "type": "message",
        "role": "assistant",
        "model": CLAUDE,
        "content": list(content),
        "stop_reason": stop,
        "stop_sequence": None,
        "stop_details": None,
        "container": None,
        "usage": {
            "input_tokens": 11,
            "output_tokens": 3,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 5,
            "cache_creation": None,
            "inference_geo": None,
            "output_tokens_details": None,
            "server_tool_use": None,
            "service_tier": "standard",
        },
    }


def claude_text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "citations": None}


def _claude_start() -> bytes:
    start = claude_message()
    start["stop_reason"] = None
    return claude_event("message_start", message=start)


def claude_text_events(*words: str) -> list[bytes]:
    out = [_claude_start(), claude_event("ping")]
    block = {"type": "text", "text": "", "citations": None}
    out.append(claude_event("content_block_start", index=0, content_block=block))
    for word in words:
        delta = {"type": "text_delta", "text": word}
        out.append(claude_event("content_block_delta", index=0, delta=delta))
    out.append(claude_event("content_block_stop", index=0))
    return [*out, claude_end("end_turn", 4)]


def claude_end(stop: str, output_tokens: int) -> bytes:
    """``message_delta`` (as complete as Anthropic sends it) and ``message_stop``."""
    delta = {"stop_reason": stop, "stop_sequence": None, "stop_details": None, "container": None}
    usage = {
        "input_tokens": 11,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 5,
        "output_tokens_details": None,
        "server_tool_use": None,
    }
    return claude_event("message_delta", delta=delta, usage=usage) + claude_event("message_stop")


def claude_tool_events(call_id: str, name: str, fragments: list[str]) -> list[bytes]:
    out = [_claude_start()]
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}, "caller": DIRECT}
    out.append(claude_event("content_block_start", index=0, content_block=block))
    for fragment in fragments:
        delta = {"type": "input_json_delta", "partial_json": fragment}
        out.append(claude_event("content_block_delta", index=0, delta=delta))
    out.append(claude_event("content_block_stop", index=0))
    return [*out, claude_end("tool_use", 9)]


class FakeAnthropic(FakeUpstream):
    """Anthropic's API: the model list, Messages (plain text unless scripted) and
    ``count_tokens`` answering ``input_tokens``."""

    input_tokens = 1234

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if method == "GET" and path == "/v1/models":
            data = [
                {
                    "type": "model",
                    "id": name,
                    "display_name": name,
                    "created_at": "2025-01-01T00:00:00Z",
                    "max_input_tokens": 200000,
                    "max_tokens": 64000,
                }
                for name in self.models
            ]
            return Reply(json={"data": data, "has_more": False, "first_id": None, "last_id": None})
        if method == "POST" and path == "/v1/messages":
            if orjson.loads(raw).get("stream"):
                return Reply(events=claude_text_events("Hel", "lo"))
            return Reply(json=claude_message(claude_text("Hello!")))
        if method == "POST" and path == "/v1/messages/count_tokens":
            return Reply(json={"input_tokens": self.input_tokens})
        return None


# --- OpenAI-compatible and Ollama tool calls ---------------------------------------------------


def openai_tool_events(call_id: str, name: str, fragments: list[str]) -> list[bytes]:
    """A chat stream whose one tool call's arguments come in ``fragments``."""
    first = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    events = [sse(chunk(role="assistant", content=None, tool_calls=[first]))]
    for fragment in fragments:
        more = {"index": 0, "function": {"arguments": fragment}}
        events.append(sse(chunk(tool_calls=[more])))
    final = chunk()
    final["choices"][0]["finish_reason"] = "tool_calls"
    usage = {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}
    tail = {**chunk(), "choices": [], "usage": usage}
    return [*events, sse(final), sse(tail), DONE]


def openai_tool_completion(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    body = chat_completion()
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [call],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    return body


def ollama_tool_message(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    call = {"function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def ollama_done(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 20,
        "eval_count": 8,
    }


# --- one Nexus in front of one upstream, by kind ------------------------------------------------


@dataclass
class Rig:
    """A Nexus in front of one fake upstream of ``kind``: "openai", "ollama" or "anthropic"."""

    kind: str
    fake: FakeUpstream
    nexus: NexusServer
    model: str

    @property
    def path(self) -> str:
        """Where the upstream is asked for a generation."""
        return {"openai": "/v1/chat/completions", "ollama": "/api/chat"}.get(
            self.kind, "/v1/messages"
        )

    def generations(self) -> list[Recorded]:
        return self.fake.calls(self.path)

    def last(self) -> dict[str, Any]:
        """The body of the last generation request the upstream received."""
        calls = self.generations()
        assert calls, f"the {self.kind} upstream received no {self.path}"
        body: dict[str, Any] = calls[-1].json
        return body

    def push_text(self, words: list[str], *, stream: bool) -> str:
        """The next answer is ``words``; returns their text."""
        text = "".join(words)
        if self.kind == "openai":
            if stream:  # with the usage chunk a client asks for with include_usage
                usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 0}
                usage["total_tokens"] = 9 + len(words)
                last = sse({**chunk(self.model), "choices": [], "usage": usage})
                reply = Reply(events=[*text_stream(words, self.model)[:-1], last, DONE])
            else:
                reply = Reply(json=chat_completion(self.model, text))
        elif self.kind == "ollama":
            if stream:
                lines = [
                    {"model": self.model, "message": {"role": "assistant", "content": w}}
                    for w in words
                ]
                events = [orjson.dumps({**line, "done": False}) + b"\n" for line in lines]
                events.append(orjson.dumps(ollama_done(self.model)) + b"\n")
                reply = Reply(events=events, content_type="application/x-ndjson")
            else:
                done = ollama_done(self.model)
                done["message"]["content"] = text
                reply = Reply(json=done)
        elif stream:
            reply = Reply(events=claude_text_events(*words))
        else:
            reply = Reply(json=claude_message(claude_text(text)))
        self.fake.push(self.path, reply)
        return text

    def push_tool_call(self, call_id: str, name: str, fragments: list[str], *, stream: bool) -> str:
        """The next answer calls ``name`` with the arguments ``fragments`` make together
        (streamed fragment by fragment where the dialect does so); returns the call's id as
        the client will see it (Ollama's are made up by Nexus: "")."""
        arguments = "".join(fragments)
        if self.kind == "openai":
            if stream:
                reply = Reply(events=openai_tool_events(call_id, name, fragments))
            else:
                reply = Reply(json=openai_tool_completion(call_id, name, arguments))
        elif self.kind == "ollama":
            message = ollama_tool_message(name, orjson.loads(arguments))
            if stream:
                line = {"model": self.model, "message": message, "done": False}
                lines = [line, ollama_done(self.model)]
                events = [orjson.dumps(item) + b"\n" for item in lines]
                reply = Reply(events=events, content_type="application/x-ndjson")
            else:
                reply = Reply(json={**ollama_done(self.model), "message": message})
            call_id = ""
        elif stream:
            reply = Reply(events=claude_tool_events(call_id, name, fragments))
        else:
            block = {"type": "tool_use", "id": call_id, "name": name, "input": {}, "caller": DIRECT}
            block["input"] = orjson.loads(arguments)
            reply = Reply(json=claude_message(block, stop="tool_use"))
        self.fake.push(self.path, reply)
        return call_id


def make_fake(kind: str, model: str) -> FakeUpstream:
    if kind == "openai":
        return FakeOpenAI([model])
    if kind == "ollama":
        return FakeOllama([model])
    return FakeAnthropic([model])


def backend_entry(kind: str, fake: FakeUpstream, name: str = "up") -> dict[str, Any]:
    """The config entry of ``fake`` (Anthropic's with its key from the environment)."""
    entry: dict[str, Any] = {"name": name, "url": fake.url}
    if kind == "openai":
        entry["type"] = "vllm"
    elif kind == "ollama":
        entry["type"] = "ollama"
    else:
        entry.update(type="anthropic", api_key_env=ANTHROPIC_KEY_VAR)
    return entry


MODELS = {"openai": "mock-model", "ollama": "llama3.2:latest", "anthropic": CLAUDE}
