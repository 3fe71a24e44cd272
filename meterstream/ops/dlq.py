"""The dead-letter topic: list, show and replay rejected messages.

The worker publishes each rejected message to ``meterstream.dead-letter`` as a
:class:`~meterstream.schemas.records.DeadLetter` (raw bytes in base64, reason,
source topic/partition/offset), keyed with the original message's key.

Replaying re-produces the raw bytes to the source topic with the original key,
through the idempotent murmur2 producer every meterstream producer uses
(:meth:`KafkaSettings.producer_config`), so the message lands on the partition
its customer's events use. It is safe to replay more than once: the worker
dedupes by ``(customer_id, event_id)`` and the store is keyed the same way
(ReplacingMergeTree, read with FINAL), so an event is billed once however many
times it arrives. A message that is still invalid is dead-lettered again.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import KafkaException, Producer
from pydantic import ValidationError

from meterstream.config import KafkaSettings
from meterstream.ops.kafka_read import TopicMessage, read_topic
from meterstream.schemas.records import DeadLetter
from meterstream.topics import Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetterEntry:
    """One message on the dead-letter topic: where it is, its key and the decoded letter (None if unreadable)."""

    partition: int
    offset: int
    key: bytes | None
    letter: DeadLetter | None
    error: str = ""  # why the letter itself could not be read

    @property
    def ref(self) -> str:
        return f"{self.partition}:{self.offset}"

    def summary(self) -> dict[str, Any]:
        letter = self.letter
        return {
            "partition": self.partition,
            "offset": self.offset,
            "key": _text_or_none(self.key),
            "rejected_at": letter.rejected_at.isoformat() if letter else None,
            "source_topic": letter.source_topic if letter else None,
            "source_partition": letter.source_partition if letter else None,
            "source_offset": letter.source_offset if letter else None,
            "reason": letter.reason if letter else f"unreadable dead letter: {self.error}",
            "size": (letter.size if letter.size is not None else len(letter.raw)) if letter else 0,
            "truncated": letter.truncated if letter else False,
            "sha256": letter.sha256 if letter else None,
        }

    def detail(self) -> dict[str, Any]:
        out = self.summary()
        raw = self.letter.raw if self.letter else b""
        try:
            out["raw_text"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            out["raw_text"] = None
        out["raw_base64"] = base64.b64encode(raw).decode("ascii")
        out["raw_hex"] = raw.hex() if out["raw_text"] is None else None
        return out


def _text_or_none(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()


def _entry(message: TopicMessage) -> DeadLetterEntry:
    try:
        letter = DeadLetter.model_validate_json(message.value or b"")
        return DeadLetterEntry(message.partition, message.offset, message.key, letter)
    except (ValidationError, ValueError, binascii.Error) as exc:
        return DeadLetterEntry(message.partition, message.offset, message.key, None, str(exc).splitlines()[0])


def read_dead_letters(kafka: KafkaSettings, timeout: float = 30.0) -> list[DeadLetterEntry]:
    """Every dead letter on the topic (read to the high watermarks), oldest first per partition."""
    topic = Topics.from_settings(kafka).dead_letter.name
    read = read_topic(kafka, topic, timeout)
    entries = [_entry(m) for m in read.messages]
    entries.sort(key=lambda e: (e.letter.rejected_at.timestamp() if e.letter else 0.0, e.partition, e.offset))
    return entries


class DeadLetterError(ValueError):
    pass


def parse_ref(text: str, partition: int | None = None) -> tuple[int | None, int]:
    """``OFFSET`` or ``PARTITION:OFFSET``; ``partition`` (``--partition``) applies to a bare offset."""
    try:
        if ":" in text:
            p, o = text.split(":", 1)
            return int(p), int(o)
        return partition, int(text)
    except ValueError:
        raise DeadLetterError(f"expected OFFSET or PARTITION:OFFSET, got {text!r}") from None


def select(entries: list[DeadLetterEntry], partition: int | None, offset: int) -> DeadLetterEntry:
    """The entry at ``offset`` (in ``partition``, which is required when the offset exists in several)."""
    found = [e for e in entries if e.offset == offset and (partition is None or e.partition == partition)]
    if not found:
        where = f"partition {partition}, offset {offset}" if partition is not None else f"offset {offset}"
        raise DeadLetterError(f"no dead letter at {where}")
    if len(found) > 1:
        parts = ", ".join(str(e.partition) for e in found)
        raise DeadLetterError(f"offset {offset} exists in partitions {parts}: pass --partition or PARTITION:OFFSET")
    return found[0]


@dataclass
class ReplayResult:
    replayed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "replayed": self.replayed, "skipped": self.skipped}


def replay_key(entry: DeadLetterEntry) -> bytes | None:
    """The original key (the worker keys dead letters with it), else the event's customer_id, else none."""
    if entry.key is not None:
        return entry.key
    try:
        customer = json.loads(entry.letter.raw).get("customer_id") if entry.letter else None
    except (ValueError, AttributeError):
        customer = None
    return customer.encode() if isinstance(customer, str) and customer else None


def replay(
    kafka: KafkaSettings, entries: list[DeadLetterEntry], *, dry_run: bool = False, timeout: float = 30.0
) -> ReplayResult:
    """Re-produce each entry's raw bytes to its source topic (an event topic), keyed as before."""
    topics = Topics.from_settings(kafka)
    allowed = {topics.usage.name, topics.outcomes.name}
    result = ReplayResult(dry_run=dry_run)
    todo: list[tuple[DeadLetterEntry, bytes | None]] = []
    for entry in entries:
        base = {"partition": entry.partition, "offset": entry.offset}
        letter = entry.letter
        if letter is None:
            result.skipped.append({**base, "why": f"unreadable dead letter: {entry.error}"})
        elif letter.truncated:
            result.skipped.append({**base, "why": (
                f"the letter holds {len(letter.raw)} of the value's {letter.size} bytes; the whole value is at "
                f"{letter.source_topic}:{letter.source_partition}@{letter.source_offset} (sha256 {letter.sha256})"
            )})  # fmt: skip
        elif letter.source_topic not in allowed:
            result.skipped.append({**base, "why": f"source topic {letter.source_topic!r} is not an event topic"})
        else:
            todo.append((entry, replay_key(entry)))
    if dry_run:
        for entry, key in todo:
            result.replayed.append(_replayed(entry, key, None, None))
        return result
    if not todo:
        return result
    producer = Producer(kafka.producer_config())
    delivered: dict[int, tuple[Any, Any]] = {}

    def on_delivery(index: int) -> Any:
        return lambda err, msg: delivered.__setitem__(index, (err, msg))

    for index, (entry, key) in enumerate(todo):
        assert entry.letter is not None and entry.letter.source_topic is not None
        producer.produce(entry.letter.source_topic, key=key, value=entry.letter.raw, on_delivery=on_delivery(index))
        producer.poll(0)
    remaining = producer.flush(timeout)
    for index, (entry, key) in enumerate(todo):
        err, msg = delivered.get(index, ("not confirmed within the timeout", None))
        if err is not None or msg is None:
            result.skipped.append({"partition": entry.partition, "offset": entry.offset, "why": f"produce failed: {err}"})
        else:
            result.replayed.append(_replayed(entry, key, msg.partition(), msg.offset()))
    if remaining and not result.replayed:
        raise KafkaException(f"{remaining} replayed messages not confirmed within {timeout:.0f} s")
    return result


def _replayed(entry: DeadLetterEntry, key: bytes | None, partition: int | None, offset: int | None) -> dict[str, Any]:
    assert entry.letter is not None
    return {
        "partition": entry.partition,
        "offset": entry.offset,
        "to_topic": entry.letter.source_topic,
        "to_partition": partition,
        "to_offset": offset,
        "key": _text_or_none(key),
        "size": len(entry.letter.raw),
        "reason_was": entry.letter.reason,
    }


def skip(
    kafka: KafkaSettings,
    group_id: str,
    topic: str,
    partition: int,
    offset: int,
    reason: str,
    *,
    operator: str,
    now: datetime,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Move the message at ``topic:partition@offset`` to the dead-letter topic and commit past it.

    The escape hatch for a message the worker cannot get past. Only the message the group is
    stopped at can be skipped (its committed offset must be ``offset``: committing further
    would skip unread messages too), and only while the group has no active member (stop
    the worker first: Kafka refuses commits from outside a live group, and the worker would
    overwrite them). The dead letter records who skipped it, why, and when — the audit
    trail, on the topic the operator already reads with ``dlq list``.
    """
    from confluent_kafka import Consumer
    from confluent_kafka import TopicPartition as TP
    from confluent_kafka.admin import AdminClient

    topics = Topics.from_settings(kafka)
    if topic not in {topics.usage.name, topics.outcomes.name}:
        raise DeadLetterError(f"{topic!r} is not an event topic ({topics.usage.name}, {topics.outcomes.name})")
    if not reason.strip():
        raise DeadLetterError("a reason is required")
    admin = AdminClient(kafka.confluent_config())
    try:
        described = admin.describe_consumer_groups([group_id], request_timeout=timeout)[group_id].result(timeout=timeout)
    except KafkaException as exc:
        raise DeadLetterError(f"cannot describe consumer group {group_id!r}: {exc}") from exc
    if described.members:
        raise DeadLetterError(
            f"consumer group {group_id!r} has {len(described.members)} active member(s): stop the worker first"
        )
    config = {**kafka.confluent_config(), "group.id": group_id, "enable.auto.commit": False}
    consumer = Consumer(config)
    try:
        committed = consumer.committed([TP(topic, partition)], timeout=timeout)[0].offset
        low, high = consumer.get_watermark_offsets(TP(topic, partition), timeout=timeout)
        at = committed if committed >= 0 else low
        if offset != at:
            raise DeadLetterError(
                f"the group is at offset {at} of {topic}:{partition}, not {offset}: only the message the "
                "worker stopped at can be skipped (committing further would skip unread messages)"
            )
        if offset >= high:
            raise DeadLetterError(f"{topic}:{partition} has no message at offset {offset} (end is {high})")
        reader = Consumer({**kafka.confluent_config(), "group.id": f"meterstream-ops-{uuid.uuid4().hex[:12]}",
                           "enable.auto.commit": False})  # fmt: skip
        try:
            reader.assign([TP(topic, partition, offset)])
            deadline = time.monotonic() + timeout
            message = None
            while message is None and time.monotonic() < deadline:
                polled = reader.poll(0.5)
                if polled is not None and not polled.error() and polled.offset() == offset:
                    message = polled
        finally:
            reader.close()
        if message is None:
            raise DeadLetterError(f"could not read {topic}:{partition}@{offset} within {timeout:.0f} s")
        letter = DeadLetter.of(
            message.value(),
            f"skipped by operator {operator}: {reason}",
            rejected_at=now,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
        )
        key = message.key()
        producer = Producer(kafka.producer_config())
        delivered: list[Any] = []
        producer.produce(
            topics.dead_letter.name,
            key=key if key is None or len(key) <= 1024 else None,
            value=letter.model_dump_json().encode(),
            on_delivery=lambda err, msg: delivered.append((err, msg)),
        )
        producer.flush(timeout)
        if not delivered or delivered[0][0] is not None:
            raise DeadLetterError(f"the dead letter was not confirmed: {delivered[0][0] if delivered else 'timeout'}")
        dl = delivered[0][1]
        consumer.commit(offsets=[TP(topic, partition, offset + 1)], asynchronous=False)
    finally:
        consumer.close()
    log.warning(
        "operator %s skipped %s:%d@%d for group %s (%s); dead letter %d:%d",
        operator, topic, partition, offset, group_id, reason, dl.partition(), dl.offset(),
    )  # fmt: skip
    return {
        "skipped": f"{topic}:{partition}@{offset}",
        "group": group_id,
        "committed": offset + 1,
        "dead_letter": f"{dl.partition()}:{dl.offset()}",
        "operator": operator,
        "reason": reason,
        "size": letter.size,
        "sha256": letter.sha256,
    }


def parse_message_ref(text: str) -> tuple[str, int, int]:
    """``TOPIC:PARTITION:OFFSET`` (topic names hold no ':')."""
    parts = text.rsplit(":", 2)
    try:
        if len(parts) != 3 or not parts[0]:
            raise ValueError
        return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        raise DeadLetterError(f"expected TOPIC:PARTITION:OFFSET, got {text!r}") from None
