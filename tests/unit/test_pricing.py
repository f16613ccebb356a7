"""Prices: the bundled genai-prices snapshot for the cloud types (matched by provider and model id,
dated snapshots and aliases, OpenAI-compatible clouds by their URL), ``[[pricing]]`` overrides
first, local backends free unless priced; a request's cost from its usage, read defensively."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from nexus.config import PricingEntry
from nexus.cost.pricing import MTOK, Price, PriceBook, Rate, Tokens

ANTHROPIC = "https://api.anthropic.com"
OPENAI = "https://api.openai.com/v1"
GROQ = "https://api.groq.com/openai/v1"
GOOGLE = "https://generativelanguage.googleapis.com"
LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def snapshot() -> Any:
    """The bundled snapshot, read once for the module (it takes a fraction of a second)."""
    book = PriceBook()
    book.load()
    return book._snapshot


def book_of(snapshot: Any, *entries: dict[str, Any]) -> PriceBook:
    return PriceBook([PricingEntry(**entry) for entry in entries], snapshot=snapshot)


def per_mtok(rate: Rate) -> float:
    return round(rate.base * MTOK, 6)


# --- the snapshot ------------------------------------------------------------------------------


def test_an_anthropic_model_is_priced_by_provider_and_id(snapshot):
    price = book_of(snapshot).price("claude", "anthropic", ANTHROPIC, "claude-sonnet-4-5")
    assert price is not None
    assert per_mtok(price.input) == 3.0
    assert per_mtok(price.output) == 15.0
    assert per_mtok(price.cached_input) == 0.3  # cache reads
    assert per_mtok(price.cache_write) == 3.75
    assert "claude-sonnet-4-5" in price.source and "genai-prices" in price.source


def test_a_dated_snapshot_id_has_its_models_price(snapshot):
    book = book_of(snapshot)
    dated = book.price("claude", "anthropic", ANTHROPIC, "claude-sonnet-4-5-20250929")
    plain = book.price("claude", "anthropic", ANTHROPIC, "claude-sonnet-4-5")
    assert dated is not None and plain is not None
    assert (dated.input, dated.output, dated.cached_input) == (
        plain.input,
        plain.output,
        plain.cached_input,
    )
    openai_dated = book.price("oai", "openai", OPENAI, "gpt-4o-2024-08-06")
    assert openai_dated is not None and per_mtok(openai_dated.input) == 2.5


def test_an_alias_has_its_models_price(snapshot):
    price = book_of(snapshot).price("claude", "anthropic", ANTHROPIC, "claude-3-5-sonnet-latest")
    assert price is not None
    assert (per_mtok(price.input), per_mtok(price.output)) == (3.0, 15.0)


def test_gpt_4o_on_openai(snapshot):
    price = book_of(snapshot).price("oai", "openai", OPENAI, "gpt-4o")
    assert price is not None
    assert (per_mtok(price.input), per_mtok(price.output)) == (2.5, 10.0)
    assert per_mtok(price.cached_input) == 1.25


def test_a_gemini_model_on_google(snapshot):
    price = book_of(snapshot).price("gemini", "google", GOOGLE, "gemini-2.5-pro")
    assert price is not None
    assert (per_mtok(price.input), per_mtok(price.output)) == (1.25, 10.0)


def test_an_openai_compatible_cloud_is_found_by_its_url(snapshot):
    """Groq serves through type ``openai``: its URL, not the type, says whose prices apply."""
    price = book_of(snapshot).price("groq", "openai", GROQ, "llama-3.3-70b-versatile")
    assert price is not None
    assert "groq" in price.source
    assert (per_mtok(price.input), per_mtok(price.output)) == (0.59, 0.79)


def test_an_unknown_cloud_model_has_no_price_and_says_so(snapshot, caplog):
    book = book_of(snapshot)
    with caplog.at_level(logging.WARNING, logger="nexus.cost"):
        assert book.price("oai", "openai", OPENAI, "no-such-model-anywhere") is None
    warned = [r for r in caplog.records if r.name == "nexus.cost" and r.levelno == logging.WARNING]
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert "no-such-model-anywhere" in message and "oai" in message and "[[pricing]]" in message
    # Looked up once per backend and model: no warning on every request.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nexus.cost"):
        assert book.price("oai", "openai", OPENAI, "no-such-model-anywhere") is None
    assert not caplog.records


@pytest.mark.parametrize("kind", ["vllm", "ollama", "llamacpp", "lmstudio", "exo", "generic"])
def test_local_types_are_free_even_for_a_cloud_models_name(snapshot, kind, caplog):
    with caplog.at_level(logging.WARNING, logger="nexus.cost"):
        assert book_of(snapshot).price("box", kind, LOCAL, "gpt-4o") is None
    assert not caplog.records  # free by design, not a missing price


def test_a_local_backend_is_priced_by_a_pricing_entry(snapshot):
    book = book_of(snapshot, {"model_pattern": "llama*", "input_per_mtok": 0.1,
                              "output_per_mtok": 0.2})  # fmt: skip
    price = book.price("box", "vllm", LOCAL, "llama3.2:latest")
    assert price is not None
    assert (per_mtok(price.input), per_mtok(price.output)) == (0.1, 0.2)
    assert price.source == "config (llama*)"
    assert book.price("box", "vllm", LOCAL, "qwen2.5") is None  # the glob does not match


# --- overrides ---------------------------------------------------------------------------------


def test_an_override_wins_over_the_snapshot(snapshot):
    book = book_of(snapshot, {"model_pattern": "gpt-4o*", "input_per_mtok": 1.0,
                              "output_per_mtok": 4.0})  # fmt: skip
    price = book.price("oai", "openai", OPENAI, "gpt-4o")
    assert price is not None
    assert (per_mtok(price.input), per_mtok(price.output)) == (1.0, 4.0)
    assert price.source.startswith("config")


def test_the_first_matching_override_wins(snapshot):
    book = book_of(
        snapshot,
        {"model_pattern": "gpt-4o-mini", "input_per_mtok": 0.5, "output_per_mtok": 0.5},
        {"model_pattern": "gpt-4o*", "input_per_mtok": 9.0, "output_per_mtok": 9.0},
    )
    mini = book.price("oai", "openai", OPENAI, "gpt-4o-mini")
    big = book.price("oai", "openai", OPENAI, "gpt-4o")
    assert mini is not None and per_mtok(mini.input) == 0.5
    assert big is not None and per_mtok(big.input) == 9.0


def test_an_override_limited_to_some_backends_by_a_glob(snapshot):
    book = book_of(snapshot, {"model_pattern": "*", "backend": "gpu-*", "input_per_mtok": 0.2,
                              "output_per_mtok": 0.4})  # fmt: skip
    gpu = book.price("gpu-1", "vllm", LOCAL, "llama3")
    assert gpu is not None and per_mtok(gpu.output) == 0.4
    assert book.price("laptop", "vllm", LOCAL, "llama3") is None
    # The cloud backend keeps its snapshot price: the override is not for it.
    cloud = book.price("oai", "openai", OPENAI, "gpt-4o")
    assert cloud is not None and per_mtok(cloud.input) == 2.5


def test_cached_input_and_cache_writes_default_to_the_input_price(snapshot):
    book = book_of(
        snapshot,
        {"model_pattern": "plain", "input_per_mtok": 2.0, "output_per_mtok": 8.0},
        {"model_pattern": "cached", "input_per_mtok": 2.0, "output_per_mtok": 8.0,
         "cached_input_per_mtok": 0.5, "cache_write_per_mtok": 2.5},
    )  # fmt: skip
    plain = book.price("box", "vllm", LOCAL, "plain")
    cached = book.price("box", "vllm", LOCAL, "cached")
    assert plain is not None and cached is not None
    assert per_mtok(plain.cached_input) == 2.0 and per_mtok(plain.cache_write) == 2.0
    assert per_mtok(cached.cached_input) == 0.5 and per_mtok(cached.cache_write) == 2.5
    assert plain.public() == {
        "input_per_mtok": 2.0,
        "output_per_mtok": 8.0,
        "cached_input_per_mtok": 2.0,
        "source": "config (plain)",
    }


def test_a_backend_re_added_with_another_type_is_looked_up_anew(snapshot):
    book = book_of(snapshot)
    assert book.price("box", "vllm", LOCAL, "gpt-4o") is None
    assert book.price("box", "openai", OPENAI, "gpt-4o") is not None


# --- costs -------------------------------------------------------------------------------------


def flat(input_: float, output: float, cached: float, write: float) -> Price:
    return Price(Rate(input_ / MTOK), Rate(output / MTOK), Rate(cached / MTOK),
                 Rate(write / MTOK), "test")  # fmt: skip


def test_a_cost_counts_each_kind_of_token_at_its_rate():
    price = flat(3.0, 15.0, 0.3, 3.75)
    # 1000 prompt tokens: 600 read from the cache, 100 written to it, 300 fresh; 200 out.
    tokens = Tokens(prompt=1000, completion=200, cached=600, cache_write=100, reasoning=50)
    expected = (300 * 3.0 + 600 * 0.3 + 100 * 3.75 + 200 * 15.0) / MTOK
    assert price.cost(tokens) == pytest.approx(expected)
    # Reasoning tokens are part of the completion (OpenAI counts them there): not billed twice.
    assert price.cost(Tokens(prompt=0, completion=200, reasoning=200)) == pytest.approx(
        200 * 15.0 / MTOK
    )


def test_the_worst_case_is_never_below_the_real_cost():
    price = flat(3.0, 15.0, 0.3, 3.75)
    worst = price.worst_case(1000, 200)
    for cached, write in [(0, 0), (1000, 0), (0, 1000), (500, 500)]:
        tokens = Tokens(prompt=1000, completion=200, cached=cached, cache_write=write)
        assert price.cost(tokens) <= worst + 1e-15
    assert worst == pytest.approx((1000 * 3.75 + 200 * 15.0) / MTOK)  # cache writes cost most


def test_a_long_prompt_pays_the_tier_rate_on_every_token(snapshot):
    """Anthropic's long context: past 200k prompt tokens, all tokens cost the tier rate."""
    price = book_of(snapshot).price("claude", "anthropic", ANTHROPIC, "claude-sonnet-4-5")
    assert price is not None
    short = price.cost(Tokens(prompt=200_000, completion=1000))
    long = price.cost(Tokens(prompt=200_001, completion=1000))
    assert short == pytest.approx((200_000 * 3.0 + 1000 * 15.0) / MTOK)
    assert long == pytest.approx((200_001 * 6.0 + 1000 * 22.5) / MTOK)
    assert price.worst_case(200_001, 1000) >= long


def test_tiers_apply_from_the_highest_start_passed():
    rate = Rate(1.0, ((100, 2.0), (1000, 3.0)))
    assert [rate.at(n) for n in (0, 100, 101, 1000, 1001)] == [1.0, 1.0, 2.0, 2.0, 3.0]


def test_tokens_from_an_openai_usage_with_details():
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 300,
        "total_tokens": 1300,
        "prompt_tokens_details": {"cached_tokens": 400, "cache_write_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 120},
    }
    assert Tokens.from_usage(usage) == Tokens(1000, 300, 400, 100, 120)


@pytest.mark.parametrize(
    "usage",
    [None, [], "usage", 42, True],
    ids=["none", "list", "string", "int", "bool"],
)
def test_something_that_is_not_a_usage_is_none(usage):
    assert Tokens.from_usage(usage) is None


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": True, "completion_tokens": False},
        {"prompt_tokens": -5, "completion_tokens": 1},
        {"prompt_tokens": 5, "completion_tokens": -1},
        {"prompt_tokens": "100", "completion_tokens": "7"},
        {"prompt_tokens": 1.5e9, "completion_tokens": 3},
        {"prompt_tokens": None, "completion_tokens": 3},
        {"completion_tokens": 3},
        {},
    ],
    ids=[
        "bools",
        "negative-prompt",
        "negative-completion",
        "strings",
        "float",
        "null-prompt",
        "no-prompt",
        "empty",
    ],  # fmt: skip
)
def test_a_usage_whose_counts_are_not_counts_is_none(usage):
    """Not read as zero (a free call): the caller charges its estimate instead."""
    assert Tokens.from_usage(usage) is None


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 9, "total_tokens": 9}, Tokens(9, 0)),  # embeddings
        ({"prompt_tokens": 9, "completion_tokens": None}, Tokens(9, 0)),
        ({"prompt_tokens": 0, "completion_tokens": 0}, Tokens(0, 0)),
        (
            {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": "x"},
            Tokens(10, 4),
        ),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 1,
                "completion_tokens_details": {"reasoning_tokens": True},
            },
            Tokens(10, 1),
        ),  # fmt: skip
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": -3, "cache_write_tokens": "4"},
            },
            Tokens(10, 1),
        ),  # fmt: skip
        # More cached (or written) tokens than the prompt has: capped at the prompt.
        (
            {
                "prompt_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 50, "cache_write_tokens": 99},
            },
            Tokens(10, 0, 10, 0),
        ),  # fmt: skip
        (
            {
                "prompt_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 8},
            },
            Tokens(10, 0, 6, 4),
        ),  # fmt: skip
    ],
    ids=[
        "embeddings",
        "null-completion",
        "zeros",
        "bad-details",
        "bool-reasoning",
        "bad-cache-counts",
        "cached-above-prompt",
        "cached-and-written-above-prompt",
    ],  # fmt: skip
)
def test_hostile_details_count_as_nothing_and_never_bill_past_the_prompt(usage, expected):
    tokens = Tokens.from_usage(usage)
    assert tokens == expected
    assert tokens is not None
    price = flat(1.0, 2.0, 0.5, 1.0)
    cost = price.cost(tokens)
    assert cost >= 0  # never a negative cost (a refund) from a backend's usage
    assert cost <= price.worst_case(tokens.prompt, tokens.completion) + 1e-15
