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
    value = body.get("input")
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    chars = sum(len(item) for item in items if isinstance(item, str))
    return Requirements(estimated_tokens=chars // CHARS_PER_TOKEN)
