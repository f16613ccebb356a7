"""Backend adapters, one per API dialect, chosen by backend ``type``."""

from __future__ import annotations

from .anthropic import AnthropicAdapter
from .base import Adapter, Call, Completion, EventStream, Inbound, StartedStream, Timeouts
from .google import GoogleAdapter
from .http1 import HTTP1Client
from .ollama import OllamaAdapter
from .openai import PROFILES, OpenAIAdapter
from .proxy import ProxyRules

__all__ = [
    "Adapter",
    "Adapters",
    "Call",
    "Completion",
    "EventStream",
    "Inbound",
    "StartedStream",
    "HTTP1Client",
    "ProxyRules",
    "Timeouts",
    "SUPPORTED_TYPES",
]

SUPPORTED_TYPES = frozenset({"ollama", "anthropic", "google", *PROFILES})


class Adapters:
    """One adapter instance per dialect, sharing the pooled upstream client."""

    def __init__(self, client: HTTP1Client, timeouts: Timeouts) -> None:
        self._openai = OpenAIAdapter(client, timeouts)
        self._ollama = OllamaAdapter(client, timeouts)
        self._google = GoogleAdapter(client, timeouts)
        self._anthropic = AnthropicAdapter(client, timeouts)

    def for_type(self, backend_type: str) -> Adapter | None:
        if backend_type == "ollama":
            return self._ollama
        if backend_type == "anthropic":
            return self._anthropic
        if backend_type in PROFILES:
            return self._openai
        if backend_type == "google":
            return self._google
        return None
