"""Zero-code metering: an OpenTelemetry span processor that meters every finished GenAI span.

    from opentelemetry.sdk.trace import TracerProvider
    from meterstream.producers import MeterClient
    from meterstream.producers.otel import MeteringSpanProcessor

    meter = MeterClient()
    provider = TracerProvider()
    provider.add_span_processor(MeteringSpanProcessor(meter))
    OpenAIInstrumentor().instrument(tracer_provider=provider)   # any GenAI instrumentation

    with tracer.start_as_current_span("handle-ticket", attributes={"meterstream.customer_id": "acme"}):
        client.chat.completions.create(...)   # its span becomes a usage event for acme

Needs the ``otel`` extra (``pip install 'meterstream[otel]'``). The mapping from
span to event is :mod:`meterstream.producers.genai` (shared with ``meterstream
otlp``). Instrumentations create their spans without knowing the customer, so a
span inherits the configured keys (``meterstream.customer_id``,
``meterstream.workflow_id``, ``meterstream.run_id`` by default) from its parent
spans' attributes and from OpenTelemetry baggage when it starts; the resource's
attributes come last. A GenAI span with no customer anywhere is not metered: it
is counted (``counts["no_customer"]``), logged, and passed to ``on_unmetered``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from pydantic import ValidationError

from meterstream.producers.genai import GenAIMapping, Skipped, SpanUsage, record, span_usage

log = logging.getLogger(__name__)


class MeteringSpanProcessor(SpanProcessor):
    """Turns each finished GenAI span into a usage event through a ``MeterClient``.

    ``counts`` holds ``metered``, ``no_customer`` and ``invalid`` (a span the event
    schema refused, e.g. more cached than input tokens); ``on_unmetered(span,
    skipped)`` is called for the last two. The meter is the caller's: the processor
    flushes it on ``force_flush`` and never closes it.
    """

    def __init__(
        self,
        meter: Any,
        mapping: GenAIMapping | None = None,
        *,
        on_unmetered: Callable[[ReadableSpan, Skipped], None] | None = None,
    ) -> None:
        self.meter = meter
        self.mapping = mapping or GenAIMapping()
        self.on_unmetered = on_unmetered
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        #: span id -> ids inherited at start, while the span is open
        self._inherited: dict[int, dict[str, Any]] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        keys = self.mapping.inherited_keys
        inherited: dict[str, Any] = {}
        parent = trace.get_current_span(parent_context)
        parent_id = parent.get_span_context().span_id if parent is not None else 0
        parent_attributes = getattr(parent, "attributes", None) or {}
        sources = [parent_attributes, self._inherited.get(parent_id, {}), baggage.get_all(parent_context)]
        for key in keys:
            for source in sources:
                value = source.get(key)
                if value is not None and value != "":
                    inherited[key] = value
                    break
        if inherited:
            self._inherited[span.get_span_context().span_id] = inherited

    def on_end(self, span: ReadableSpan) -> None:
        context = span.get_span_context()
        if context is None:  # a span that was never started has no context to meter
            return
        inherited = self._inherited.pop(context.span_id, None)
        usage = span_usage(
            span.attributes or {},
            trace_id=context.trace_id,
            span_id=context.span_id,
            end_time_ns=span.end_time or 0,
            mapping=self.mapping,
            inherited=inherited,
            resource=span.resource.attributes if span.resource is not None else None,
        )
        if isinstance(usage, SpanUsage):
            try:
                record(self.meter, usage)
            except (ValidationError, ValueError) as exc:  # a processor must never raise into the app
                usage = Skipped("invalid", str(exc).splitlines()[0])
            else:
                self._count("metered")
                return
        if usage.reason == "not_genai":
            return
        if self._count(usage.reason) == 1:  # the first of each kind is logged; the counts say how many
            log.warning("GenAI span %r not metered (%s: %s); further ones are counted in .counts only",
                        span.name, usage.reason, usage.detail)  # fmt: skip
        if self.on_unmetered is not None:
            self.on_unmetered(span, usage)

    def _count(self, reason: str) -> int:
        with self._lock:
            self.counts[reason] += 1
            return self.counts[reason]

    def shutdown(self) -> None:
        self.meter.flush()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self.meter.flush(timeout_millis / 1000) == 0)
