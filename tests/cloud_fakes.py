"""Minimal fake Anthropic and Gemini servers, for tests about routing around the cloud
(privacy, secrets) rather than about the translation itself (``test_anthropic_backend.py`` and
``test_google_backend.py`` hold the full fakes, with schema checks)."""

from __future__ import annotations

from typing import Any

import orjson

from tests.fakes import FakeUpstream, Recorded, Reply, sse


class FakeClaude(FakeUpstream):
    """Anthropic's API, minimal: the free model list and a plain Messages answer."""

    max_input_tokens: int | None = 200000
    max_tokens: int | None = None  # what the list reports as the model's largest max_tokens

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if method == "GET" and path == "/v1/models":
            data = [
                {
                    "type": "model",
                    "id": m,
                    "max_input_tokens": self.max_input_tokens,
                    "max_tokens": self.max_tokens,
                }
                for m in self.models
            ]
            return Reply(json={"data": data, "has_more": False})
        if method == "POST" and path == "/v1/messages":
            if orjson.loads(raw).get("stream"):
                return Reply(events=claude_stream("from claude"))
            return Reply(json=claude_message("from claude"))
        return None

    def generations(self) -> list[Recorded]:
        return self.calls("/v1/messages")


def claude_message(text: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }


def claude_stream(text: str) -> list[bytes]:
    def event(kind: str, **data: Any) -> bytes:
        return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **data}) + b"\n\n"

    start = {**claude_message(""), "content": [], "stop_reason": None}
    delta = {"type": "text_delta", "text": text}
    return [
        event("message_start", message=start),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=0, delta=delta),
        event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 2}),
        event("message_stop"),
    ]


class FakeGoogle(FakeUpstream):
    """Gemini, minimal: the model list, generateContent and its SSE stream."""

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if method == "GET" and path == "/v1beta/models":
            models = [
                {
                    "name": f"models/{m}",
                    "inputTokenLimit": 1048576,
                    "supportedGenerationMethods": ["generateContent"],
                }
                for m in self.models
            ]
            return Reply(json={"models": models})
        if path.endswith(":generateContent"):
            return Reply(json=gemini_answer("from gemini"))
        if path.endswith(":streamGenerateContent"):
            return Reply(events=[sse(gemini_answer("from gemini"))])
        return None

    def generations(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/v1beta/models/")]


def gemini_answer(text: str) -> dict[str, Any]:
    content = {"role": "model", "parts": [{"text": text}]}
    return {"candidates": [{"content": content, "finishReason": "STOP"}]}
