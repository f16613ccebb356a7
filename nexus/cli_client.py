"""What the live-state commands (``nexus backends|keys|models|health|stats``) need: a small HTTP
client for a running Nexus, backend type detection, and the ``rich`` tables they print.

The client is the standard library's ``urllib``: the CLI makes one or two plain JSON calls, so it
needs no dependency beyond what the server already has. Every failure becomes a ``CliError`` whose
message is one line a person can act on; ``cli.py`` prints it and exits 1.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .config import ServerSettings, normalise_url
from .redact import scrub

REQUEST_TIMEOUT = 30.0  # adding a backend waits for its first probe
DETECT_TIMEOUT = 2.0
STATUS_STYLES = {"healthy": "green", "unhealthy": "red", "unknown": "yellow"}
HEALTH_STYLES = {"healthy": "green", "degraded": "yellow", "unhealthy": "red"}
DASH = "-"
BUDGET_STYLES = {"SoftLimit": "yellow", "HardLimit": "bold red"}


class CliError(Exception):
    """A one-line message for the user; the command exits 1."""


# --- where Nexus is ---------------------------------------------------------------------------


def url_of(server: ServerSettings) -> str:
    """``http://host:port`` of a Nexus started with these settings (0.0.0.0 means 127.0.0.1)."""
    host = server.host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.port}"


def check_base_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(
            f"--url must be an http(s) URL with a host, like http://127.0.0.1:8000; got {url!r}"
        )
    return url.strip().rstrip("/")


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Nexus never redirects; following one would carry the admin key to another place."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _opener(url: str) -> urllib.request.OpenerDirector:
    # Proxies from the environment apply, except to this machine: a proxy cannot reach our
    # loopback, and an unset no_proxy would otherwise send local calls to it.
    proxies = urllib.request.ProxyHandler({} if _is_loopback(url) else None)
    return urllib.request.build_opener(proxies, _NoRedirects)


# --- talking to it ------------------------------------------------------------------------------


class NexusClient:
    """JSON calls to a running Nexus at ``base_url``; the admin key goes to ``/admin`` only."""

    def __init__(self, base_url: str, admin_key: str | None, timeout: float = REQUEST_TIMEOUT):
        self.base_url = base_url.rstrip("/")
        self.admin_key = admin_key
        self.timeout = timeout
        self._open = _opener(self.base_url).open

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def add_backend(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/admin/backends", dict(entry))

    def remove_backend(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", "/admin/backends/" + quote(name, safe=""))

    def create_key(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/admin/keys", dict(body))

    def update_key(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", _key_path(name), dict(body))

    def revoke_key(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", _key_path(name))

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """The JSON object Nexus answered with; anything else is a ``CliError``."""
        url = self.base_url + path
        headers = {"Accept": "application/json", "User-Agent": f"nexus-cli/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.admin_key and path.startswith("/admin/"):
            headers["Authorization"] = f"Bearer {self.admin_key}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._open(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:  # an answer all the same: 4xx or 5xx
            status, raw = exc.code, exc.read()
            exc.close()
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        return self._decode(method, path, status, raw)

    def _unreachable(self, reason: object) -> CliError:
        return CliError(
            f"cannot reach Nexus at {self.base_url} ({describe(reason)}). "
            "Is `nexus serve` running? Use --url to point elsewhere."
        )

    def _decode(self, method: str, path: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if status < 300:
            if not isinstance(data, dict):
                raise CliError(
                    f"{self.base_url}{path} answered HTTP {status} without a JSON object; "
                    "is this a Nexus? Use --url to point elsewhere."
                )
            return data
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            raise CliError(f"{error['message']} (HTTP {status} for {method} {path})")
        raise CliError(
            f"{self.base_url}{path} answered HTTP {status} for {method}; is this a Nexus? "
            "Use --url to point elsewhere."
        )


def _key_path(name: str) -> str:
    return "/admin/keys/" + quote(name, safe="")


def describe(reason: object) -> str:
    """A short, lower-case reason for a failed connection."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host: {reason.strerror or reason}"
    if isinstance(reason, http.client.RemoteDisconnected | ConnectionResetError):
        return "the connection was closed without an answer"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    text = str(reason) or type(reason).__name__
    return text.splitlines()[0]


# --- nexus backends add: what to send ---------------------------------------------------------


def backend_entry(
    url: str,
    name: str | None,
    type_: str | None,
    *,
    priority: int | None = None,
    zone: str | None = None,
    tier: int | None = None,
    max_concurrent: int | None = None,
) -> tuple[dict[str, Any], str | None]:
    """The JSON entry for ``POST /admin/backends``, and a note for the user (or None).

    Without a type, the server at ``url`` is asked: ``/api/tags`` answering means Ollama,
    ``/v1/models`` answering means a generic OpenAI-compatible server; neither means generic,
    with a note. Without a name, the URL's ``host:port`` is the name."""
    try:
        base = normalise_url(url)
    except ValueError as exc:
        raise CliError(f"{scrub(url, ())}: {exc}") from None
    note = None
    if type_ is None:
        type_ = detect_type(base)
        if type_ is None:
            type_ = "generic"
            note = (
                f"could not detect the type of the server at {base} (no answer on /api/tags or "
                "/v1/models); adding it as 'generic'. Use --type to choose."
            )
    entry: dict[str, Any] = {"name": name or default_name(base), "url": base, "type": type_}
    optional = {"priority": priority, "zone": zone, "tier": tier, "max_concurrent": max_concurrent}
    entry.update({key: value for key, value in optional.items() if value is not None})
    return entry, note


def default_name(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "backend"
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{parts.port}" if parts.port else shown


def detect_type(base_url: str, timeout: float = DETECT_TIMEOUT) -> str | None:
    """``ollama`` when ``GET /api/tags`` answers 2xx, ``generic`` when ``GET /v1/models`` does."""
    opener = _opener(base_url)
    for path, kind in (("/api/tags", "ollama"), ("/v1/models", "generic")):
        request = urllib.request.Request(
            base_url + path, headers={"User-Agent": f"nexus-cli/{__version__}"}
        )
        try:
            with opener.open(request, timeout=timeout) as response:
                if 200 <= response.status < 300:
                    return kind
        except (OSError, http.client.HTTPException):  # URLError and HTTPError are OSErrors
            continue
    return None


# --- tables -----------------------------------------------------------------------------------


def console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def print_json(data: Any) -> None:
    console().out(json.dumps(data, indent=2, ensure_ascii=False), highlight=False)


def backends_table(backends: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(title="Backends", title_justify="left")
    table.add_column("Name", no_wrap=True, min_width=4)
    table.add_column("Type", no_wrap=True)
    table.add_column("Status", no_wrap=True, min_width=9)
    table.add_column("URL", overflow="fold")  # folded on narrow terminals, never cut
    table.add_column("Models", justify="right", max_width=6)
    table.add_column("In flight / capacity", justify="right", max_width=9)
    table.add_column("Latency ms", justify="right", max_width=7)
    for backend in backends:
        latency = backend.get("latency_ms")
        if latency is None:
            latency = backend.get("probe_latency_ms")
        table.add_row(
            Text(str(backend.get("name", ""))),
            Text(str(backend.get("type", ""))),
            status_text(str(backend.get("status", "unknown")), STATUS_STYLES),
            Text(str(backend.get("url", ""))),
            str(len(backend.get("models") or ())),
            f"{backend.get('in_flight', 0)}/{backend.get('capacity', DASH)}",
            number(latency),
        )
    return table


def backend_problems(backends: Iterable[Mapping[str, Any]]) -> list[Text]:
    """One line per backend that is not healthy and says why."""
    lines = []
    for backend in backends:
        error = backend.get("last_error")
        if error and backend.get("status") != "healthy":
            lines.append(Text(f"{backend.get('name')}: {error}", style="dim"))
    return lines


def models_table(models: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(title="Models", title_justify="left")
    table.add_column("Model", no_wrap=True, min_width=5)
    table.add_column("Backends")
    table.add_column("Context", justify="right")
    table.add_column("Capabilities")
    table.add_column("$/Mtok in / out", justify="right")
    for model in models:
        capabilities = model.get("capabilities") or {}
        shown = [name for name, on in capabilities.items() if on]
        context = model.get("context_length")
        table.add_row(
            Text(str(model.get("id", ""))),
            Text(", ".join(model.get("backends") or [str(model.get("owned_by", ""))])),
            DASH if context is None else f"{context:,}",
            Text(", ".join(shown) or DASH),
            price(model.get("pricing")),
        )
    return table


def health_table(health: Mapping[str, Any]) -> Table:
    table = Table(title="Nexus health", title_justify="left", show_header=False)
    table.add_column("Key", style="bold")
    table.add_column("Value")
    counts = health.get("backends") or {}
    table.add_row("Status", status_text(str(health.get("status", "unknown")), HEALTH_STYLES))
    table.add_row("Version", Text(str(health.get("version", DASH))))
    table.add_row("Uptime", duration(health.get("uptime_seconds")))
    table.add_row(
        "Backends",
        f"{counts.get('healthy', 0)} healthy, {counts.get('unhealthy', 0)} unhealthy, "
        f"{counts.get('total', 0)} total",
    )
    if "models" in health:
        table.add_row("Models", str(health["models"]))
    return table


def stats_tables(stats: Mapping[str, Any]) -> list[Table]:
    totals = stats.get("requests") or {}
    summary = Table(title="Nexus stats", title_justify="left", show_header=False)
    summary.add_column("Key", style="bold")
    summary.add_column("Value")
    summary.add_row("Uptime", duration(stats.get("uptime_seconds")))
    summary.add_row(
        "Requests",
        f"{totals.get('requests', 0)} ({totals.get('success', 0)} ok, "
        f"{totals.get('errors', 0)} errors)",
    )
    summary.add_row("In flight", str(stats.get("in_flight", 0)))
    summary.add_row("Queue depth", str(stats.get("queue_depth", 0)))
    summary.add_row("Latency ms (p50/p95/p99)", percentiles(totals.get("latency_ms")))
    summary.add_row("TTFT ms (p50/p95/p99)", percentiles(totals.get("ttft_ms")))
    summary.add_row("Tokens (prompt/completion)", tokens(totals.get("tokens")))
    budget = stats.get("budget")
    if isinstance(budget, Mapping):
        summary.add_row(f"Spend {budget.get('month', '')}", spend(budget))

    backends = Table(title="Per backend", title_justify="left")
    backends.add_column("Backend", no_wrap=True, min_width=7)
    backends.add_column("Status", no_wrap=True, min_width=9)
    backends.add_column("Requests", justify="right")
    backends.add_column("Errors", justify="right")
    backends.add_column("In flight / capacity", justify="right")
    _tally_columns(backends)
    for row in stats.get("backends") or ():
        backends.add_row(
            Text(str(row.get("name", ""))),
            status_text(str(row.get("status", "unknown")), STATUS_STYLES),
            str(row.get("requests", 0)),
            str(row.get("errors", 0)),
            f"{row.get('in_flight', 0)}/{row.get('capacity', DASH)}",
            *_tally_cells(row),
        )

    models = Table(title="Per model", title_justify="left")
    models.add_column("Model", no_wrap=True, min_width=5)
    models.add_column("Requests", justify="right")
    models.add_column("Errors", justify="right")
    _tally_columns(models)
    for row in stats.get("models") or ():
        models.add_row(
            Text(str(row.get("name", ""))),
            str(row.get("requests", 0)),
            str(row.get("errors", 0)),
            *_tally_cells(row),
        )
    return [summary, backends, models]


def _tally_columns(table: Table) -> None:
    for column in ("Latency ms p50/p95", "TTFT ms p50", "Tokens in / out"):
        table.add_column(column, justify="right")


def _tally_cells(row: Mapping[str, Any]) -> list[str]:
    latency = row.get("latency_ms") or {}
    ttft = row.get("ttft_ms") or {}
    return [
        f"{number(latency.get('p50'))}/{number(latency.get('p95'))}",
        number(ttft.get("p50")),
        tokens(row.get("tokens")),
    ]


# --- cells ------------------------------------------------------------------------------------


def status_text(status: str, styles: Mapping[str, str]) -> Text:
    return Text(status, style=styles.get(status, ""))


def number(value: Any) -> str:
    if value is None:
        return DASH
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def price(pricing: Any) -> str:
    """``input / output`` USD per million tokens; a dash when the price is not known."""
    if not isinstance(pricing, Mapping):
        return DASH
    return f"{usd(pricing.get('input_per_mtok'))} / {usd(pricing.get('output_per_mtok'))}"


def usd(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return DASH
    return f"{value:,.2f}" if value >= 0.01 or value == 0 else f"{value:g}"


def spend(budget: Mapping[str, Any]) -> Text:
    """``$1.23 of $100.00 (1.2%, Normal)``; the month's spend alone without a limit."""
    spent = budget.get("current_spending_usd", 0)
    text = f"${spent:,.4f}" if isinstance(spent, int | float) else DASH
    limit = budget.get("monthly_limit_usd")
    status = str(budget.get("status", ""))
    if isinstance(limit, int | float):
        text += f" of ${limit:,.2f} ({budget.get('utilization_percent', 0)}%, {status})"
    return Text(text, style=BUDGET_STYLES.get(status, ""))


def percentiles(values: Any) -> str:
    if not isinstance(values, Mapping):
        return DASH
    return "/".join(number(values.get(key)) for key in ("p50", "p95", "p99"))


def tokens(values: Any) -> str:
    if not isinstance(values, Mapping):
        return DASH
    return f"{values.get('prompt', 0)}/{values.get('completion', 0)}"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return DASH
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)
