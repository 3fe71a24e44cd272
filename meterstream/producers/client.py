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

import itertools
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from itertools import repeat
from operator import contains, gt
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import TypeAdapter, ValidationError

from meterstream.clock import utc_now
from meterstream.config import PRODUCER_GUARANTEES, KafkaSettings, get_settings
from meterstream.producers.llm import (
    TokenUsage,
    usage_from_anthropic,
    usage_from_openai,
)
from meterstream.schemas import columnar
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
    #: Seconds between the delivery-callback polls ``record`` makes on its own.
    POLL_INTERVAL = 0.01

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
        self._usage_topic = self.topics.usage.name
        self._outcome_topic = self.topics.outcomes.name
        # Counters without a lock: next() on an itertools.count is atomic under the GIL, so
        # producing threads and whichever thread serves callbacks (poll/flush) can share them.
        self._sent, self._delivered, self._failed = itertools.count(), itertools.count(), itertools.count()
        self._count_sent, self._count_delivered, self._count_failed = (
            self._sent.__next__, self._delivered.__next__, self._failed.__next__)
        # One delivery callback for every message, bound once (a closure per event cost more).
        self._on_delivery_callback = self._on_delivery
        self._next_poll = 0.0
        self._closed = False

    # -- events ---------------------------------------------------------------------------

    def record(self, event: UsageEvent | OutcomeEvent) -> None:
        """Queue one validated event; delivery is confirmed asynchronously (see ``flush``)."""
        if self._closed:
            raise ProducerClosed("this MeterClient is closed")
        topic = self._outcome_topic if isinstance(event, OutcomeEvent) else self._usage_topic
        customer_id = event.customer_id
        self._produce(topic, customer_id.encode(), event.wire_bytes(), event.event_id, customer_id)

    def record_many(self, events: Iterable[UsageEvent | OutcomeEvent | Mapping[str, Any]]) -> int:
        """Validate and queue a batch of events; returns how many were queued.

        Items are built events or field mappings in the wire format (``customer_id`` and
        the event's fields; ``"type": "outcome"`` marks an outcome; ``event_id`` and
        ``occurred_at`` default to new/now as in :meth:`record_usage`). Every item is
        validated before anything is sent. Field dicts are checked as columns, grouped by
        their keys (:func:`meterstream.schemas.columnar.accept`: it accepts only what it
        can prove the models accept, and writes the bytes they would write); every item it
        does not accept, and every built event or other mapping, goes through the models,
        in one pydantic-core call per kind. If an item is invalid, the
        :class:`pydantic.ValidationError` building it alone raises (same errors, same text)
        is raised for the first invalid item, with a note giving its position, and nothing
        of the batch is queued. Every event gets the delivery callback that :meth:`record`
        gives it (``delivered``/``failed``/``on_delivery_error``).
        """
        if self._closed:
            raise ProducerClosed("this MeterClient is closed")
        messages = _wire_many(events if isinstance(events, list) else list(events))
        produce, callback = self._producer.produce, self._on_delivery_callback
        usage_topic, outcome_topic, count = self._usage_topic, self._outcome_topic, self._count_sent
        queued = 0
        try:
            for outcome, key, value in messages:
                topic = outcome_topic if outcome else usage_topic
                try:
                    # Positional arguments, as in _produce (keywords cost a third of a produce).
                    produce(topic, value, key, -1, callback)
                except BufferError:
                    self._produce_when_queue_has_room(topic, key, value)
                count()
                queued += 1
        except (KafkaException, BufferError) as exc:
            raise RuntimeError(f"cannot produce event {_event_id_of(messages[queued][2])} ({queued} of "
                               f"{len(messages)} of the batch queued): {exc}") from exc  # fmt: skip
        self._next_poll = time.monotonic() + self.POLL_INTERVAL
        self._producer.poll(0)
        return queued

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
    def sent(self) -> int:
        """Events handed to the producer (queued for delivery)."""
        return _current(self._sent)

    @property
    def delivered(self) -> int:
        """Events the broker confirmed."""
        return _current(self._delivered)

    @property
    def failed(self) -> int:
        """Events reported undeliverable (each also went to ``on_delivery_error``)."""
        return _current(self._failed)

    @property
    def pending(self) -> int:
        """Events produced whose delivery has been neither confirmed nor reported failed."""
        done = self.delivered + self.failed  # read before sent, so a callback in between cannot make this negative
        return self.sent - done

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
        try:
            try:
                # Positional arguments (partition -1: the partitioner decides): parsing keywords
                # costs confluent-kafka about a third of a produce call.
                self._producer.produce(topic, value, key, -1, self._on_delivery_callback)
            except BufferError:
                self._produce_when_queue_has_room(topic, key, value)
        except KafkaException as exc:
            raise RuntimeError(f"cannot produce event {event_id}: {exc}") from exc
        self._count_sent()
        # Serve delivery callbacks now and then, not after every event: a poll costs about as
        # much as a produce. A full queue and flush() serve them too.
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.POLL_INTERVAL
            self._producer.poll(0)

    def _produce_when_queue_has_room(self, topic: str, key: bytes, value: bytes) -> None:
        # The local queue is full: serve callbacks to make room, within a bound.
        deadline = time.monotonic() + self.enqueue_timeout
        while True:
            self._producer.poll(0.05)
            try:
                self._producer.produce(topic, value, key, -1, self._on_delivery_callback)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self._count_delivered()
            return
        self._count_failed()
        value = msg.value() or b""
        topic = msg.topic() or ""
        key = msg.key() or b""
        failure = DeliveryFailure(_event_id_of(value), key.decode(errors="replace"), topic, err.str(), value)
        log.error("delivery of event %s to %s failed: %s", failure.event_id, topic, failure.error)
        if self.on_delivery_error is not None:
            self.on_delivery_error(failure)


def _current(counter: itertools.count[int]) -> int:
    # itertools.count cannot be read without advancing it; its repr is "count(N)".
    return int(repr(counter)[6:-1])


def _event_id_of(value: bytes) -> str:
    """The event id inside a produced value (only read on the rare failure path)."""
    try:
        return str(json.loads(value)["event_id"])
    except (ValueError, KeyError, TypeError):
        return "?"


def new_event_id() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` gives, in about half the time.

    The ``uuid.UUID`` object costs more than the 16 random bytes; only its text is needed.
    """
    n = int.from_bytes(os.urandom(16)) & _UUID4_KEEP | _UUID4_SET
    h = n.to_bytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: RFC 4122 version 4: the version nibble is 4 and the variant bits are 10.
_UUID4_KEEP = ~(0xF000 << 64 | 0xC000 << 48)
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48


_USAGE_LIST = TypeAdapter(list[UsageEvent])
_OUTCOME_LIST = TypeAdapter(list[OutcomeEvent])
#: Items of one key layout below this many are validated by the models alone (not worth a column pass).
_MIN_GROUP = 16


def _wire_many(items: list[UsageEvent | OutcomeEvent | Mapping[str, Any]]) -> list[tuple[bool, bytes, bytes]]:
    """``(is_outcome, key, value)`` per item, in order: what ``record`` of the item's model would produce.

    Field dicts are grouped by their keys (in order) and each group of at least
    :data:`_MIN_GROUP` goes through :func:`columnar.accept` as columns, against the clock read
    before it (the models read theirs later, so what it accepts they accept too); its accepted
    rows are sent with the wire bytes it builds. Every other item is validated by the models
    (:func:`_validate_many`), whose errors are raised (see ``record_many``).
    """
    given: list[Any] = items
    if set(map(type, given)) == {dict} and all(map(contains, given, repeat("event_id"))) and \
            all(map(contains, given, repeat("occurred_at"))):  # fmt: skip
        filled = given  # the usual batch: dicts with ids and times, checked in C
    else:
        filled = _filled(given)
    positions, messages, slow = _accept_as_columns(filled)
    if slow:
        events = _validate_many([filled[i] for i in slow], slow)
        positions += slow
        messages += [(type(event) is OutcomeEvent, event.customer_id.encode(), event.wire_bytes()) for event in events]
    if len(positions) > 1 and any(map(gt, positions, positions[1:])):  # back in batch order
        messages = list(map(messages.__getitem__, sorted(range(len(positions)), key=positions.__getitem__)))
    return messages


def _filled(items: list[Any]) -> list[Any]:
    """The items with ``event_id`` and ``occurred_at`` filled in where missing (new/now, as ``record_usage``)."""
    filled: list[Any] = []
    for i, item in enumerate(items):
        if type(item) is dict and "event_id" in item and "occurred_at" in item:
            filled.append(item)  # the usual item, without the (slow) ABC check below
        elif isinstance(item, (UsageEvent, OutcomeEvent)):
            filled.append(item)
        elif not isinstance(item, Mapping):
            raise TypeError(f"record_many takes events or mappings of their fields; item {i} is a {type(item).__name__}")
        elif "event_id" not in item or "occurred_at" not in item:
            filled.append({"event_id": new_event_id(), "occurred_at": utc_now(), **item})
        else:
            filled.append(item)
    return filled


def _accept_as_columns(items: list[Any]) -> tuple[list[int], list[tuple[bool, bytes, bytes]], list[int]]:
    """``(positions, messages)`` of the field dicts :func:`columnar.accept` accepts; the positions of the other items."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    slow: list[int] = []
    if set(map(type, items)) == {dict} and len(layouts := set(map(tuple, items))) == 1:
        groups[layouts.pop()] = list(range(len(items)))  # the usual batch: one key layout
    else:
        grouped: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if type(item) is dict:
                grouped[tuple(item)].append(i)
            else:
                slow.append(i)  # a built event (its own wire bytes) or another mapping: the model path
        groups = grouped
    positions: list[int] = []
    messages: list[tuple[bool, bytes, bytes]] = []
    now = utc_now()
    for keys, members in groups.items():
        if len(members) < _MIN_GROUP:
            slow.extend(members)
            continue
        rows = items if len(members) == len(items) else [items[i] for i in members]
        columns = columnar.transpose(keys, rows)
        got = columnar.accept(columns, len(rows), none_is_absent=False, now=now, wire=True, python=True)
        assert got.wire is not None
        positions += map(members.__getitem__, got.rows)
        messages += zip(got.outcome, map(str.encode, got.customer_id), got.wire, strict=True)
        if len(got.rows) != len(members):
            accepted = set(got.rows)
            slow.extend(m for r, m in enumerate(members) if r not in accepted)
    slow.sort()  # batch order: the first invalid item is the one reported
    return positions, messages, slow


def _validate_many(items: list[Any], positions: list[int] | None = None) -> list[UsageEvent | OutcomeEvent]:
    """Built events as given; mappings validated per kind in one pydantic-core call each, order kept."""
    positions = positions if positions is not None else list(range(len(items)))
    out: list[Any] = list(items)
    usage_at: list[int] = []
    usage: list[Any] = []
    outcome_at: list[int] = []
    outcomes: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, (UsageEvent, OutcomeEvent)):
            continue
        if item.get("type") == "outcome":
            outcome_at.append(i)
            outcomes.append(item)
        else:
            usage_at.append(i)
            usage.append(item)
    try:
        for at, fields, adapter in ((usage_at, usage, _USAGE_LIST), (outcome_at, outcomes, _OUTCOME_LIST)):
            if fields:
                for i, event in zip(at, adapter.validate_python(fields), strict=True):
                    out[i] = event
    except ValidationError:
        # The first invalid item in batch order, built alone: its own error, text and all.
        for position, item in zip(positions, items, strict=True):
            if isinstance(item, (UsageEvent, OutcomeEvent)):
                continue
            model = OutcomeEvent if item.get("type") == "outcome" else UsageEvent
            try:
                model.model_validate(item)
            except ValidationError as exc:
                exc.add_note(f"record_many: item {position} of the batch is invalid; nothing of the batch was queued")
                raise
        raise
    return out


def _defaults(customer_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    fields = dict(fields)
    fields["customer_id"] = customer_id
    if "event_id" not in fields:
        fields["event_id"] = new_event_id()
    if "occurred_at" not in fields:
        fields["occurred_at"] = utc_now()
    return fields
