"""Reading ``budget-alerts``: decoding, and following the topic for ``alerts tail``.

Every value is validated with :class:`BudgetAlert`, the wire format; a value that
does not validate is reported with its partition and offset, never raised.
``alerts tail`` follows the topic with confluent-kafka (read_committed, no group),
the client of the SDK and the other command-line tools; the forwarder reads it
as a Faust agent (forwarder.py) and checks the topic with aiokafka here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from pydantic import ValidationError

from meterstream.config import KafkaSettings
from meterstream.kafka_clients import aiokafka_client_args
from meterstream.schemas.records import BudgetAlert

log = logging.getLogger(__name__)


class AlertSourceError(RuntimeError):
    pass


@dataclass(frozen=True)
class AlertMessage:
    """One message of the alert topic: the alert, or why it is not one."""

    alert: BudgetAlert | None
    reason: str
    raw: bytes
    topic: str
    partition: int
    offset: int


def decode_alert(value: bytes | None, topic: str, partition: int, offset: int) -> AlertMessage:
    raw = value or b""
    try:
        alert, reason = BudgetAlert.model_validate_json(raw), ""
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        alert, reason = None, f"not a BudgetAlert: {where}: {first['msg']}"
    return AlertMessage(alert, reason, raw, topic, partition, offset)


def consumer_config(kafka: KafkaSettings, group_id: str, **extra: Any) -> dict[str, Any]:
    return {
        **kafka.confluent_config(),
        "group.id": group_id,
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        **extra,
    }


def topic_partitions(consumer: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    """The topic's partitions; a missing topic is an error that says so."""
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        raise AlertSourceError(f"cannot reach Kafka: {exc}") from exc
    described = metadata.topics.get(topic)
    if described is None or described.error is not None or not described.partitions:
        raise AlertSourceError(
            f"topic {topic} does not exist yet (the worker creates it; check METERSTREAM_KAFKA__TOPIC_PREFIX)"
        )
    return sorted(described.partitions)


async def source_partitions(kafka: KafkaSettings, topic: str, timeout: float = 10.0) -> list[int]:
    """The topic's partitions, read with aiokafka (the forwarder's client family); a missing topic
    is an error that says so."""
    consumer = AIOKafkaConsumer(**aiokafka_client_args(kafka), enable_auto_commit=False)
    try:
        await asyncio.wait_for(consumer.start(), timeout)
        # A consumer without a subscription holds no metadata: fetch every topic's.
        cluster = await asyncio.wait_for(consumer._client.fetch_all_metadata(), timeout)
    except (TimeoutError, KafkaError) as exc:
        raise AlertSourceError(f"cannot reach Kafka: {exc or type(exc).__name__}") from exc
    finally:
        await consumer.stop()
    partitions = cluster.partitions_for_topic(topic)
    if not partitions:
        raise AlertSourceError(
            f"topic {topic} does not exist yet (the worker creates it; check METERSTREAM_KAFKA__TOPIC_PREFIX)"
        )
    return sorted(partitions)


def follow_topic(
    kafka: KafkaSettings,
    topic: str,
    *,
    from_beginning: bool,
    stop: threading.Event,
    deadline: float | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Iterator[AlertMessage]:
    """Every message of ``topic`` from the end (or the beginning) until ``stop`` or ``deadline`` (monotonic).

    Partitions are assigned directly, with a throwaway group id and no commits,
    so a tail never joins or disturbs a consumer group. "The end" is each
    partition's high watermark when the tail starts: anything published after
    ``on_ready`` is called is seen.
    """
    consumer = Consumer(consumer_config(kafka, f"meterstream-alerts-tail-{uuid.uuid4().hex[:12]}"))
    try:
        partitions = topic_partitions(consumer, topic)
        if from_beginning:
            assignment = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        else:
            assignment = [
                TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
                for p in partitions
            ]
        consumer.assign(assignment)
        if on_ready is not None:
            on_ready()
        while not stop.is_set():
            wait = 0.5
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            message = consumer.poll(wait)
            if message is None:
                continue
            if message.error():
                error = message.error()
                if error is not None and error.fatal():
                    raise AlertSourceError(str(error))
                log.warning("reading %s: %s", topic, message.error())
                continue
            # A message without an error always has its place (confluent-kafka types them optional).
            yield decode_alert(message.value(), topic, cast(int, message.partition()), cast(int, message.offset()))
    finally:
        consumer.close()

