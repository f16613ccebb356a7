"""What the clouds report, read defensively: a Gemini ``models.list`` entry's context and output
limit (a priced call's worst case), and token counts that may not be counts."""

from __future__ import annotations

from nexus.backends.google import model_from_entry


def entry(**extra: object) -> dict[str, object]:
    return {
        "name": "models/gemini-2.5-flash",
        "supportedGenerationMethods": ["generateContent", "countTokens"],
        "inputTokenLimit": 1_048_576,
        **extra,
    }


def test_the_output_limit_is_kept_for_the_worst_case() -> None:
    model = model_from_entry(entry(outputTokenLimit=65_536))
    assert model is not None
    assert (model.id, model.context_length, model.max_output_tokens) == (
        "gemini-2.5-flash",
        1_048_576,
        65_536,
    )


def test_an_output_limit_that_is_not_a_count_is_unknown() -> None:
    for value in (None, "65536", -1, 0, True):
        model = model_from_entry(entry(outputTokenLimit=value))
        assert model is not None and not model.max_output_tokens


def test_usage_counts_that_are_not_counts_are_zero_not_a_crash() -> None:
    from nexus.dialects.anthropic import usage
    from nexus.dialects.counts import count

    values: tuple[object, ...] = (5, "7", -3, True, 2.5, "x", None, {}, "9" * 30)
    assert [count(v) for v in values] == [
        5, 7, 0, 0, 0, 0, 0, 0, 0,
    ]  # fmt: skip
    hostile: dict[str, object] = {
        "input_tokens": "12",
        "output_tokens": [],
        "cache_read_input_tokens": -1,
    }
    assert usage(hostile)["prompt_tokens"] == 12 and usage(hostile)["completion_tokens"] == 0
