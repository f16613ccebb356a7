"""What a model costs on a backend, and what a request's usage cost.

Prices come from ``[[pricing]]`` entries in the config first (a ``model_pattern`` glob, optionally
limited to some backends; e.g. the power a local GPU draws), then, for the cloud backend types,
from the ``genai-prices`` snapshot bundled with the package (never fetched at run time), matched by
provider and model id, dated snapshots and aliases included. Everything else costs nothing.

A model's price is looked up once per backend and kept: a request's cost is a few multiplications.
Tiered prices (a higher rate for every token once a prompt passes a threshold, as Anthropic and
Google charge for long contexts) are kept and applied.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from ..config import PricingEntry

log = logging.getLogger("nexus.cost")

MTOK = 1_000_000
# The providers genai-prices knows the cloud backend types as.
PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "google": "google"}
OFFICIAL_HOSTS = {"openai": "api.openai.com"}


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per token; from ``tiers`` on (prompt tokens, ascending) every token costs more."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()

    def at(self, prompt_tokens: int) -> float:
        rate = self.base
        for start, tier_rate in self.tiers:
            if prompt_tokens > start:
                rate = tier_rate
        return rate

    @property
    def per_mtok(self) -> float:
        return round(self.base * MTOK, 6)


@dataclass(frozen=True, slots=True)
class Tokens:
    """A request's usage: prompt tokens include the cached ones and the cache writes; completion
    tokens include the reasoning ones (as OpenAI counts them)."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0

    @classmethod
    def from_usage(cls, usage: object) -> Tokens | None:
        """An OpenAI ``usage`` object (with its details) read defensively; None if it is not one
        or its counts are not counts (a string, a negative number): the caller then charges its
        estimate, as a priced call with garbage for usage must not count as free."""
        if not isinstance(usage, dict):  # parsed JSON: a dict (an ABC check costs µs per call)
            return None
        prompt = _exact(usage.get("prompt_tokens"))
        out_count = usage.get("completion_tokens")
        completion = 0 if out_count is None else _exact(out_count)  # embeddings have none
        if prompt is None or completion is None:
            return None
        details = usage.get("prompt_tokens_details")
        cached = write = reasoning = 0
        if type(details) is dict:
            cached = _count(details.get("cached_tokens"))
            write = _count(details.get("cache_write_tokens"))
        out = usage.get("completion_tokens_details")
        if type(out) is dict:
            reasoning = _count(out.get("reasoning_tokens"))
        cached = min(cached, prompt)  # never more tokens billed than the prompt has
        return cls(prompt, completion, cached, min(write, prompt - cached), reasoning)


def _exact(value: object) -> int | None:
    """A token count, or None for anything else (bools, negatives, strings, floats)."""
    return value if type(value) is int and value >= 0 else None


def _count(value: object) -> int:
    return _exact(value) or 0


@dataclass(frozen=True, slots=True)
class Price:
    input: Rate
    output: Rate
    cached_input: Rate
    cache_write: Rate
    source: str  # where it came from: "genai-prices (anthropic/claude-sonnet-4-5)", "config: ..."

    def cost(self, tokens: Tokens) -> float:
        """USD for ``tokens``; cached prompt tokens and cache writes at their own rates."""
        prompt = tokens.prompt
        fresh = max(prompt - tokens.cached - tokens.cache_write, 0)
        return (
            fresh * self.input.at(prompt)
            + tokens.cached * self.cached_input.at(prompt)
            + tokens.cache_write * self.cache_write.at(prompt)
            + tokens.completion * self.output.at(prompt)
        )

    def worst_case(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The most a call may cost: no prompt token cached, every output token used."""
        input_rate = max(self.input.at(prompt_tokens), self.cache_write.at(prompt_tokens))
        return prompt_tokens * input_rate + completion_tokens * self.output.at(prompt_tokens)

    def public(self) -> dict[str, Any]:
        """The price as ``/v1/models`` and ``nexus models`` show it (USD per million tokens)."""
        return {
            "input_per_mtok": self.input.per_mtok,
            "output_per_mtok": self.output.per_mtok,
            "cached_input_per_mtok": self.cached_input.per_mtok,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class _Override:
    model: re.Pattern[str]
    backend: re.Pattern[str] | None
    price: Price


class PriceBook:
    """Prices by backend and model, looked up once each."""

    def __init__(self, overrides: Sequence[PricingEntry] = (), *, snapshot: Any = None) -> None:
        self._overrides = [_override(entry) for entry in overrides]
        self._snapshot = snapshot
        self._known: dict[tuple[str, str, str, str], Price | None] = {}
        self._warned: set[tuple[str, str, str, str]] = set()

    def load(self) -> None:
        """Read the bundled snapshot now (blocking, ~0.2 s), not on the first priced request."""
        if self._snapshot is None:
            from genai_prices import data_snapshot

            self._snapshot = data_snapshot.get_snapshot()

    def price(
        self, backend_name: str, backend_type: str, url: str, model: str, *, quiet: bool = False
    ) -> Price | None:
        """The price, or None when free or unknown. An unknown cloud price is logged once, on
        the first lookup that is not ``quiet`` (a request, not a model listing)."""
        key = (backend_name, model, backend_type, url)  # a backend re-added differently: anew
        try:
            found = self._known[key]
        except KeyError:
            found = self._look_up(backend_name, backend_type, url, model)
            if len(self._known) > 100_000:  # models come and go with backends: bounded
                self._known.clear()
                self._warned.clear()
            self._known[key] = found
        if found is None and not quiet and backend_type in PROVIDERS and key not in self._warned:
            self._warned.add(key)
            log.warning(
                "no price known for model %s on cloud backend %s: it is not counted in the spend "
                "or the budget; add a [[pricing]] entry for it",
                model,
                backend_name,
            )
        return found

    def _look_up(self, backend_name: str, backend_type: str, url: str, model: str) -> Price | None:
        for override in self._overrides:
            if override.model.match(model) and (
                override.backend is None or override.backend.match(backend_name)
            ):
                return override.price
        provider = PROVIDERS.get(backend_type)
        if provider is None:
            return None  # a local backend: free unless [[pricing]] says otherwise
        return self._from_snapshot(provider, url, model)

    def _from_snapshot(self, provider: str, url: str, model: str) -> Price | None:
        if self._snapshot is None:
            self.load()
        snapshot = self._snapshot
        official = OFFICIAL_HOSTS.get(provider)
        host = urlsplit(url).hostname or ""
        # An OpenAI-compatible cloud other than OpenAI (Groq, Together...) is found by its URL.
        lookups: list[tuple[str | None, str | None]] = [(provider, None)]
        if official is not None and host != official:
            lookups.insert(0, (None, url))
        for provider_id, api_url in lookups:
            try:
                found, info = snapshot.find_provider_model(model, None, provider_id, api_url)
                prices = info.get_prices(datetime.now(UTC))
            except (LookupError, ValueError):
                continue
            return _from_model_price(prices, f"genai-prices ({found.id}/{info.id})")
        return None


def _override(entry: PricingEntry) -> _Override:
    def rate(per_mtok: float) -> Rate:
        return Rate(per_mtok / MTOK)

    cached = entry.cached_input_per_mtok
    write = entry.cache_write_per_mtok
    price = Price(
        input=rate(entry.input_per_mtok),
        output=rate(entry.output_per_mtok),
        cached_input=rate(entry.input_per_mtok if cached is None else cached),
        cache_write=rate(entry.input_per_mtok if write is None else write),
        source=f"config ({entry.model_pattern})",
    )
    backend = re.compile(fnmatch.translate(entry.backend)) if entry.backend else None
    return _Override(re.compile(fnmatch.translate(entry.model_pattern)), backend, price)


def _from_model_price(prices: Any, source: str) -> Price | None:
    input_rate = _rate(getattr(prices, "input_mtok", None))
    output_rate = _rate(getattr(prices, "output_mtok", None))
    if input_rate is None and output_rate is None:
        return None  # priced per request or per image only: not something tokens can tell
    zero = Rate(0.0)
    input_rate = input_rate or zero
    cached = _rate(getattr(prices, "cache_read_mtok", None)) or input_rate
    write = _rate(getattr(prices, "cache_write_mtok", None)) or input_rate
    return Price(input_rate, output_rate or zero, cached, write, source)


def _rate(value: Any) -> Rate | None:
    if value is None:
        return None
    if isinstance(value, Decimal | int | float):
        return Rate(float(value) / MTOK)
    base = getattr(value, "base", None)
    if base is None:
        return None
    tiers = tuple(
        (int(tier.start), float(tier.price) / MTOK) for tier in getattr(value, "tiers", ())
    )
    return Rate(float(base) / MTOK, tiers)
