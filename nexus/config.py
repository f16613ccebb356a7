"""Settings: the TOML file, ``NEXUS_*`` environment variables and CLI flags, validated once.

Precedence is CLI flag > ``NEXUS_*`` env > file > default. This module is the only reader of the
environment. Unknown keys are errors that name the key and suggest the closest known one.
"""

from __future__ import annotations

import base64
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .redact import redact_url, scrub

MAX_ALIAS_HOPS = 3
LOCAL_TYPES = frozenset({"ollama", "vllm", "llamacpp", "lmstudio", "exo", "generic"})
CLOUD_TYPES = frozenset({"openai", "anthropic", "google"})
BackendType = Literal[
    "ollama", "vllm", "llamacpp", "lmstudio", "exo", "generic", "openai", "anthropic", "google"
]
DEFAULT_CONFIG_PATH = "nexus.toml"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    # Upper bound for a non-streaming upstream call and for a stream's first event.
    request_timeout_seconds: Annotated[float, Field(gt=0)] = 300
    # A stream may be silent for at most this long between two events (idle, not total).
    stream_idle_timeout_seconds: Annotated[float, Field(gt=0)] = 120
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 5
    # How long in-flight requests may take to finish after SIGINT/SIGTERM.
    shutdown_timeout_seconds: Annotated[float, Field(ge=0)] = 10
    # Client connections open at once; past it a new one gets a 503 and is closed (ours).
    max_connections: Annotated[int, Field(ge=1)] = 1024
    # The whole request head, and the whole body, must arrive within these (408 past them;
    # not reset by each byte that trickles in) (ours).
    header_timeout_seconds: Annotated[float, Field(gt=0)] = 10
    body_timeout_seconds: Annotated[float, Field(gt=0)] = 60
    # Upstream connections open at once, over all backends (idle pooled ones included).
    max_concurrent_requests: Annotated[int, Field(ge=1)] = 1000
    # The largest upstream answer taken: a whole body, or a whole stream (ours).
    max_response_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    # The admin API (adding and removing backends) answers only on loopback, unless a key is
    # configured: then it answers anyone who sends it as a bearer token (ours).
    admin_key_env: str | None = None
    # Host names (without port) accepted besides localhost, 127.0.0.1, ::1 and ``host``; any
    # other Host is refused, so a DNS-rebinding page cannot read Nexus. "*" accepts any (ours).
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        return [host_name(entry) for entry in value]

    def admin_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        return secret(self.admin_key_env, environ)

    def require_admin_key(self, environ: Mapping[str, str] | None = None) -> None:
        """A configured admin key that is missing must stop start-up: serving on would leave
        the admin API open on loopback, which the configuration asked to close."""
        if self.admin_key_env and self.admin_key(environ) is None:
            raise ConfigError(
                f"server.admin_key_env: the environment variable {self.admin_key_env} is not set "
                "(or empty); set it to the admin key, or remove admin_key_env"
            )


class DiscoverySettings(_Section):
    enabled: bool = True
    service_types: list[str] = Field(
        default_factory=lambda: ["_ollama._tcp.local", "_llm._tcp.local"]
    )
    grace_period_seconds: Annotated[int, Field(ge=0)] = 60
    # Where mDNS runs: None means every interface; tests and scripts pin ["127.0.0.1"].
    interfaces: list[str] | None = None
    advertise: bool = True
    # Probed once at start on 127.0.0.1: Ollama, LM Studio, llama.cpp's default ports.
    probe_local_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=lambda: [11434, 1234, 8080]
    )


class HealthCheckSettings(_Section):
    enabled: bool = True
    interval_seconds: Annotated[float, Field(gt=0)] = 30
    timeout_seconds: Annotated[float, Field(gt=0)] = 5
    failure_threshold: Annotated[int, Field(ge=1)] = 3
    recovery_threshold: Annotated[int, Field(ge=1)] = 2


class RoutingWeights(_Section):
    priority: Annotated[int, Field(ge=0)] = 50
    load: Annotated[int, Field(ge=0)] = 30
    latency: Annotated[int, Field(ge=0)] = 20


class TrafficPolicy(_Section):
    model_pattern: Annotated[str, Field(min_length=1)]  # a glob: "gpt-4*", "claude-*", "*"
    privacy: Literal["unrestricted", "restricted"] = "unrestricted"
    min_tier: Annotated[int, Field(ge=1, le=5)] | None = None
    max_cost_per_request: Annotated[float, Field(ge=0)] | None = None
    fallback_allowed: bool = True

    @field_validator("privacy", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class BudgetSettings(_Section):
    monthly_limit_usd: Annotated[float, Field(gt=0)] | None = None
    soft_limit_percent: Annotated[float, Field(gt=0, le=100)] = 75.0
    hard_limit_action: Literal["warn", "block_cloud", "block_all"] = "warn"
    reconciliation_interval_secs: Annotated[int, Field(ge=1)] = 60


class PricingEntry(_Section):
    """A ``[[pricing]]`` entry: USD per million tokens for the models its glob matches (ours)."""

    model_pattern: Annotated[str, Field(min_length=1)]
    backend: Annotated[str, Field(min_length=1)] | None = None  # a glob over backend names
    input_per_mtok: Annotated[float, Field(ge=0)]
    output_per_mtok: Annotated[float, Field(ge=0)]
    cached_input_per_mtok: Annotated[float, Field(ge=0)] | None = None  # default: input's
    cache_write_per_mtok: Annotated[float, Field(ge=0)] | None = None  # default: input's


class StateSettings(_Section):
    """Where what must survive a restart (month-to-date spend, keys) is kept (ours): an embedded
    SQLite file, or a Redis server that replicas share."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    path: str | None = None  # default: $XDG_STATE_HOME/nexus/state.db (~/.local/state/nexus)
    flush_interval_seconds: Annotated[float, Field(gt=0, le=1)] = 0.2
    # backend = "redis": redis://[user@]host[:port][/db] or rediss:// (TLS); the password is
    # never in the file, but in the environment variable redis_password_env names.
    redis_url: str | None = None
    redis_password_env: str | None = None
    redis_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9:._-]{1,64}$")] = "nexus:"

    @model_validator(mode="after")
    def _check_redis(self) -> StateSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend = 'redis' needs redis_url (redis://host:6379/0)")
        if self.redis_url is not None:
            redis_address(self.redis_url)
        return self


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where the shared state lives: ``[state] redis_url``, checked."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None
    shown: str  # as logged: never a password (there is none in the URL)


def redis_address(url: str) -> RedisAddress:
    """``redis://[user@]host[:port][/db]`` or ``rediss://``; a ValueError that says what is
    wrong otherwise (a password in the URL among them: it belongs in redis_password_env)."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"redis_url '{shown}' is not a URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"redis_url '{shown}' must start with redis:// or rediss:// (TLS)")
    if not parts.hostname:
        raise ValueError(f"redis_url '{shown}' has no host")
    if parts.password is not None:
        raise ValueError(
            f"redis_url '{shown}' carries a password: put it in an environment variable and "
            "name that variable in redis_password_env"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"redis_url '{shown}': no query or fragment is understood")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and int(path) < 16384):
        raise ValueError(f"redis_url '{shown}': the path is the database number (/0)")
    return RedisAddress(
        tls=parts.scheme == "rediss",
        host=parts.hostname,
        port=port or 6379,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        shown=shown,
    )


KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
MAX_KEY_MODELS = 64


def _check_key_name(value: str) -> str:
    if not KEY_NAME.fullmatch(value):
        raise ValueError("a key's name is 1-64 letters, digits, '.', '_' or '-'")
    return value


def _check_models(value: list[str]) -> list[str]:
    if len(value) > MAX_KEY_MODELS or any(not 0 < len(m) <= 256 for m in value):
        raise ValueError(f"models: at most {MAX_KEY_MODELS} globs of 1-256 characters")
    return value


KeyName = Annotated[str, AfterValidator(_check_key_name)]


class KeyLimits(_Section):
    """A client key's settings (ours): the same names in the admin API, ``[[auth.keys]]`` and
    the CLI's flags. Unset means unlimited."""

    owner: Annotated[str, Field(max_length=256)] | None = None
    expires_at: AwareDatetime | None = None  # RFC 3339, with its offset
    models: Annotated[list[str], AfterValidator(_check_models)] | None = None  # globs
    max_zone: Literal["restricted", "open"] = "open"  # restricted: never an open-zone backend
    rpm: Annotated[int, Field(ge=1, le=10_000_000)] | None = None  # requests per minute
    tpm: Annotated[int, Field(ge=1, le=10_000_000_000)] | None = None  # tokens per minute
    max_concurrent: Annotated[int, Field(ge=1, le=100_000)] | None = None
    monthly_budget_usd: Annotated[float, Field(gt=0, le=1e9)] | None = None

    @field_validator("max_zone", mode="before")
    @classmethod
    def _lower_zone(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class ConfiguredKey(KeyLimits):
    """An ``[[auth.keys]]`` entry: a key declared by its hash (the secret stays out of the file)."""

    name: KeyName
    hash: Annotated[str, Field(pattern=KEY_HASH.pattern)]


class AuthSettings(_Section):
    """Client keys (ours). Off by default: a home lab keeps working unchanged."""

    enabled: bool = False
    keys: list[ConfiguredKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_keys(self) -> AuthSettings:
        names = [k.name for k in self.keys]
        hashes = [k.hash for k in self.keys]
        if len(set(names)) != len(names) or len(set(hashes)) != len(hashes):
            raise ValueError("each [[auth.keys]] entry needs its own name and hash")
        return self


class RoutingSettings(_Section):
    strategy: Literal["smart", "round_robin", "priority_only", "random", "least_loaded"] = "smart"
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    weights: RoutingWeights = Field(default_factory=RoutingWeights)
    aliases: dict[str, str] = Field(default_factory=dict)
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    policies: list[TrafficPolicy] = Field(default_factory=list)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    # Send a conversation (or a long shared system prompt) back to the backend that served it
    # recently, so that its prompt cache is reused (ours).
    affinity: bool = True
    affinity_ttl_seconds: Annotated[float, Field(gt=0)] = 600
    # With [state] backend = "redis": replicas share where each conversation was served, so a
    # conversation goes back to its backend whichever replica the load balancer picks (ours).
    shared_affinity: bool = False
    # Requests a backend takes at once when neither it (llama.cpp slots) nor its entry says (ours).
    default_max_concurrent: Annotated[int, Field(ge=1)] = 100

    @model_validator(mode="after")
    def _check_aliases(self) -> RoutingSettings:
        validate_aliases(self.aliases)
        # A fallback model's name goes into the X-Nexus-Fallback-Model response header.
        for model, chain in self.fallbacks.items():
            for name in (model, *chain):
                if not (0 < len(name) <= MODEL_NAME_MAX and name.isascii() and name.isprintable()):
                    raise ValueError(
                        f"fallbacks: model name {name[:MODEL_NAME_MAX]!r} must be 1 to "
                        f"{MODEL_NAME_MAX} printable ASCII characters (it is sent in a header)"
                    )
        return self


def _lowered(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


LogLevel = Annotated[
    Literal["trace", "debug", "info", "warn", "warning", "error"], BeforeValidator(_lowered)
]


class LoggingSettings(_Section):
    level: LogLevel = "info"
    format: Literal["pretty", "json"] = "pretty"
    component_levels: dict[str, LogLevel] = Field(default_factory=dict)
    enable_content_logging: bool = False

    @field_validator("format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return _lowered(value)


class QualitySettings(_Section):
    error_rate_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    ttft_penalty_threshold_ms: Annotated[int, Field(ge=0)] = 3000
    metrics_interval_seconds: Annotated[int, Field(ge=1)] = 30
    # Ours: the rolling window, how many outcomes it needs before judging, and how often an
    # excluded backend gets one trial request (half-open) so that it can come back.
    window_seconds: Annotated[float, Field(gt=0)] = 300
    min_requests: Annotated[int, Field(ge=1)] = 5
    trial_interval_seconds: Annotated[float, Field(gt=0)] = 30


class QueueSettings(_Section):
    enabled: bool = True
    max_size: Annotated[int, Field(ge=0)] = 100
    max_wait_seconds: Annotated[int, Field(ge=1)] = 30


class ManagedSettings(_Section):
    """A llama.cpp ``llama-server`` that Nexus starts, supervises and stops itself."""

    model: Annotated[str, Field(min_length=1)]  # path of the GGUF file to serve
    alias: str | None = None  # the model's name in the API; default: the file name's stem
    binary: str | None = None  # default: the build cached by scripts/, else llama-server on PATH
    slots: Annotated[int, Field(ge=1, le=256)] = 4  # requests served at once (-np)
    context: Annotated[int, Field(ge=128)] = 4096  # context shared by the slots (-c)
    threads: Annotated[int, Field(ge=1)] | None = None
    embeddings: bool = False  # serve embeddings (--embeddings --pooling ...)
    pooling: Literal["mean", "cls", "last", "none"] = "mean"
    port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0: a free loopback port
    startup_timeout_seconds: Annotated[float, Field(gt=0)] = 120
    # A Jinja chat template for llama-server (--chat-template-file): a file's path, or the name of
    # one shipped with Nexus ("chatml-tools": ChatML with function calling). Default: the model's.
    chat_template: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    extra_args: list[str] = Field(default_factory=list)

    @property
    def model_name(self) -> str:
        return self.alias or Path(self.model).name.removesuffix(".gguf")


MODEL_NAME_MAX = 256  # a model name a client may send, or the config may name

# A backend's name goes into response headers (X-Nexus-Backend), metric labels, logs and the
# admin API's path: letters, digits, ``. _ : -`` and inner spaces (mDNS instance names), <= 64.
BACKEND_NAME_MAX = 64
URL_MAX = 2048
BACKEND_NAME = re.compile(r"[A-Za-z0-9._:-](?:[A-Za-z0-9 ._:-]{0,62}[A-Za-z0-9._:-])?")


def check_backend_name(value: str) -> str:
    if not BACKEND_NAME.fullmatch(value):
        raise ValueError(
            f"a backend name is 1 to {BACKEND_NAME_MAX} ASCII letters, digits, '.', '_', ':', "
            "'-' or inner spaces"
        )
    return value


# Where a cloud backend type is served when its ``url`` is left out.
DEFAULT_URLS = {
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com",
}


class BackendSettings(_Section):
    name: Annotated[str, AfterValidator(check_backend_name)]
    url: str | None = None  # required unless the backend is managed
    type: BackendType
    managed: ManagedSettings | None = None
    priority: int = 50
    api_key_env: str | None = None
    zone: Literal["restricted", "open"] | None = None
    tier: Annotated[int, Field(ge=1, le=5)] = 1
    max_concurrent: Annotated[int, Field(ge=1)] | None = None  # default: reported slots, else 100

    @field_validator("type", "zone", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower().replace("llama.cpp", "llamacpp") if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and len(value) > URL_MAX:  # admin-added ones too: keep it bounded
            raise ValueError(f"a backend URL has at most {URL_MAX} characters")
        return None if value is None else normalise_url(value)

    @model_validator(mode="before")
    @classmethod
    def _default_url(cls, data: Any) -> Any:
        """Cloud types know their provider's URL: ``url`` may be left out for them."""
        if isinstance(data, dict) and data.get("url") is None and data.get("managed") is None:
            kind = data.get("type")
            default = DEFAULT_URLS.get(kind.lower()) if isinstance(kind, str) else None
            if default is not None:
                return {**data, "url": default}
        return data

    @model_validator(mode="after")
    def _url_or_managed(self) -> BackendSettings:
        if self.managed is not None:
            if self.type != "llamacpp":
                raise ValueError('a managed backend must have type = "llamacpp"')
            if self.url is not None:
                raise ValueError("a managed backend gets its URL from Nexus; remove 'url'")
        elif self.url is None:
            raise ValueError("'url' is required (or a [backends.managed] table)")
        return self

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The key named by ``api_key_env``, read from the environment (None when unset)."""
        return secret(self.api_key_env, environ)

    @property
    def effective_zone(self) -> str:
        if self.zone is not None:
            return self.zone
        return "open" if self.type in CLOUD_TYPES else "restricted"


class HistorySettings(_Section):
    max_entries: Annotated[int, Field(ge=0, le=1_000_000)] = 1000  # requests kept for /v1/history


class EmbeddedSettings(_Section):
    # With no [[backends]] configured, serve SmolLM2-135M through a managed llama-server when
    # scripts/serve (or scripts/build-llama-server and the model) have put both in the cache.
    enabled: bool = True


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    discovery: DiscoverySettings = Field(default_factory=DiscoverySettings)
    health_check: HealthCheckSettings = Field(default_factory=HealthCheckSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    pricing: list[PricingEntry] = Field(default_factory=list)
    state: StateSettings = Field(default_factory=StateSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    backends: list[BackendSettings] = Field(default_factory=list)

    def key_variables(self) -> set[str]:
        """The environment variables this configuration names for keys: the only ones a backend
        added through the admin API may read."""
        names = {b.api_key_env for b in self.backends if b.api_key_env}
        if self.server.admin_key_env:
            names.add(self.server.admin_key_env)
        return names

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for backend in self.backends:
            if backend.name in seen:
                raise ValueError(
                    f"backend name '{backend.name}' is used twice; names must be unique"
                )
            seen.add(backend.name)
        return self


def secret(variable: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of the environment variable a setting names (secrets never live in the file)."""
    if not variable:
        return None
    env = os.environ if environ is None else environ
    # Surrounding whitespace (a trailing newline from a .env file) is never part of a key.
    return env.get(variable, "").strip() or None


@dataclass(frozen=True, slots=True)
class ProxyServer:
    """An HTTP proxy from ``HTTPS_PROXY`` / ``HTTP_PROXY``."""

    host: str
    port: int
    authorization: str | None  # "Basic ..." from the URL's user and password
    shown: str  # the URL with its password masked, for logs and errors


@dataclass(frozen=True, slots=True)
class UpstreamNetwork:
    """How upstream calls leave the machine: proxies and trusted CAs, from the environment."""

    http_proxy: ProxyServer | None = None
    https_proxy: ProxyServer | None = None
    no_proxy: tuple[str, ...] = ()


def upstream_network(environ: Mapping[str, str] | None = None) -> UpstreamNetwork:
    """``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` (lower-case names win, as in curl and
    requests), validated; ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` must exist when set (OpenSSL
    reads them itself, and would silently ignore a wrong path)."""
    env = os.environ if environ is None else environ

    def value(name: str) -> tuple[str, str] | None:
        for variable in (name.lower(), name.upper()):
            if env.get(variable, "").strip():
                return variable, env[variable].strip()
        return None

    for variable in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        path = env.get(variable, "").strip()
        if path and not Path(path).exists():
            raise ConfigError(f"{variable}: '{path}' does not exist (it names the trusted CAs)")
    proxies: dict[str, ProxyServer | None] = {}
    for name in ("HTTPS_PROXY", "HTTP_PROXY"):
        found = value(name)
        proxies[name] = _proxy_server(*found) if found else None
    no_proxy = value("NO_PROXY")
    entries = re.split(r"[,\s]+", no_proxy[1].lower()) if no_proxy else []
    return UpstreamNetwork(
        http_proxy=proxies["HTTP_PROXY"],
        https_proxy=proxies["HTTPS_PROXY"],
        no_proxy=tuple(entry for entry in entries if entry),
    )


def _proxy_server(variable: str, url: str) -> ProxyServer:
    if "://" not in url:
        url = f"http://{url}"  # "proxy:3128", as curl reads it
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise ConfigError(f"{variable}: '{shown}' is not a proxy URL ({exc})") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(
            f"{variable}: '{shown}' is not supported; give an http:// proxy "
            "(https upstreams still get end-to-end TLS through its CONNECT tunnel)"
        )
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return ProxyServer(parts.hostname, port, authorization, shown)


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where builds, models and logs of managed backends live: ``$NEXUS_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/nexus``, else ``~/.cache/nexus``."""
    env = os.environ if environ is None else environ
    if env.get("NEXUS_CACHE_DIR"):
        return Path(env["NEXUS_CACHE_DIR"])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nexus"


def state_path(settings: StateSettings, environ: Mapping[str, str] | None = None) -> Path:
    """The state database: ``[state] path``, else ``$XDG_STATE_HOME/nexus/state.db``, else
    ``~/.local/state/nexus/state.db``."""
    if settings.path:
        return Path(settings.path).expanduser()
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nexus" / "state.db"


def redis_password(settings: StateSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """The Redis password, from the variable ``redis_password_env`` names; a ConfigError when
    that variable is named but not set (the server would refuse every call)."""
    variable = settings.redis_password_env
    if not variable:
        return None
    value = secret(variable, environ)
    if value is None:
        raise ConfigError(
            f"state.redis_password_env: the environment variable {variable} is not set "
            "(it holds the Redis password)"
        )
    return value


def host_name(value: str) -> str:
    """An ``allowed_hosts`` entry as it is compared: lower case, IPv6 without brackets."""
    name = value.strip().lower()
    if name == "*":
        return name
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    name = name.removesuffix(".")  # "nexus.lan." is the same name
    if not name or any(c in name for c in "/@ \t[]") or (name.count(":") == 1):
        raise ValueError(f"'{value}' is not a host name or address (give it without a port)")
    return name


def normalise_url(value: str) -> str:
    """``http://host:port[/prefix]`` without a trailing ``/`` or ``/v1`` (adapters add paths)."""
    # The messages leave the URL out: the caller shows it, its password masked.
    url = value.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL with a host")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError("a URL has no spaces or control characters (encode them)")
    try:
        parts.port  # noqa: B018 (it raises for a port that is not a number in range)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def validate_aliases(aliases: Mapping[str, str]) -> None:
    """Reject cycles and chains of more than ``MAX_ALIAS_HOPS`` hops, naming the alias."""
    for start in aliases:
        chain = [start]
        current = start
        while current in aliases:
            current = aliases[current]
            if current in chain:
                loop = " -> ".join([*chain, current])
                raise ValueError(f"alias cycle: {loop}")
            chain.append(current)
            if len(chain) - 1 > MAX_ALIAS_HOPS:
                path = " -> ".join(chain)
                raise ValueError(
                    f"alias chain from '{start}' is deeper than {MAX_ALIAS_HOPS} hops: {path}"
                )


# --- loading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvVar:
    name: str
    path: tuple[str, str]
    kind: Literal["str", "int", "bool"]


ENV_VARS = (
    EnvVar("NEXUS_HOST", ("server", "host"), "str"),
    EnvVar("NEXUS_PORT", ("server", "port"), "int"),
    EnvVar("NEXUS_LOG_LEVEL", ("logging", "level"), "str"),
    EnvVar("NEXUS_LOG_FORMAT", ("logging", "format"), "str"),
    EnvVar("NEXUS_DISCOVERY", ("discovery", "enabled"), "bool"),
    EnvVar("NEXUS_HEALTH_CHECK", ("health_check", "enabled"), "bool"),
)
CONFIG_ENV = "NEXUS_CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def config_path_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get(CONFIG_ENV) or None


def load_settings(
    path: str | Path | None = None,
    *,
    overrides: Mapping[tuple[str, str], Any] | None = None,
    environ: Mapping[str, str] | None = None,
    require_file: bool = False,
) -> Settings:
    """Read ``path`` (a missing file means defaults unless ``require_file``), then env, then CLI."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if file.exists():
            data = read_toml(file)
        elif require_file:
            raise ConfigError(f"config file '{file}' does not exist")
    sources: dict[tuple[str, str], str] = {}
    for var in ENV_VARS:
        raw = env.get(var.name)
        if raw is None or raw == "":
            continue
        _set(data, var.path, _coerce_env(var, raw))
        sources[var.path] = var.name
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key, value)
            sources[key] = "command line"
    return settings_from_dict(data, sources=sources, origin=str(path) if path else "defaults")


def read_toml(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from exc


def settings_from_dict(
    data: Mapping[str, Any],
    *,
    sources: Mapping[tuple[str, str], str] | None = None,
    origin: str = "config",
) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, data, sources or {}) for err in exc.errors()]
        raise ConfigError(f"{origin}: invalid configuration\n  " + "\n  ".join(lines)) from None


def _coerce_env(var: EnvVar, raw: str) -> Any:
    if var.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{var.name}={raw!r}: not a whole number") from None
    if var.kind == "bool":
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{var.name}={raw!r}: expected true or false")
    return raw


def _set(data: dict[str, Any], path: tuple[str, str], value: Any) -> None:
    section, key = path
    current = data.get(section)
    if not isinstance(current, dict):
        current = {}
        data[section] = current
    current[key] = value


def _describe(err: Mapping[str, Any], data: Mapping[str, Any], sources: Mapping[Any, str]) -> str:
    loc = tuple(err["loc"])
    key = _dotted(loc, data)
    source = sources.get(loc[:2]) if len(loc) >= 2 else None
    where = f" (from {source})" if source else ""
    if err["type"] == "extra_forbidden":
        hint = _did_you_mean(loc)
        return f"{key}{where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    message = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    shown = (
        f" (got {_short(value)})"
        if value is not None and not isinstance(value, dict | list)
        else ""
    )
    return f"{key}{where}: {message}{shown}"


def _short(value: Any, limit: int = 100) -> str:
    """A value for an error message, cut: the admin API echoes these to clients."""
    text = scrub(repr(value), ())  # a refused URL may still carry a password
    return text if len(text) <= limit else text[:limit] + "..."


def _dotted(loc: tuple[Any, ...], data: Mapping[str, Any]) -> str:
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            name = ""
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name", "")
                name = name[:64] if isinstance(name, str) else ""  # client-sent: keep it short
                if not name.isprintable():  # no line break of its own in a message or a log
                    name = ascii(name)[1:-1]
            parts[-1] = f"{parts[-1]}[{item}]" + (f" ({name})" if name else "")
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(str(item)[:64])  # an unknown key may come from a client: keep it short
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model: Any = Settings
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item)
        if field is None:
            return ""
        model = _model_of(field.annotation)
        if model is None:
            return ""
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known keys: {', '.join(known)})"


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
