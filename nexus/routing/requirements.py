"""What a request needs from a backend, derived from its body and headers. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
# A bound on the prompt for costs: one token per this many bytes of the whole request (tools,
# images and JSON included; a CJK character is three bytes and about one token).
BYTES_PER_TOKEN_BOUND = 3


@dataclass(frozen=True, slots=True)
class Requirements:
    vision: bool = False
    tools: bool = False
    json_mode: bool = False
    estimated_tokens: int = 0
    stream: bool = False
    high_priority: bool = False
    max_tokens: int | None = None  # the client's output limit, when it set one
    request_bytes: int = 0  # the body's size: a bound on the prompt that counts everything
    embeddings: bool = False

    @property
    def prompt_bound(self) -> int:
        """The prompt's size for a worst-case cost: never below the text estimate."""
        return max(self.estimated_tokens, self.request_bytes // BYTES_PER_TOKEN_BOUND)


def chat_requirements(
    body: Mapping[str, Any], headers: Mapping[str, str], size: int = 0
) -> Requirements:
    """Vision (image parts), tools (``tools`` or legacy ``functions``), JSON mode
    (``json_object`` or ``json_schema``), a prompt size estimate, streaming and priority."""
    vision = False
    chars = 0
    for message in body.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, Mapping):
                    continue
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    chars += len(part["text"])
                elif kind in ("image_url", "input_image", "image"):
                    vision = True
    response_format = body.get("response_format")
    json_mode = isinstance(response_format, Mapping) and response_format.get("type") in (
        "json_object",
        "json_schema",
    )
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    return Requirements(
        vision=vision,
        tools=bool(body.get("tools")) or bool(body.get("functions")),
        json_mode=json_mode,
        estimated_tokens=chars // CHARS_PER_TOKEN,
        stream=body.get("stream") is True,
        high_priority=headers.get("x-nexus-priority", "").strip().lower() == "high",
        max_tokens=limit if type(limit) is int and limit >= 0 else None,
        request_bytes=size,
    )


def embedding_requirements(body: Mapping[str, Any], size: int = 0) -> Requirements:
    """Each input of a batch is embedded on its own: the context must fit the longest one, not
    their sum. An input is a string, or a list of token ids (counted exactly)."""
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and _is_tokens(value)):
        return Requirements(estimated_tokens=_tokens(value), request_bytes=size, embeddings=True)
    items = value if isinstance(value, list) else ()
    longest = max(map(_tokens, items), default=0)
    return Requirements(estimated_tokens=longest, request_bytes=size, embeddings=True)


def _is_tokens(value: list[Any]) -> bool:
    return isinstance(value[0], int)


def _tokens(item: Any) -> int:
    if isinstance(item, str):
        return len(item) // CHARS_PER_TOKEN
    return len(item) if isinstance(item, list) else 0
