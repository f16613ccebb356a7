"""The ``nexus`` command: parse flags -> Settings -> run, and the commands that ask a running
Nexus about its state (their HTTP calls and tables are in ``cli_client``)."""

from __future__ import annotations

import functools
import logging
import sqlite3
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast, get_args

import click

from . import __version__, cli_client, cli_keys
from .cli_client import CliError, NexusClient
from .config import (
    DEFAULT_CONFIG_PATH,
    BackendType,
    ConfigError,
    Settings,
    config_path_from_env,
    load_settings,
    state_path,
    upstream_network,
)
from .state.sqlite import SQLiteStore

log = logging.getLogger("nexus.cli")
P = ParamSpec("P")
R = TypeVar("R")
BACKEND_TYPES = list(get_args(BackendType))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nexus")
def main() -> None:
    """Nexus: one OpenAI-compatible endpoint in front of every inference backend you own."""


@main.command()
@click.option("-c", "--config", "config_path", help="TOML config file [default: nexus.toml].")
@click.option("-H", "--host", help="Address to bind [default: 127.0.0.1].")
@click.option("-p", "--port", type=click.IntRange(1, 65535), help="Port [default: 8000].")
@click.option(
    "-l",
    "--log-level",
    type=click.Choice(["trace", "debug", "info", "warn", "warning", "error"], case_sensitive=False),
    help="Log level [default: info].",
)
@click.option("--no-discovery", is_flag=True, help="Do not browse mDNS for backends.")
@click.option("--no-health-check", is_flag=True, help="Trust every backend; never probe.")
def serve(
    config_path: str | None,
    host: str | None,
    port: int | None,
    log_level: str | None,
    no_discovery: bool,
    no_health_check: bool,
) -> None:
    """Run the gateway."""
    overrides: dict[tuple[str, str], Any] = {
        ("server", "host"): host,
        ("server", "port"): port,
        ("logging", "level"): log_level,
        ("discovery", "enabled"): False if no_discovery else None,
        ("health_check", "enabled"): False if no_health_check else None,
    }
    path = config_path or config_path_from_env() or DEFAULT_CONFIG_PATH
    settings = _load(path, overrides)
    try:
        settings.server.require_admin_key()
    except ConfigError as exc:
        click.echo(f"Error: {path}: {exc}", err=True)
        sys.exit(1)
    try:
        upstream_network()
    except ConfigError as exc:
        click.echo(f"Error: environment: {exc}", err=True)
        sys.exit(1)
    state = state_path(settings.state)
    try:  # the month's spend lives there: no start without it
        SQLiteStore(state).close()
    except (OSError, sqlite3.Error) as exc:
        click.echo(f"Error: {path}: state.path: cannot open the state database {state}: {exc}",
                   err=True)  # fmt: skip
        sys.exit(1)
    run(settings, path)


def run(settings: Settings, path: str) -> None:
    from .serving import serve as serve_app
    from .telemetry.logging import configure_logging

    listener = configure_logging(settings.logging)
    try:
        if not Path(path).exists():
            log.warning("config file %s not found: running on defaults", path)
        server = settings.server
        log.info(
            "Nexus %s on http://%s:%d with %d configured backend(s)",
            __version__,
            server.host,
            server.port,
            len(settings.backends),
        )
        serve_app(settings)
    finally:
        listener.stop()


@main.group()
def config() -> None:
    """Write or check a configuration file."""


@config.command("init")
@click.option(
    "-o", "--output", default=DEFAULT_CONFIG_PATH, show_default=True, help="File to write."
)
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing file.")
def config_init(output: str, force: bool) -> None:
    """Write a commented example configuration."""
    target = Path(output)
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; use --force to overwrite it")
    target.write_text(example_config(), encoding="utf-8")
    click.echo(f"Wrote {target}. Check it with: nexus config check {target}")


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def config_check(file: str) -> None:
    """Validate FILE (with NEXUS_* variables applied) and summarise it."""
    settings = _load(file, {}, require_file=True)
    routing = settings.routing
    click.echo(
        f"{file}: OK ({len(settings.backends)} backend(s), {len(routing.aliases)} alias(es), "
        f"{len(routing.fallbacks)} fallback chain(s), strategy {routing.strategy})"
    )
    # Variables may be set only where the service runs: a warning here, an error at start.
    server = settings.server
    if server.admin_key_env and server.admin_key() is None:
        click.echo(
            f"warning: server.admin_key_env names {server.admin_key_env}, which is not set here; "
            "`nexus serve` will refuse to start without it",
            err=True,
        )
    for backend in settings.backends:
        if backend.api_key_env and backend.api_key() is None:
            click.echo(
                f"warning: backends ({backend.name}).api_key_env names {backend.api_key_env}, "
                "which is not set here",
                err=True,
            )


def example_config() -> str:
    return resources.files("nexus").joinpath("example.toml").read_text(encoding="utf-8")


def _load(path: str, overrides: dict[tuple[str, str], Any], require_file: bool = False) -> Settings:
    try:
        return load_settings(path, overrides=overrides, require_file=require_file)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


# --- live state: commands that ask a running Nexus --------------------------------------------


def live(command: Callable[P, R]) -> Callable[P, R]:
    """``--url`` and ``-c/--config`` for a command that talks to a running Nexus; a ``CliError``
    becomes ``Error: ...`` on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except CliError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)

    options = [
        click.option(
            "--url",
            help="Nexus to ask [default: http://HOST:PORT from the config's [server]].",
        ),
        click.option(
            "-c",
            "--config",
            "config_path",
            help="TOML config file, for the address and the admin key [default: nexus.toml].",
        ),
    ]
    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return cast(Callable[P, R], decorated)


def connect(url: str | None, config_path: str | None) -> NexusClient:
    """A client for ``url``, else for where ``nexus serve`` with the same config would listen.
    The admin key named by ``[server] admin_key_env`` is sent when that variable is set."""
    path = config_path or config_path_from_env() or DEFAULT_CONFIG_PATH
    server = _load(path, {}).server
    base = cli_client.check_base_url(url) if url else cli_client.url_of(server)
    return NexusClient(base, server.admin_key())


@main.group()
def backends() -> None:
    """List, add or remove the backends of a running Nexus."""


@backends.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.option(
    "--status",
    type=click.Choice(["healthy", "unhealthy", "unknown"], case_sensitive=False),
    help="Only backends in this state.",
)
@live
def backends_list(
    url: str | None, config_path: str | None, as_json: bool, status: str | None
) -> None:
    """Show every backend: type, status, URL, models, load and latency."""
    answer = connect(url, config_path).get("/v1/backends")
    rows = [
        b for b in answer.get("data", []) if status is None or b.get("status") == status.lower()
    ]
    if as_json:
        cli_client.print_json({**answer, "data": rows})
        return
    out = cli_client.console()
    if not rows:
        out.print("No backends" + (f" are {status.lower()}." if status else " are registered."))
        return
    out.print(cli_client.backends_table(rows))
    for line in cli_client.backend_problems(rows):
        out.print(line)


@backends.command("add")
@click.argument("backend_url", metavar="URL")
@click.option("--name", help="Name of the backend [default: the URL's host:port].")
@click.option(
    "--type",
    "type_",
    type=click.Choice(BACKEND_TYPES, case_sensitive=False),
    help="Backend type [default: detected: /api/tags answers -> ollama, /v1/models -> generic].",
)
@click.option("--priority", type=int, help="Lower is preferred [default: 50].")
@click.option("--zone", type=click.Choice(["restricted", "open"], case_sensitive=False))
@click.option("--tier", type=click.IntRange(1, 5), help="Capability tier, 1 to 5 [default: 1].")
@click.option("--max-concurrent", type=click.IntRange(min=1), help="Requests it takes at once.")
@live
def backends_add(
    url: str | None,
    config_path: str | None,
    backend_url: str,
    name: str | None,
    type_: str | None,
    priority: int | None,
    zone: str | None,
    tier: int | None,
    max_concurrent: int | None,
) -> None:
    """Add the backend at URL to a running Nexus (until it restarts)."""
    client = connect(url, config_path)
    entry, note = cli_client.backend_entry(
        backend_url,
        name,
        type_.lower() if type_ else None,
        priority=priority,
        zone=zone.lower() if zone else None,
        tier=tier,
        max_concurrent=max_concurrent,
    )
    if note:
        click.echo(f"Note: {note}", err=True)
    view = client.add_backend(entry)
    state = str(view.get("status", "unknown"))
    models = len(view.get("models") or ())
    detail = f", {models} model(s)" if state == "healthy" else ""
    if state != "healthy" and view.get("last_error"):
        detail = f" ({view['last_error']})"
    added = f"'{view.get('name')}' ({view.get('type')}) at {view.get('url')}"
    click.echo(f"Added backend {added}: {state}{detail}")


@backends.command("remove")
@click.argument("name")
@live
def backends_remove(url: str | None, config_path: str | None, name: str) -> None:
    """Remove the backend NAME from a running Nexus."""
    connect(url, config_path).remove_backend(name)
    click.echo(f"Removed backend '{name}'.")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@live
def models(url: str | None, config_path: str | None, as_json: bool) -> None:
    """Show the models served by healthy backends."""
    answer = connect(url, config_path).get("/v1/models")
    if as_json:
        cli_client.print_json(answer)
        return
    rows = answer.get("data", [])
    out = cli_client.console()
    if not rows:
        out.print("No models: no healthy backend lists one.")
        return
    out.print(cli_client.models_table(rows))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@live
def health(url: str | None, config_path: str | None, as_json: bool) -> None:
    """Show the health of a running Nexus."""
    answer = connect(url, config_path).get("/health")
    if as_json:
        cli_client.print_json(answer)
        return
    cli_client.console().print(cli_client.health_table(answer))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@live
def stats(url: str | None, config_path: str | None, as_json: bool) -> None:
    """Show request totals, per backend and per model."""
    answer = connect(url, config_path).get("/v1/stats")
    if as_json:
        cli_client.print_json(answer)
        return
    out = cli_client.console()
    for table in cli_client.stats_tables(answer):
        out.print(table)


@main.group()
def keys() -> None:
    """Create, list, change or revoke the client keys of a running Nexus.

    Setting flags are named as the settings are; give one `none` to clear it (`--rpm none`).
    """


@keys.command("create")
@click.argument("name")
@cli_keys.setting_options
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON, the key in it.")
@live
def keys_create(
    url: str | None, config_path: str | None, name: str, as_json: bool, **settings: Any
) -> None:
    """Create the key NAME and print its secret, which is shown this once only."""
    body = {"name": name, **cli_keys.settings_body(**settings)}
    made = connect(url, config_path).create_key(body)
    if as_json:
        cli_client.print_json(made)
        return
    click.echo(f"Created key '{made.get('name')}': {cli_keys.summary(made)}.")
    click.echo(f"Key: {made.get('key')}")
    click.echo(
        "This key is shown once, now: store it. Nexus keeps only its hash; if it is lost, "
        f"revoke it (nexus keys revoke {made.get('name')}) and create another."
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON for each key.")
@live
def keys_list(url: str | None, config_path: str | None, as_json: bool) -> None:
    """Show every key: prefix, owner, models, limits, this month's usage, expiry, revocation."""
    answer = connect(url, config_path).get("/admin/keys")
    rows = answer.get("data", [])  # each with its month to date
    if as_json:
        cli_client.print_json(answer)
        return
    out = cli_client.console()
    if not rows:
        out.print("No keys. Create one with: nexus keys create NAME")
        return
    out.print(cli_keys.keys_table(rows))


@keys.command("update")
@click.argument("name")
@cli_keys.setting_options
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@live
def keys_update(
    url: str | None, config_path: str | None, name: str, as_json: bool, **settings: Any
) -> None:
    """Change the settings given as flags on the key NAME; the others stay as they are."""
    body = cli_keys.settings_body(**settings)
    if not body:
        flags = ", ".join(cli_keys.SETTING_FLAGS)
        raise click.UsageError(f"nothing to change: give at least one of {flags}")
    view = connect(url, config_path).update_key(name, body)
    if as_json:
        cli_client.print_json(view)
        return
    click.echo(f"Updated key '{view.get('name')}': {cli_keys.summary(view)}.")


@keys.command("revoke")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@live
def keys_revoke(url: str | None, config_path: str | None, name: str, as_json: bool) -> None:
    """Revoke the key NAME: it is refused from its next request on. This cannot be undone."""
    view = connect(url, config_path).revoke_key(name)
    if as_json:
        cli_client.print_json(view)
        return
    click.echo(f"Revoked key '{view.get('name')}': requests with it now get 401.")
