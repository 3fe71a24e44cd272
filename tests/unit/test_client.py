"""The SDK client: events built and validated before producing, delivery failures never silent.

One test uses the real librdkafka producer against an address where nothing listens
(``127.0.0.1:1``) with a 10 ms message timeout, as confluent-kafka's own tests do, to
prove the failure path end to end. The others use a stand-in producer that records
what would be sent, so they are fast and can inspect the exact key, topic and value.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaException
from pydantic import ValidationError

from meterstream.config import KafkaSettings
from meterstream.producers import client as client_module
from meterstream.producers.client import DeliveryFailure, MeterClient, ProducerClosed
from meterstream.schemas.events import Attribution, Meter, OutcomeEvent, UsageEvent
from meterstream.stream_processors.decode import decode_event

T0 = datetime(2025, 3, 15, 12, 0, 0, tzinfo=timezone.utc)


class FakeProducer:
    """Stands in for confluent_kafka.Producer: records the config and every produce call."""

    instances: list[FakeProducer] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.produced: list[dict[str, Any]] = []
        self.callbacks: list[Callable[[Any, Any], None]] = []
        self.flushes = 0
        self.polls = 0
        self.buffer_errors = 0  # raise BufferError this many times before accepting
        self.produce_error: Exception | None = None
        self.fail: set[bytes] = set()  # values whose delivery flush() reports failed
        FakeProducer.instances.append(self)

    def produce(  # confluent-kafka's positional order: topic, value, key, partition, on_delivery
        self, topic: str, value: bytes, key: bytes, partition: int = -1,
        on_delivery: Callable[[Any, Any], None] | None = None,
    ) -> None:
        assert partition == -1, "the default partitioner (murmur2 on the key) picks the partition"
        assert on_delivery is not None, "every produce has a delivery callback"
        if self.produce_error is not None:
            raise self.produce_error
        if self.buffer_errors:
            self.buffer_errors -= 1
            raise BufferError("Local: Queue full")
        self.produced.append({"topic": topic, "value": value, "key": key})
        self.callbacks.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        self.polls += 1
        return 0

    def flush(self, timeout: float = 0) -> int:
        """Serve every delivery callback: delivered, or failed with ``error`` for the values in ``fail``."""
        self.flushes += 1
        callbacks, self.callbacks = self.callbacks, []
        sent = self.produced[len(self.produced) - len(callbacks):]
        for callback, message in zip(callbacks, sent, strict=True):
            if message["value"] in self.fail:
                msg = SimpleNamespace(value=lambda m=message: m["value"], key=lambda m=message: m["key"],
                                      topic=lambda m=message: m["topic"])
                callback(SimpleNamespace(str=lambda: "Local: Message timed out"), msg)
            else:
                callback(None, SimpleNamespace())  # delivered
        return 0

    def __len__(self) -> int:
        return len(self.callbacks)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[MeterClient, FakeProducer]]]:
    """Factory: a MeterClient on a FakeProducer."""
    monkeypatch.setattr(client_module, "Producer", FakeProducer)
    FakeProducer.instances = []

    def make(**kwargs: Any) -> tuple[MeterClient, FakeProducer]:
        kafka = kwargs.pop("kafka", KafkaSettings(bootstrap_servers="broker.invalid:9092"))
        meter = MeterClient(kafka, **kwargs)
        return meter, FakeProducer.instances[-1]

    yield make


# -- the failure path, with a real producer and no broker -----------------------------------------


@pytest.mark.timeout(60)
def test_undeliverable_event_is_reported_not_lost() -> None:
    failures: list[DeliveryFailure] = []
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    meter = MeterClient(
        KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix=prefix),
        on_delivery_error=failures.append,
        producer_config={"message.timeout.ms": 10},
    )
    event = UsageEvent(event_id="evt-undeliverable", customer_id="acme", occurred_at=T0, model="gpt-4o",
                       input_tokens=10, output_tokens=5)
    meter.record(event)
    assert meter.sent == 1
    assert meter.flush(30) == 0
    assert meter.failed == 1
    assert meter.delivered == 0
    assert len(failures) == 1
    failure = failures[0]
    assert failure.event_id == "evt-undeliverable"
    assert failure.customer_id == "acme"
    assert failure.topic == f"{prefix}usage.events"
    assert failure.error  # librdkafka's reason, e.g. "Local: Message timed out"
    # The exact bytes that were to be sent: the wire format, ready to resend or keep.
    assert failure.value == (
        b'{"schema_version":1,"event_id":"evt-undeliverable","customer_id":"acme",'
        b'"occurred_at":"2025-03-15T12:00:00Z","attributes":{},"type":"usage","meter":"tokens",'
        b'"model":"gpt-4o","input_tokens":10,"output_tokens":5,"cached_input_tokens":0,"quantity":"0"}'
    )
    assert decode_event(failure.value, "usage") == event
    # Nothing is left to wait for: a failed event is reported once, not retried forever.
    assert meter.flush(5) == 0
    assert meter.failed == 1 and len(failures) == 1
    meter.close(1)
    with pytest.raises(ProducerClosed):
        meter.record(event)


@pytest.mark.timeout(60)
def test_undeliverable_batch_is_reported_event_by_event() -> None:
    """record_many's column path keeps the delivery report of every event: each failure with its bytes."""
    failures: list[DeliveryFailure] = []
    meter = MeterClient(KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix=f"t{uuid.uuid4().hex[:8]}-"),
                        on_delivery_error=failures.append, producer_config={"message.timeout.ms": 10})  # fmt: skip
    batch = [{"event_id": f"evt-{i}", "customer_id": f"c{i % 3}", "occurred_at": T0, "model": "gpt-4o",
              "input_tokens": i} for i in range(40)]  # fmt: skip
    assert meter.record_many(batch) == 40
    assert meter.flush(30) == 0
    assert (meter.sent, meter.delivered, meter.failed) == (40, 0, 40)
    assert sorted(f.event_id for f in failures) == sorted(f"evt-{i}" for i in range(40))
    for failure in failures:
        assert failure.value == UsageEvent(**batch[int(failure.event_id[4:])]).wire_bytes()
    meter.close(1)


# -- building events ------------------------------------------------------------------------------


def _recent(moment: datetime) -> bool:
    return moment.tzinfo is not None and abs(datetime.now(timezone.utc) - moment) < timedelta(minutes=1)


@pytest.mark.clock  # the SDK stamps occurred_at from the clock
def test_record_openai_chat_usage(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake()
    usage = SimpleNamespace(prompt_tokens=1200, completion_tokens=300, prompt_tokens_details=SimpleNamespace(
        cached_tokens=1000))
    event = meter.record_openai_usage("acme", "gpt-4o-mini", usage, workflow_id="support-bot")
    assert isinstance(event, UsageEvent)
    assert (event.customer_id, event.model, event.provider, event.meter) == ("acme", "gpt-4o-mini", "openai",
                                                                             Meter.TOKENS)
    assert (event.input_tokens, event.output_tokens, event.cached_input_tokens) == (1200, 300, 1000)
    assert event.workflow_id == "support-bot"
    assert _recent(event.occurred_at)
    uuid.UUID(event.event_id)  # a fresh idempotency key
    [sent] = producer.produced
    assert sent["topic"] == "usage.events"
    assert sent["key"] == b"acme"
    assert decode_event(sent["value"], "usage") == event
    assert meter.sent == 1


def test_record_openai_responses_usage(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, _ = fake()
    usage = {"input_tokens": 900, "output_tokens": 250, "input_tokens_details": {"cached_tokens": 512}}
    event = meter.record_openai_usage("acme", "gpt-4o", usage, provider="azure")
    assert (event.input_tokens, event.output_tokens, event.cached_input_tokens) == (900, 250, 512)
    assert event.provider == "azure"  # an explicit provider wins over the default


def test_record_anthropic_usage(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake()
    usage = SimpleNamespace(input_tokens=50, output_tokens=400, cache_read_input_tokens=2000,
                            cache_creation_input_tokens=300)
    event = meter.record_anthropic_usage("acme", "claude-sonnet-4-5", usage)
    assert (event.input_tokens, event.output_tokens, event.cached_input_tokens) == (2350, 400, 2000)
    assert event.provider == "anthropic"
    assert decode_event(producer.produced[0]["value"], "usage") == event


def test_record_llm_call_keeps_given_id_and_time(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake()
    event = meter.record_llm_call("acme", "gpt-4o", input_tokens=10, output_tokens=2, event_id="call-42",
                                  occurred_at=T0, attributes={"feature": "search"})
    assert event.event_id == "call-42"
    assert event.occurred_at == T0
    assert event.attributes == {"feature": "search"}
    assert decode_event(producer.produced[0]["value"], "usage") == event


def test_each_event_gets_its_own_id(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, _ = fake()
    ids = {meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1).event_id for _ in range(5)}
    assert len(ids) == 5


def test_new_event_ids_are_uuid4_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(1000):
        event_id = client_module.new_event_id()
        parsed = uuid.UUID(event_id)
        assert str(parsed) == event_id
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
    # Exactly the text uuid.uuid4() makes of the same random bytes.
    for raw in (b"\x00" * 16, b"\xff" * 16, bytes(range(16)), bytes(range(240, 256))):
        monkeypatch.setattr(client_module.os, "urandom", lambda n, raw=raw: raw)
        assert client_module.new_event_id() == str(uuid.UUID(bytes=raw, version=4))


def test_record_quantity(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake()
    event = meter.record_quantity("acme", "documents", Decimal("2.5"), unit="pages")
    assert (event.meter, event.quantity, event.unit, event.model) == (Meter.DOCUMENTS, Decimal("2.5"), "pages", None)
    assert decode_event(producer.produced[0]["value"], "usage") == event
    assert meter.record_quantity("acme", Meter.REQUESTS, 3).quantity == Decimal(3)


def test_record_quantity_reads_floats_exactly(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, _ = fake()
    assert meter.record_quantity("acme", "actions", 0.1).quantity == Decimal("0.1")


def test_record_outcome_goes_to_the_outcome_topic(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake(kafka=KafkaSettings(topic_prefix="tenant1."))
    event = meter.record_outcome("acme", "resolved_ticket", "human_assisted", run_id="run-1")
    assert isinstance(event, OutcomeEvent)
    assert event.attribution is Attribution.HUMAN_ASSISTED
    [sent] = producer.produced
    assert sent["topic"] == "tenant1.outcome.events"
    assert sent["key"] == b"acme"
    assert decode_event(sent["value"], "outcome") == event


def test_successful_delivery_is_counted(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    failures: list[DeliveryFailure] = []
    meter, _ = fake(on_delivery_error=failures.append)
    meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
    meter.record_outcome("acme", "resolved_ticket", "ai_only")
    assert meter.pending == 2
    assert meter.flush() == 0
    assert (meter.sent, meter.delivered, meter.failed) == (2, 2, 0)
    assert failures == []


def test_failed_delivery_is_reported_with_the_exact_bytes(
    fake: Callable[..., tuple[MeterClient, FakeProducer]], caplog: pytest.LogCaptureFixture
) -> None:
    failures: list[DeliveryFailure] = []
    meter, producer = fake(on_delivery_error=failures.append)
    ok = meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1, event_id="evt-ok")
    lost = meter.record_outcome("globex", "resolved_ticket", "ai_only", event_id="evt-lost")
    lost_bytes = producer.produced[1]["value"]
    producer.fail = {lost_bytes}
    with caplog.at_level("ERROR", logger=client_module.__name__):
        assert meter.flush() == 0
    assert (meter.sent, meter.delivered, meter.failed, meter.pending) == (2, 1, 1, 0)
    assert failures == [DeliveryFailure("evt-lost", "globex", "outcome.events", "Local: Message timed out", lost_bytes)]
    assert decode_event(failures[0].value, "outcome") == lost
    assert ok.event_id not in caplog.text
    assert "delivery of event evt-lost to outcome.events failed: Local: Message timed out" in caplog.text


def test_record_many_sends_what_record_sends_and_counts_every_delivery(
    fake: Callable[..., tuple[MeterClient, FakeProducer]],
) -> None:
    """A batch mixing key layouts (column path and model path), built events and outcomes: the messages of
    ``record`` for each item, in batch order, each with the delivery callback; failures reported with bytes."""
    failures: list[DeliveryFailure] = []
    meter, producer = fake(on_delivery_error=failures.append)
    tokens = [{"event_id": f"t{i}", "customer_id": f"c{i % 4}", "occurred_at": T0 + timedelta(microseconds=i),
               "model": "gpt-4o", "input_tokens": i, "attributes": {"feature": "triage"}} for i in range(30)]  # fmt: skip
    outcomes = [{"event_id": f"o{i}", "customer_id": "acme", "occurred_at": "2025-03-15T12:00:00.250Z",
                 "type": "outcome", "outcome_type": "resolved_ticket", "attribution": Attribution.AI_ONLY}
                for i in range(20)]  # fmt: skip
    documents = [{"event_id": f"d{i}", "customer_id": "globex", "occurred_at": T0, "meter": Meter.DOCUMENTS,
                  "quantity": Decimal(i + 1)} for i in range(3)]  # fmt: skip
    built = UsageEvent(event_id="b1", customer_id="acme", occurred_at=T0, model="gpt-4o", input_tokens=1)
    batch: list[Any] = [*tokens[:10], *outcomes[:5], built, *documents, *tokens[10:], *outcomes[5:]]
    assert meter.record_many(batch) == len(batch)
    expected = [item if isinstance(item, UsageEvent) else
                (OutcomeEvent if item.get("type") == "outcome" else UsageEvent)(**item) for item in batch]  # fmt: skip
    assert producer.produced == [{"topic": "outcome.events" if isinstance(e, OutcomeEvent) else "usage.events",
                                  "value": e.wire_bytes(), "key": e.customer_id.encode()} for e in expected]  # fmt: skip
    lost = {producer.produced[3]["value"], producer.produced[12]["value"]}
    producer.fail = lost
    assert meter.flush() == 0
    assert (meter.sent, meter.delivered, meter.failed, meter.pending) == (len(batch), len(batch) - 2, 2, 0)
    assert {f.value for f in failures} == lost


def test_one_delivery_callback_serves_every_event(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake()
    for _ in range(3):
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
    meter.record_outcome("acme", "resolved_ticket", "ai_only")
    assert len({id(callback) for callback in producer.callbacks}) == 1


def test_delivery_callbacks_are_polled_now_and_then_not_per_event(
    fake: Callable[..., tuple[MeterClient, FakeProducer]],
) -> None:
    meter, producer = fake()
    for _ in range(200):
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
    assert 1 <= producer.polls < 200  # the first record polls, then once per POLL_INTERVAL
    polls = producer.polls
    for _ in range(3):
        time.sleep(meter.POLL_INTERVAL * 1.5)
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
    assert producer.polls == polls + 3  # events further apart than the interval each serve callbacks


def test_counters_are_exact_with_concurrent_producers(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, _ = fake()
    event = UsageEvent(event_id="evt-1", customer_id="acme", occurred_at=datetime.now(timezone.utc), model="gpt-4o")
    threads, per_thread = 8, 2_000

    def produce() -> None:
        for _ in range(per_thread):
            meter.record(event)

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(produce) for _ in range(threads)]:
            future.result()
    assert (meter.sent, meter.pending) == (threads * per_thread, threads * per_thread)
    assert meter.flush() == 0
    assert (meter.sent, meter.delivered, meter.failed, meter.pending) == (threads * per_thread, threads * per_thread, 0, 0)


# -- invalid input is refused before anything is produced -----------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda m: m.record_llm_call("acme", "gpt-4o", input_tokens="12", output_tokens=1), "input_tokens"),
        (lambda m: m.record_llm_call("acme", "gpt-4o", input_tokens=True, output_tokens=1), "input_tokens"),
        (lambda m: m.record_llm_call("acme", "gpt-4o", input_tokens=5, output_tokens=1, cached_input_tokens=6), ""),
        (lambda m: m.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1,
                                     occurred_at=datetime(2025, 3, 15)), "occurred_at"),
        (lambda m: m.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1, colour="red"), "colour"),
        (lambda m: m.record_llm_call("has space", "gpt-4o", input_tokens=1, output_tokens=1), "customer_id"),
        (lambda m: m.record_quantity("acme", "documents", -1), "quantity"),
        (lambda m: m.record_quantity("acme", "documents", True), "quantity"),
        (lambda m: m.record_quantity("acme", "tokens", 3), ""),
        (lambda m: m.record_outcome("acme", "", "ai_only"), "outcome_type"),
        (lambda m: m.record_openai_usage("acme", "", {"prompt_tokens": 1, "completion_tokens": 1}), "model"),
    ],
)
def test_invalid_input_raises_before_producing(
    fake: Callable[..., tuple[MeterClient, FakeProducer]], call: Callable[[MeterClient], Any], field: str
) -> None:
    meter, producer = fake()
    with pytest.raises(ValidationError) as info:
        call(meter)
    assert field in {str(e["loc"][0]) if e["loc"] else "" for e in info.value.errors()}
    assert meter.sent == 0
    assert producer.produced == []


def test_unknown_attribution_raises_before_producing(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake()
    with pytest.raises(ValueError, match="robot"):
        meter.record_outcome("acme", "resolved_ticket", "robot")
    assert producer.produced == []


# -- producer configuration -----------------------------------------------------------------------


def test_required_idempotence_settings_cannot_be_overridden(
    fake: Callable[..., tuple[MeterClient, FakeProducer]],
) -> None:
    _, producer = fake(producer_config={"enable.idempotence": False, "acks": "1", "partitioner": "random",
                                        "linger.ms": 50})
    assert producer.config["enable.idempotence"] is True
    assert producer.config["acks"] == "all"
    assert producer.config["partitioner"] == "murmur2_random"
    # Other settings are the caller's to choose.
    assert producer.config["linger.ms"] == 50
    assert producer.config["bootstrap.servers"] == "broker.invalid:9092"


def test_real_producer_accepts_the_config() -> None:
    # The merged config is valid for librdkafka (a bad key would raise KafkaException here).
    meter = MeterClient(KafkaSettings(bootstrap_servers="127.0.0.1:1"), producer_config={"message.timeout.ms": 10})
    meter.close(0)


# -- queue full and producer errors ---------------------------------------------------------------


def test_full_local_queue_is_retried_while_serving_callbacks(
    fake: Callable[..., tuple[MeterClient, FakeProducer]],
) -> None:
    meter, producer = fake()
    producer.buffer_errors = 3
    meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
    assert len(producer.produced) == 1
    assert producer.polls >= 3
    assert meter.sent == 1


def test_full_local_queue_gives_up_after_the_enqueue_timeout(
    fake: Callable[..., tuple[MeterClient, FakeProducer]],
) -> None:
    meter, producer = fake(enqueue_timeout=0.0)
    producer.buffer_errors = 10**9
    with pytest.raises(BufferError):
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
    assert meter.sent == 0


def test_producer_error_names_the_event(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake()
    producer.produce_error = KafkaException("boom")
    with pytest.raises(RuntimeError, match="cannot produce event evt-9"):
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1, event_id="evt-9")
    assert meter.sent == 0


def test_producer_error_after_a_full_queue_names_the_event(
    fake: Callable[..., tuple[MeterClient, FakeProducer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    meter, producer = fake()
    producer.buffer_errors = 1
    monkeypatch.setattr(producer, "poll", lambda timeout=0: setattr(producer, "produce_error", KafkaException("boom")))
    with pytest.raises(RuntimeError, match="cannot produce event evt-9"):
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1, event_id="evt-9")
    assert meter.sent == 0


# -- closing --------------------------------------------------------------------------------------


def test_using_the_client_after_close_raises(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, producer = fake()
    meter.close()
    assert producer.flushes == 1
    with pytest.raises(ProducerClosed):
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
    with pytest.raises(ProducerClosed):
        meter.record_outcome("acme", "resolved_ticket", "ai_only")
    with pytest.raises(ProducerClosed):
        meter.record_quantity("acme", "requests", 1)
    assert producer.produced == []
    meter.close()  # closing twice is harmless and does not flush again
    assert producer.flushes == 1


def test_context_manager_flushes_and_closes(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    with fake()[0] as meter:
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
        producer = FakeProducer.instances[-1]
        assert producer.flushes == 0
    assert producer.flushes == 1
    assert meter.delivered == 1
    with pytest.raises(ProducerClosed):
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)


def test_context_manager_closes_on_error(fake: Callable[..., tuple[MeterClient, FakeProducer]]) -> None:
    meter, _ = fake()
    with pytest.raises(KeyError), meter:
        raise KeyError("app failure")
    with pytest.raises(ProducerClosed):
        meter.record_llm_call("acme", "gpt-4o", input_tokens=1, output_tokens=1)
