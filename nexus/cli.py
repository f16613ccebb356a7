"""The ``nexus`` command: parse flags -> Settings -> run. Nothing else lives here."""

from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    config_path_from_env,
    load_settings,
)

log = logging.getLogger("nexus.cli")


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


def example_config() -> str:
    return resources.files("nexus").joinpath("example.toml").read_text(encoding="utf-8")


def _load(path: str, overrides: dict[tuple[str, str], Any], require_file: bool = False) -> Settings:
    try:
        return load_settings(path, overrides=overrides, require_file=require_file)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
