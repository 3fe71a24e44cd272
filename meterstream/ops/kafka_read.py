"""Read a whole topic with confluent-kafka, bounded: to the high watermarks taken at the start."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from meterstream.config import KafkaSettings


@dataclass(frozen=True)
class TopicMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None


@dataclass(frozen=True)
class TopicRead:
    topic: str
    messages: list[TopicMessage]
    #: partition -> (low watermark, high watermark) when the read started.
    watermarks: dict[int, tuple[int, int]]
    exists: bool = True

    @property
    def retention_dropped(self) -> bool:
        """True when some partition no longer starts at offset 0 (retention or compaction removed messages)."""
        return any(low > 0 for low, _ in self.watermarks.values())


class TopicReadError(RuntimeError):
    pass


def read_topic(kafka: KafkaSettings, topic: str, timeout: float = 30.0) -> TopicRead:
    """Every message of ``topic`` from the low to the high watermark of each partition.

    Messages produced after the watermarks were taken are not read, so the read ends.
    Raises :class:`TopicReadError` when it cannot finish within ``timeout`` seconds.
    """
    consumer = Consumer(
        {
            **kafka.confluent_config(),
            "group.id": f"meterstream-ops-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    messages: list[TopicMessage] = []
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=timeout)
        except KafkaException as exc:
            raise TopicReadError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
        meta = metadata.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return TopicRead(topic, [], {}, exists=False)
        watermarks = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout) for p in sorted(meta.partitions)
        }
        todo = {p for p, (low, high) in watermarks.items() if high > low}
        consumer.assign([TopicPartition(topic, p, watermarks[p][0]) for p in sorted(todo)])
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TopicReadError(
                    f"could not read {topic} to its end within {timeout:.0f} s "
                    f"({len(messages)} messages read, partitions {sorted(todo)} unfinished)"
                )
            message = consumer.poll(0.5)
            if message is None:
                # Offsets can have gaps (control records, compaction): go by the position too.
                for tp in consumer.position([TopicPartition(topic, p) for p in list(todo)]):
                    if tp.offset >= watermarks[tp.partition][1]:
                        todo.discard(tp.partition)
                continue
            if message.error():
                raise TopicReadError(f"error reading {topic}: {message.error()}")
            partition, offset = message.partition(), message.offset()
            if partition is None or offset is None or partition not in todo:
                continue
            if offset < watermarks[partition][1]:
                _, stamp = message.timestamp()
                messages.append(TopicMessage(topic, partition, offset, message.key(), message.value(), stamp))
            if offset + 1 >= watermarks[partition][1]:
                todo.discard(partition)
    finally:
        consumer.close()
    return TopicRead(topic, messages, watermarks)
