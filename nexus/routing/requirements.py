"""What a request needs from a backend, derived from its body and headers. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Requirements:
    vision: bool = False
    tools: bool = False
    json_mode: bool = False
    estimated_tokens: int = 0
    stream: bool = False
    high_priority: bool = False


def chat_requirements(body: Mapping[str, Any], headers: Mapping[str, str]) -> Requirements:
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
    return Requirements(
        vision=vision,
        tools=bool(body.get("tools")) or bool(body.get("functions")),
        json_mode=json_mode,
        estimated_tokens=chars // CHARS_PER_TOKEN,
        stream=body.get("stream") is True,
        high_priority=headers.get("x-nexus-priority", "").strip().lower() == "high",
    )


def embedding_requirements(body: Mapping[str, Any]) -> Requirements:
    """Each input of a batch is embedded on its own: the context must fit the longest one, not
    their sum. An input is a string, or a list of token ids (counted exactly)."""
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and _is_tokens(value)):
        return Requirements(estimated_tokens=_tokens(value))
    items = value if isinstance(value, list) else ()
    return Requirements(estimated_tokens=max(map(_tokens, items), default=0))


def _is_tokens(value: list[Any]) -> bool:
    return isinstance(value[0], int)


def _tokens(item: Any) -> int:
    if isinstance(item, str):
        return len(item) // CHARS_PER_TOKEN
    return len(item) if isinstance(item, list) else 0
