"""What a model can do, guessed from its name when the server does not say.

Servers that report real data (Ollama's /api/show, vLLM's ``max_model_len``, llama.cpp's /props)
win over these guesses; the guesses only fill gaps.
"""

from __future__ import annotations

import re

from ..registry import Model

_VISION = ("vision", "llava", "bakllava", "pixtral", "moondream", "minicpm-v", "gpt-4o", "-vl")
_TOOLS_LOCAL = (
    "hermes", "functionary", "command-r", "tool", "llama3.1", "llama3.2", "llama3.3", "llama-3.1",
    "llama-3.2", "llama-3.3", "llama4", "qwen2.5", "qwen3", "mistral", "firefunction",
)  # fmt: skip
_EMBEDDING = ("embed", "minilm", "bge-", "e5-", "gte-", "mxbai", "nomic-embed")
_SIZES = (("128k", 131072), ("64k", 65536), ("32k", 32768), ("16k", 16384), ("8k", 8192))
_SIZE_RE = re.compile(r"(?<![0-9])(128|64|32|16|8)k(?![a-z0-9])")


def guess_model(model_id: str, backend_type: str) -> Model:
    name = model_id.lower()
    if backend_type == "openai":
        return _guess_openai(model_id, name)
    embeddings = any(mark in name for mark in _EMBEDDING)
    tools = not embeddings and any(mark in name for mark in _TOOLS_LOCAL)
    return Model(
        id=model_id,
        context_length=_context_from_name(name),
        vision=any(mark in name for mark in _VISION),
        tools=tools,
        json_mode=tools,
        embeddings=embeddings,
    )


def _guess_openai(model_id: str, name: str) -> Model:
    embeddings = "embedding" in name
    chat = name.startswith(("gpt-", "o1", "o3", "o4", "chatgpt")) and not embeddings
    if name.startswith(("gpt-4o", "gpt-4.1", "gpt-4-turbo", "gpt-5", "o1", "o3", "o4", "chatgpt")):
        context: int | None = 128000
    elif name.startswith("gpt-4-32k"):
        context = 32768
    elif name.startswith("gpt-4"):
        context = 8192
    elif name.startswith("gpt-3.5-turbo"):
        context = 16385
    else:
        context = 8191 if embeddings else None
    return Model(
        id=model_id,
        context_length=context,
        vision=name.startswith(("gpt-4o", "gpt-4.1", "gpt-4-turbo", "gpt-5", "o1", "o3", "o4")),
        tools=chat,
        json_mode=chat,
        embeddings=embeddings,
    )


def _context_from_name(name: str) -> int | None:
    match = _SIZE_RE.search(name)
    if match is None:
        return None
    return dict(_SIZES)[match.group(0)]
