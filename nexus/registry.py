"""Backends and their models: plain records, a model index and in-flight counters. No I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .config import CLOUD_TYPES
from .redact import redact_url, scrub, url_password

# Where a backend came from: the config file (``static``), the admin API (``manual``), mDNS
# (``mdns``) or a probe of the usual local ports (``probe``). Only the first two were chosen by
# the user; only they receive a client's own credentials.
USER_SOURCES = frozenset({"static", "manual"})


class Status(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    context_length: int | None = None
    vision: bool = False
    tools: bool = False
    json_mode: bool = False
    embeddings: bool = False
    # True when the server itself reported the capabilities (Ollama's /api/show); False when
    # they were guessed from the model's name, and a "no" may be wrong.
    reported: bool = False
    # The largest answer the model may give, when its server says (Anthropic's max_tokens).
    max_output_tokens: int | None = None

    def capabilities(self) -> dict[str, bool]:
        return {
            "vision": self.vision,
            "tools": self.tools,
            "json_mode": self.json_mode,
            "embeddings": self.embeddings,
        }


@dataclass(slots=True, eq=False)
class Backend:
    """One inference server. Mutable state is changed only by health, dispatch and discovery."""

    name: str
    url: str
    type: str
    priority: int = 50
    zone: str = "restricted"
    tier: int = 1
    api_key: str | None = None
    source: str = "static"  # static | manual | mdns | probe
    version: str | None = None  # as announced (mDNS TXT "version")
    # Why the backend cannot be used or probed at all right now: its configuration (a missing
    # API key) or, for a managed backend, a server process that is not running.
    unavailable: str | None = None
    status: Status = Status.UNKNOWN
    models: dict[str, Model] = field(default_factory=dict)
    in_flight: int = 0
    total_requests: int = 0
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_check: float | None = None
    latency_ms: float | None = None  # of the last health probe
    max_concurrent: int | None = None  # configured capacity
    slots: int | None = None  # capacity the server reports (llama.cpp's slots)
    ewma_latency_ms: float | None = None  # of real requests, whole answer
    ewma_ttft_ms: float | None = None  # of real requests, time to the first byte or event

    @property
    def location(self) -> str:
        return "cloud" if self.type in CLOUD_TYPES else "local"

    @property
    def healthy(self) -> bool:
        return self.status is Status.HEALTHY

    @property
    def user_configured(self) -> bool:
        """Added by the user (file or admin API), not found on the network."""
        return self.source in USER_SOURCES

    @property
    def shown_url(self) -> str:
        """The URL as shown anywhere: without its password."""
        return redact_url(self.url)

    @property
    def secrets(self) -> tuple[str | None, str | None]:
        """What must never be shown: the configured key and the URL's password."""
        return (self.api_key, url_password(self.url))

    def redact(self, text: str) -> str:
        """``text`` (an upstream error, say) without this backend's key or URL password."""
        return scrub(text, self.secrets)

    def capacity(self, default: int) -> int:
        """Requests it takes at once: what the server reports, else its entry, else ``default``."""
        return self.slots or self.max_concurrent or default

    def observe(self, latency_ms: float, ttft_ms: float | None) -> None:
        """Fold one real request's timings into the moving averages (weight 0.2)."""
        self.ewma_latency_ms = _ewma(self.ewma_latency_ms, latency_ms)
        if ttft_ms is not None:
            self.ewma_ttft_ms = _ewma(self.ewma_ttft_ms, ttft_ms)

    def find_model(self, model: str) -> str | None:
        """The backend's own name for ``model``: exact, else Ollama's implicit ``:latest`` tag."""
        if model in self.models:
            return model
        if ":" not in model and f"{model}:latest" in self.models:
            return f"{model}:latest"
        return None


def _ewma(current: float | None, sample: float, alpha: float = 0.2) -> float:
    return sample if current is None else current + alpha * (sample - current)


class Registry:
    """All known backends by name, with a model -> backends index kept in step."""

    def __init__(self, backends: Iterable[Backend] = ()) -> None:
        self._backends: dict[str, Backend] = {}
        self._index: dict[str, list[Backend]] = {}
        for backend in backends:
            self.add(backend)

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, name: str) -> Backend | None:
        return self._backends.get(name)

    def add(self, backend: Backend) -> None:
        if backend.name in self._backends:
            raise ValueError(f"a backend named '{backend.name}' is already registered")
        self._backends[backend.name] = backend
        self._reindex()

    def remove(self, name: str) -> Backend | None:
        backend = self._backends.pop(name, None)
        if backend is not None:
            self._reindex()
        return backend

    def set_models(self, backend: Backend, models: Iterable[Model]) -> None:
        backend.models = {model.id: model for model in models}
        self._reindex()

    def backends_for(self, model: str) -> list[Backend]:
        """Every backend (any status) that lists ``model``; a bare name also matches ``:latest``."""
        found = self._index.get(model)
        if found is None and ":" not in model:
            found = self._index.get(f"{model}:latest")
        return list(found) if found else []

    def model_ids(self, *, healthy_only: bool = True) -> list[str]:
        ids = {
            model
            for backend in self._backends.values()
            if backend.healthy or not healthy_only
            for model in backend.models
        }
        return sorted(ids)

    def _reindex(self) -> None:
        index: dict[str, list[Backend]] = {}
        for backend in self._backends.values():
            for model in backend.models:
                index.setdefault(model, []).append(backend)
        self._index = index
