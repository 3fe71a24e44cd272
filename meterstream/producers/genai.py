"""OpenTelemetry GenAI spans -> usage events: the one mapping, for the span processor and the OTLP receiver.

Pure (no OpenTelemetry import): it reads plain attribute mappings, so the
in-process span processor (:mod:`meterstream.producers.otel`) and the OTLP/HTTP
receiver (:mod:`meterstream.producers.otlp`) turn the same span into the same event.

**Which spans.** A span is metered when it carries a GenAI token count
(``gen_ai.usage.input_tokens`` or ``gen_ai.usage.output_tokens``; the older
``prompt_tokens`` / ``completion_tokens`` names too). Other spans are ignored.

**Tokens** follow the semantic conventions, which are also meterstream's:
``gen_ai.usage.input_tokens`` includes cached input;
``gen_ai.usage.cache_read.input_tokens`` (or the older
``gen_ai.usage.cache_read_input_tokens``) is the cached part; cache writes
(``gen_ai.usage.cache_creation.input_tokens``) are ordinary input. An
instrumentation that reports input *without* the cache (Anthropic's own
convention) shows it by reporting more cached than input tokens; then the cache
counts are added, as :func:`meterstream.producers.llm.usage_from_anthropic` does.

**Model**: the first of ``model_keys`` set (default: ``gen_ai.request.model``,
the name a price book knows, then ``gen_ai.response.model``). **Provider**:
``gen_ai.provider.name``, else the deprecated ``gen_ai.system``.

**Customer, workflow, run**: the first of the configured keys found on the span,
then in what the span inherits (baggage and its parent spans' attributes; see
the callers), then on the resource. A GenAI span without a customer is never
guessed: it is counted as ``no_customer`` and reported.

**Idempotency**: ``event_id`` is ``otel-<trace id>-<span id>``, so a span
exported twice (OTLP retries, both the processor and a collector) is billed once.
**Time**: ``occurred_at`` is the span's end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

INPUT_KEYS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OUTPUT_KEYS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
CACHE_READ_KEYS = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens",
                   "gen_ai.usage.input_tokens.cached")  # fmt: skip
CACHE_WRITE_KEYS = ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens",
                    "gen_ai.usage.input_tokens.cache_write")  # fmt: skip
PROVIDER_KEYS = ("gen_ai.provider.name", "gen_ai.system")


@dataclass(frozen=True)
class GenAIMapping:
    """Where the ids come from. Keys are looked up on the span, then inherited, then on the resource."""

    customer_keys: tuple[str, ...] = ("meterstream.customer_id",)
    workflow_keys: tuple[str, ...] = ("meterstream.workflow_id",)
    run_keys: tuple[str, ...] = ("meterstream.run_id",)
    model_keys: tuple[str, ...] = ("gen_ai.request.model", "gen_ai.response.model")

    @property
    def inherited_keys(self) -> tuple[str, ...]:
        """The keys a child span takes from its context (baggage, parent spans)."""
        return self.customer_keys + self.workflow_keys + self.run_keys


@dataclass(frozen=True)
class SpanUsage:
    """What one GenAI span says was used: the arguments of ``MeterClient.record_llm_call``."""

    customer_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    fields: dict[str, Any]  # provider, event_id, occurred_at, workflow_id, run_id (those present)


@dataclass(frozen=True)
class Skipped:
    #: ``not_genai`` (no token counts: ignored), ``no_customer`` or ``invalid`` (counted and reported)
    reason: str
    detail: str = ""


Lookup = Callable[[str], Any]


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():  # OTLP/JSON sends int64 as a string
        return int(value)
    raise ValueError(f"not a token count: {value!r}")


def _first(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = attributes.get(key)
        if value is not None and value != "":
            return value
    return None


def _count(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    return _int(_first(attributes, keys))


def event_id_for(trace_id: int, span_id: int) -> str:
    return f"otel-{trace_id:032x}-{span_id:016x}"


def span_usage(
    attributes: Mapping[str, Any],
    *,
    trace_id: int,
    span_id: int,
    end_time_ns: int,
    mapping: GenAIMapping,
    inherited: Mapping[str, Any] | None = None,
    resource: Mapping[str, Any] | None = None,
) -> SpanUsage | Skipped:
    """The usage of one finished span, or why it is not metered."""
    try:
        input_tokens = _count(attributes, INPUT_KEYS)
        output_tokens = _count(attributes, OUTPUT_KEYS)
        if input_tokens is None and output_tokens is None:
            return Skipped("not_genai")
        input_tokens, output_tokens = input_tokens or 0, output_tokens or 0
        cache_read = _count(attributes, CACHE_READ_KEYS) or 0
        cache_write = _count(attributes, CACHE_WRITE_KEYS) or 0
    except ValueError as exc:
        return Skipped("invalid", str(exc))
    if cache_read + cache_write > input_tokens:
        input_tokens += cache_read + cache_write  # reported the Anthropic way: input without the cache

    def find(keys: tuple[str, ...]) -> Any:
        for source in (attributes, inherited or {}, resource or {}):
            value = _first(source, keys)
            if value is not None:
                return value
        return None

    model = _first(attributes, mapping.model_keys)
    if model is None:
        return Skipped("invalid", "a GenAI span with token counts but no model")
    customer = find(mapping.customer_keys)
    if customer is None:
        return Skipped("no_customer", f"none of {', '.join(mapping.customer_keys)} is set")
    fields: dict[str, Any] = {
        "event_id": event_id_for(trace_id, span_id),
        "occurred_at": datetime.fromtimestamp(end_time_ns // 1_000_000_000, tz=timezone.utc).replace(
            microsecond=(end_time_ns // 1_000) % 1_000_000
        ),
    }
    provider = _first(attributes, PROVIDER_KEYS)
    if provider is not None:
        fields["provider"] = str(provider)
    for name, keys in (("workflow_id", mapping.workflow_keys), ("run_id", mapping.run_keys)):
        value = find(keys)
        if value is not None:
            fields[name] = str(value)
    return SpanUsage(str(customer), str(model), input_tokens, output_tokens, cache_read, fields)


def record(meter: Any, usage: SpanUsage) -> Any:
    """Send one span's usage through a ``MeterClient`` (validated there, like every SDK event)."""
    return meter.record_llm_call(
        usage.customer_id,
        usage.model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        **usage.fields,
    )
