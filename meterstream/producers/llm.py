"""Token counts from the usage objects the OpenAI and Anthropic Python SDKs return.

Read by their documented field names, duck-typed (objects or dicts), so those
SDKs are not dependencies. Everything is normalised to meterstream's convention:
``input_tokens`` includes cached input; ``cached_input_tokens`` is the cached part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _count(obj: Any, name: str) -> int:
    value = _field(obj, name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"usage.{name} should be an int, got {type(value).__name__}")
    return value


def usage_from_openai(usage: Any) -> TokenUsage:
    """OpenAI ``CompletionUsage`` (chat completions) or ``ResponseUsage`` (responses API).

    Chat: ``prompt_tokens``, ``completion_tokens``, ``prompt_tokens_details.cached_tokens``.
    Responses: ``input_tokens``, ``output_tokens``, ``input_tokens_details.cached_tokens``.
    In both, the prompt/input count already includes the cached tokens.
    """
    if _field(usage, "prompt_tokens") is not None:
        return TokenUsage(
            input_tokens=_count(usage, "prompt_tokens"),
            output_tokens=_count(usage, "completion_tokens"),
            cached_input_tokens=_count(_field(usage, "prompt_tokens_details"), "cached_tokens"),
        )
    if _field(usage, "input_tokens") is not None:
        return TokenUsage(
            input_tokens=_count(usage, "input_tokens"),
            output_tokens=_count(usage, "output_tokens"),
            cached_input_tokens=_count(_field(usage, "input_tokens_details"), "cached_tokens"),
        )
    raise TypeError("not an OpenAI usage object: expected prompt_tokens or input_tokens")


def usage_from_anthropic(usage: Any) -> TokenUsage:
    """Anthropic ``Usage``: ``input_tokens`` excludes cache reads and writes, which are
    reported as ``cache_read_input_tokens`` and ``cache_creation_input_tokens``.

    Cache writes are counted as ordinary input here (the price book has no
    separate cache-write rate); cache reads are the cached part.
    """
    if _field(usage, "input_tokens") is None or _field(usage, "output_tokens") is None:
        raise TypeError("not an Anthropic usage object: expected input_tokens and output_tokens")
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    return TokenUsage(
        input_tokens=_count(usage, "input_tokens") + cache_read + cache_write,
        output_tokens=_count(usage, "output_tokens"),
        cached_input_tokens=cache_read,
    )
