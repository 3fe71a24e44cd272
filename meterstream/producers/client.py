"""The SDK: record usage and outcome events to Kafka, and never lose one silently.

Built on confluent-kafka's Producer with idempotence (``enable.idempotence``,
``acks=all``), keyed by customer with Kafka's default murmur2 partitioner (the
one the worker's tables assume). Every produce has a delivery callback: a
failure increments :attr:`MeterClient.failed` and calls ``on_delivery_error``.

    with MeterClient() as meter:
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1200, output_tokens=300)
        meter.record_openai_usage("acme", "gpt-4o-mini", completion.usage)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from meterstream.config import PRODUCER_GUARANTEES, KafkaSettings, get_settings
from meterstream.producers.llm import TokenUsage, usage_from_anthropic, usage_from_openai
from meterstream.schemas.events import Attribution, Meter, OutcomeEvent, UsageEvent
from meterstream.topics import Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryFailure:
    """An event the broker did not confirm. ``value`` holds the exact bytes, to resend or keep."""

    event_id: str
    customer_id: str
    topic: str
    error: str
    value: bytes


class ProducerClosed(RuntimeError):
    pass


class MeterClient:
    """Thread-safe producer of usage and outcome events."""

    #: Delivery guarantees no ``producer_config`` may weaken: idempotence, acks=all and the
    #: murmur2 partitioner, as every meterstream producer has (``KafkaSettings.producer_config``).
    REQUIRED = PRODUCER_GUARANTEES

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        *,
        on_delivery_error: Callable[[DeliveryFailure], None] | None = None,
        producer_config: dict[str, Any] | None = None,
        enqueue_timeout: float = 30.0,
    ) -> None:
        self.kafka = kafka or get_settings().kafka
        self.topics = Topics.from_settings(self.kafka)
        self.on_delivery_error = on_delivery_error
        self.enqueue_timeout = enqueue_timeout
        config: dict[str, Any] = {
            **self.kafka.confluent_config(),
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": 120_000,
            # librdkafka reports connection trouble through logging, not stderr.
            "logger": log,
            **(producer_config or {}),
            **self.REQUIRED,
        }
        self._producer = Producer(config)
        self._lock = threading.Lock()
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self._closed = False

    # -- events ---------------------------------------------------------------------------

    def record(self, event: UsageEvent | OutcomeEvent) -> None:
        """Queue one validated event; delivery is confirmed asynchronously (see ``flush``)."""
        if self._closed:
            raise ProducerClosed("this MeterClient is closed")
        topic = self.topics.outcomes.name if isinstance(event, OutcomeEvent) else self.topics.usage.name
        value = event.model_dump_json(exclude_none=True).encode()
        self._produce(topic, event.customer_id.encode(), value, event.event_id, event.customer_id)

    def record_usage(self, customer_id: str, **fields: Any) -> UsageEvent:
        """Build, validate and record a usage event; ``event_id`` and ``occurred_at`` default to new/now."""
        event = UsageEvent(**_defaults(customer_id, fields))
        self.record(event)
        return event

    def record_llm_call(
        self,
        customer_id: str,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        **fields: Any,
    ) -> UsageEvent:
        """One LLM call, from the model name and token counts."""
        return self.record_usage(
            customer_id,
            meter=Meter.TOKENS,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            **fields,
        )

    def record_openai_usage(self, customer_id: str, model: str, usage: Any, **fields: Any) -> UsageEvent:
        """One call from an OpenAI SDK ``usage`` object (chat completions or responses)."""
        return self._record_tokens(customer_id, model, usage_from_openai(usage), fields, "openai")

    def record_anthropic_usage(self, customer_id: str, model: str, usage: Any, **fields: Any) -> UsageEvent:
        """One call from an Anthropic SDK ``message.usage`` object."""
        return self._record_tokens(customer_id, model, usage_from_anthropic(usage), fields, "anthropic")

    def record_quantity(self, customer_id: str, meter: Meter | str, quantity: Decimal | int, **fields: Any) -> UsageEvent:
        """A non-token meter: requests, actions, documents, seats."""
        # The schema converts quantity (refusing booleans, reading floats via repr), so pass it as given.
        return self.record_usage(customer_id, meter=Meter(meter), quantity=quantity, **fields)

    def record_outcome(
        self, customer_id: str, outcome_type: str, attribution: Attribution | str, **fields: Any
    ) -> OutcomeEvent:
        event = OutcomeEvent(
            **_defaults(customer_id, {"outcome_type": outcome_type, "attribution": Attribution(attribution), **fields})
        )
        self.record(event)
        return event

    # -- delivery -------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events produced whose delivery has been neither confirmed nor reported failed."""
        with self._lock:
            return self.sent - self.delivered - self.failed

    def poll(self, timeout: float = 0) -> int:
        """Serve delivery callbacks; call it now and then if you produce without flushing."""
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding deliveries; returns how many are still unconfirmed (0 when done)."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        remaining = self.flush(timeout)
        self._closed = True
        if remaining:
            log.error("closing with %d events unconfirmed after %.0f s", remaining, timeout)

    def __enter__(self) -> MeterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record_tokens(
        self, customer_id: str, model: str, usage: TokenUsage, fields: dict[str, Any], provider: str
    ) -> UsageEvent:
        fields.setdefault("provider", provider)
        return self.record_llm_call(
            customer_id,
            model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            **fields,
        )

    def _produce(self, topic: str, key: bytes, value: bytes, event_id: str, customer_id: str) -> None:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                with self._lock:
                    self.delivered += 1
                return
            with self._lock:
                self.failed += 1
            failure = DeliveryFailure(event_id, customer_id, topic, err.str(), value)
            log.error("delivery of event %s to %s failed: %s", event_id, topic, err.str())
            if self.on_delivery_error is not None:
                self.on_delivery_error(failure)

        deadline = time.monotonic() + self.enqueue_timeout
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                # The local queue is full: serve callbacks to make room, within a bound.
                if time.monotonic() > deadline:
                    raise
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise RuntimeError(f"cannot produce event {event_id}: {exc}") from exc
        with self._lock:
            self.sent += 1
        self._producer.poll(0)


def _defaults(customer_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    fields = dict(fields)
    fields["customer_id"] = customer_id
    fields.setdefault("event_id", str(uuid.uuid4()))
    fields.setdefault("occurred_at", datetime.now(timezone.utc))
    return fields
