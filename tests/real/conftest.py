"""The real-backend tier: llama.cpp's llama-server (built by scripts/build-llama-server) serving
SmolLM2-135M and all-MiniLM-L6-v2 (put in the cache by scripts/fetch-models --embed), managed by
Nexus. scripts/test prepares all of it; when something is missing, the tier says so and skips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus.config import cache_dir
from nexus.managed import EMBEDDED_MODEL_FILE, ManagedError, find_binary
from tests.harness import LoopThread, NexusServer, settings_for

MINILM_FILE = "all-minilm-l6-v2-f16.gguf"
PREPARE = "run scripts/build-llama-server and scripts/fetch-models --embed (scripts/test does)"


def cached(name: str) -> Path:
    path = cache_dir() / "models" / name
    if not path.is_file():
        pytest.skip(f"real-backend tier: {path} is missing; {PREPARE}")
    return path


def llama_server() -> str:
    try:
        return find_binary(None)
    except ManagedError as exc:
        pytest.skip(f"real-backend tier: {exc}; {PREPARE}")


def start(loop_thread: LoopThread, managed: dict[str, object], name: str) -> NexusServer:
    settings = settings_for(
        backends=[{"name": name, "type": "llamacpp", "managed": managed}],
        server={"request_timeout_seconds": 120},
    )
    return NexusServer(loop_thread, settings).start()


@pytest.fixture(scope="module")
def smollm(loop_thread: LoopThread) -> Iterator[NexusServer]:
    binary = llama_server()
    managed = {
        "model": str(cached(EMBEDDED_MODEL_FILE)),
        "binary": binary,
        "alias": "smollm2-135m",
        "slots": 4,
        "context": 4096,
        "threads": 2,
        "extra_args": ["--metrics"],
    }
    server = start(loop_thread, managed, "llama")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def minilm(loop_thread: LoopThread) -> Iterator[NexusServer]:
    binary = llama_server()
    managed = {
        "model": str(cached(MINILM_FILE)),
        "binary": binary,
        "alias": "all-minilm-l6-v2",
        "slots": 2,
        "context": 1024,
        "threads": 2,
        "embeddings": True,
        "pooling": "mean",
        "extra_args": ["--batch-size", "512", "--ubatch-size", "512"],
    }
    server = start(loop_thread, managed, "minilm")
    yield server
    server.stop()
