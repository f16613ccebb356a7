"""What ``nexus keys create|list|update|revoke`` need besides the HTTP client: the setting flags
(named as the settings are, with dashes), the JSON body they make, and the table and lines
they print. The commands themselves are in ``cli.py``.

A setting flag given ``none`` clears the setting (``--rpm none``: no requests-per-minute limit);
a flag not given leaves the setting as it is, so ``update`` sends only what was asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar, cast

import click
from rich.table import Table
from rich.text import Text

from .cli_client import DASH, usd

F = TypeVar("F", bound=Callable[..., Any])
CLEAR = object()  # "none" on the command line: the setting becomes null (unlimited, unset)
NONE_WORD = "none"
STATE_STYLES = {"active": "green", "revoked": "red", "expired": "yellow"}
SETTING_FLAGS = (
    "--owner",
    "--expires-at",
    "--models",
    "--max-zone",
    "--rpm",
    "--tpm",
    "--max-concurrent",
    "--monthly-budget-usd",
)


class Setting(click.ParamType[Any, Any]):
    """A setting's value, or ``none`` to clear it; ``parse`` raises ``ValueError`` on bad text."""

    def __init__(self, name: str, parse: Callable[[str], Any], expected: str) -> None:
        self.name = name
        self.parse = parse
        self.expected = expected

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is CLEAR or not isinstance(value, str):
            return value
        if value.strip().lower() == NONE_WORD:
            return CLEAR
        try:
            return self.parse(value.strip())
        except ValueError:
            self.fail(f"{value!r} is not {self.expected}, or 'none' to clear it", param, ctx)


def _count(text: str) -> int:
    number = int(text.replace("_", ""))
    if number < 1:
        raise ValueError(text)
    return number


def _usd(text: str) -> float:
    amount = float(text.lstrip("$"))
    if not amount > 0 or amount == float("inf"):
        raise ValueError(text)
    return amount


def _rfc3339(text: str) -> str:
    """The time as RFC 3339 with its offset (``Z`` for UTC); a time without one is refused:
    whose midnight would it be?"""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(text)
    return when.isoformat().replace("+00:00", "Z")


def _owner(text: str) -> str:
    if not text:
        raise ValueError(text)
    return text


COUNT = Setting("count", _count, "a whole number of 1 or more")
USD = Setting("usd", _usd, "an amount of USD above 0")
TIME = Setting("time", _rfc3339, "an RFC 3339 time with its offset, like 2027-01-31T23:59:59Z")
OWNER = Setting("owner", _owner, "a name")


def setting_options(command: F) -> F:
    """The flags of ``keys create`` and ``keys update``: one per setting, named as it is."""
    options = [
        click.option("--owner", type=OWNER, help="Who the key is for (free text)."),
        click.option(
            "--expires-at",
            type=TIME,
            help="When the key stops working: RFC 3339 with an offset, e.g. 2027-01-31T23:59:59Z.",
        ),
        click.option(
            "--models",
            multiple=True,
            metavar="GLOBS",
            help="Models the key may use: comma-separated globs (aliases are resolved first), "
            "e.g. 'llama3*,qwen2.5*'; may be repeated [default: every model].",
        ),
        click.option(
            "--max-zone",
            type=click.Choice(["restricted", "open"], case_sensitive=False),
            help="restricted: never an open-zone (cloud) backend, failover included "
            "[default: open].",
        ),
        click.option("--rpm", type=COUNT, help="Requests per minute (a sliding minute)."),
        click.option("--tpm", type=COUNT, help="Tokens per minute, counted from real usage."),
        click.option("--max-concurrent", type=COUNT, help="Requests in flight at once."),
        click.option("--monthly-budget-usd", type=USD, help="USD per UTC month."),
    ]
    decorated: Any = command
    for option in reversed(options):
        decorated = option(decorated)
    return cast(F, decorated)


def settings_body(
    *,
    owner: Any = None,
    expires_at: Any = None,
    models: Iterable[str] = (),
    max_zone: str | None = None,
    rpm: Any = None,
    tpm: Any = None,
    max_concurrent: Any = None,
    monthly_budget_usd: Any = None,
) -> dict[str, Any]:
    """The JSON of the settings given on the command line (``none`` -> null); the rest is left
    out, so that ``PATCH`` changes only those."""
    given = {
        "owner": owner,
        "expires_at": expires_at,
        "models": models_of(models),
        "max_zone": max_zone.lower() if max_zone else None,
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrent": max_concurrent,
        "monthly_budget_usd": monthly_budget_usd,
    }
    return {key: None if v is CLEAR else v for key, v in given.items() if v is not None}


def models_of(values: Iterable[str]) -> Any:
    """``--models a,b --models c`` -> ``[a, b, c]``; ``--models none`` -> ``CLEAR`` (every
    model); no ``--models`` -> None (not given)."""
    values = list(values)
    if not values:
        return None
    if [v.strip().lower() for v in values] == [NONE_WORD]:
        return CLEAR
    globs = [glob.strip() for value in values for glob in value.split(",")]
    if any(not glob for glob in globs) or NONE_WORD in (g.lower() for g in globs):
        raise click.BadParameter(
            "give comma-separated globs such as 'llama3*,qwen*' (no empty ones), "
            "or 'none' alone for every model",
            param_hint="'--models'",
        )
    return globs


# --- what is printed --------------------------------------------------------------------------


def state_of(key: Mapping[str, Any], now: float | None = None) -> str:
    if key.get("revoked_at"):
        return "revoked"
    expires = key.get("expires_at")
    if isinstance(expires, str):
        try:
            when = datetime.fromisoformat(expires).timestamp()
        except ValueError:
            return "active"
        if when <= (time.time() if now is None else now):
            return "expired"
    return "active"


def limits_text(key: Mapping[str, Any]) -> str:
    """``50 rpm, 10,000 tpm, 4 at once``; a dash when the key has no rate limit."""
    parts = []
    for field, unit in (("rpm", "rpm"), ("tpm", "tpm"), ("max_concurrent", "at once")):
        value = key.get(field)
        if isinstance(value, int):
            parts.append(f"{value:,} {unit}")
    return ", ".join(parts) or DASH


def models_text(key: Mapping[str, Any]) -> str:
    models = key.get("models")
    if models is None:
        return "all"
    return ", ".join(str(m) for m in models) or "none"


def budget_text(key: Mapping[str, Any]) -> str:
    """``$0.0123 of $5.00`` this month; without a budget, the month's cost alone."""
    usage = key.get("usage") if isinstance(key.get("usage"), Mapping) else None
    spent = usage.get("cost_usd") if usage else None
    limit = key.get("monthly_budget_usd")
    shown = f"${spent:,.4f}" if isinstance(spent, int | float) else DASH
    if isinstance(limit, int | float):
        return f"{shown} of ${usd(limit)}"
    return shown


def usage_text(key: Mapping[str, Any]) -> str:
    usage = key.get("usage")
    if not isinstance(usage, Mapping):
        return DASH
    return f"{usage.get('requests', 0):,} req, {usage.get('total_tokens', 0):,} tok"


def keys_table(keys: Iterable[Mapping[str, Any]]) -> Table:
    """Every key's settings, state and month to date; never a secret (the server sends none)."""
    table = Table(title="Keys", title_justify="left")
    table.add_column("Name", no_wrap=True, min_width=4)
    table.add_column("Prefix", no_wrap=True)
    table.add_column("Owner")
    table.add_column("Models")
    table.add_column("Zone", no_wrap=True)
    table.add_column("Limits")
    table.add_column("Cost / budget (month)", justify="right")
    table.add_column("Usage (month)", justify="right")
    table.add_column("Expires", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("Source", no_wrap=True)
    now = time.time()
    for key in keys:
        state = state_of(key, now)
        table.add_row(
            Text(str(key.get("name", ""))),
            Text(f"{key['prefix']}..." if key.get("prefix") else DASH),
            Text(str(key.get("owner") or DASH)),
            Text(models_text(key)),
            Text(str(key.get("max_zone") or "open")),
            limits_text(key),
            budget_text(key),
            usage_text(key),
            Text(str(key.get("expires_at") or "never")),
            Text(state, style=STATE_STYLES.get(state, "")),
            Text(str(key.get("source", ""))),
        )
    return table


def summary(key: Mapping[str, Any]) -> str:
    """One line of a key's settings, for ``create`` and ``update``."""
    parts = [f"models {models_text(key)}", f"zone {key.get('max_zone') or 'open'}"]
    if key.get("owner"):
        parts.insert(0, f"owner {key['owner']}")
    if limits_text(key) != DASH:
        parts.append(limits_text(key))
    if isinstance(key.get("monthly_budget_usd"), int | float):
        parts.append(f"${usd(key['monthly_budget_usd'])} a month")
    parts.append(f"expires {key.get('expires_at') or 'never'}")
    return "; ".join(parts)
