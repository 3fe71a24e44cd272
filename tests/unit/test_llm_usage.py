"""Token counts from OpenAI and Anthropic usage objects, normalised to meterstream's convention."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from meterstream.producers.llm import TokenUsage, usage_from_anthropic, usage_from_openai

NS = SimpleNamespace


# -- OpenAI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [
        NS(prompt_tokens=1200, completion_tokens=300, total_tokens=1500, prompt_tokens_details=NS(cached_tokens=1000)),
        {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
         "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 0}},
    ],
    ids=["object", "dict"],
)
def test_openai_chat_completions_usage(usage: Any) -> None:
    assert usage_from_openai(usage) == TokenUsage(input_tokens=1200, output_tokens=300, cached_input_tokens=1000)


@pytest.mark.parametrize(
    "usage",
    [
        NS(input_tokens=900, output_tokens=250, total_tokens=1150, input_tokens_details=NS(cached_tokens=512),
           output_tokens_details=NS(reasoning_tokens=100)),
        {"input_tokens": 900, "output_tokens": 250, "input_tokens_details": {"cached_tokens": 512}},
    ],
    ids=["object", "dict"],
)
def test_openai_responses_usage(usage: Any) -> None:
    assert usage_from_openai(usage) == TokenUsage(input_tokens=900, output_tokens=250, cached_input_tokens=512)


@pytest.mark.parametrize(
    "usage",
    [
        NS(prompt_tokens=10, completion_tokens=2, prompt_tokens_details=None),
        NS(prompt_tokens=10, completion_tokens=2),
        {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": None}},
    ],
)
def test_openai_usage_without_cache_details(usage: Any) -> None:
    assert usage_from_openai(usage) == TokenUsage(input_tokens=10, output_tokens=2, cached_input_tokens=0)


def test_openai_zero_prompt_tokens_is_still_chat_usage() -> None:
    # 0 is a present count, not a missing one.
    assert usage_from_openai({"prompt_tokens": 0, "completion_tokens": 7}) == TokenUsage(0, 7, 0)


@pytest.mark.parametrize(
    ("usage", "fragment"),
    [
        ({"prompt_tokens": "12", "completion_tokens": 3}, "usage.prompt_tokens should be an int, got str"),
        (NS(prompt_tokens=12, completion_tokens=True), "usage.completion_tokens should be an int, got bool"),
        ({"prompt_tokens": 12.0, "completion_tokens": 3}, "got float"),
        ({"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": "5"}},
         "usage.cached_tokens"),
        ({"input_tokens": 12, "output_tokens": "3"}, "usage.output_tokens"),
        ({"total_tokens": 15}, "not an OpenAI usage object"),
        (NS(), "not an OpenAI usage object"),
        (None, "not an OpenAI usage object"),
    ],
)
def test_openai_wrong_types_raise_type_error(usage: Any, fragment: str) -> None:
    with pytest.raises(TypeError, match=fragment):
        usage_from_openai(usage)


# -- Anthropic ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [
        NS(input_tokens=50, output_tokens=400, cache_read_input_tokens=2000, cache_creation_input_tokens=300),
        {"input_tokens": 50, "output_tokens": 400, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 300},
    ],
    ids=["object", "dict"],
)
def test_anthropic_usage_counts_cache_reads_and_writes_as_input(usage: Any) -> None:
    # Anthropic's input_tokens excludes both cache fields; meterstream's input includes them,
    # and only cache reads are the cached (cheaper) part.
    assert usage_from_anthropic(usage) == TokenUsage(input_tokens=2350, output_tokens=400, cached_input_tokens=2000)


@pytest.mark.parametrize(
    "usage",
    [
        NS(input_tokens=50, output_tokens=4, cache_read_input_tokens=None, cache_creation_input_tokens=None),
        {"input_tokens": 50, "output_tokens": 4},
    ],
)
def test_anthropic_usage_without_cache(usage: Any) -> None:
    assert usage_from_anthropic(usage) == TokenUsage(input_tokens=50, output_tokens=4, cached_input_tokens=0)


def test_anthropic_cache_writes_are_not_cached_input() -> None:
    usage = usage_from_anthropic(NS(input_tokens=10, output_tokens=1, cache_creation_input_tokens=90))
    assert usage == TokenUsage(input_tokens=100, output_tokens=1, cached_input_tokens=0)


@pytest.mark.parametrize(
    ("usage", "fragment"),
    [
        ({"input_tokens": 10}, "not an Anthropic usage object"),
        (NS(output_tokens=10), "not an Anthropic usage object"),
        (None, "not an Anthropic usage object"),
        ({"prompt_tokens": 10, "completion_tokens": 2}, "not an Anthropic usage object"),
        ({"input_tokens": "10", "output_tokens": 1}, "usage.input_tokens should be an int, got str"),
        (NS(input_tokens=10, output_tokens=False), "usage.output_tokens should be an int, got bool"),
        ({"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 2.0}, "usage.cache_read_input_tokens"),
        ({"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": "5"}, "cache_creation_input_tokens"),
    ],
)
def test_anthropic_wrong_types_raise_type_error(usage: Any, fragment: str) -> None:
    with pytest.raises(TypeError, match=fragment):
        usage_from_anthropic(usage)
