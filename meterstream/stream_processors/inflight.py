"""The batch being written, recorded in the consumer group's commit metadata before its write.

A SIGKILL can cut a batch's write anywhere: between the inserts into ``events_raw``,
``usage_rated`` and ``budget_alerts``, or (if the ClickHouse server dies too) between
``usage_rated``'s part and the parts of its views (the rollups, ``usage_recent``,
``usage_day_counts``). Every insert of a batch therefore carries a deduplication token
derived from the batch (``<batch id>:<table>``), and every table ingest writes keeps a
deduplication window (sql/010): an insert repeated with the same token is skipped by each
table and view that already has the block and written to each one that lacks it.

A replay after a crash is not the same batch (other ``getmany`` boundaries; events already
stored are skipped), so before the write the worker commits, for each partition of the batch,
the offset where the batch starts (everything before it is durable) with this record in the
commit's metadata: the batch id, the batch's clock reading and that partition's offset range.
At the next assignment a worker reads the committed metadata of every partition, reads the
recorded ranges again exactly, rates them as they were rated then, and inserts them blindly
with the same tokens (:mod:`meterstream.stream_processors.replay`). Then the normal stream
resumes at the committed offsets and skips, as stored, what the replay wrote.

The metadata also carries the commit time (``t``, ms), which ``meterstream reconcile`` reads to
tell a stuck group from a slow one. Read the metadata with :func:`committed_metadata` (aiokafka):
confluent-kafka's ``committed()`` returns it with stray bytes after its end (confluent-kafka 2.x
reads past the value: ``'...}q'``, or a ``UnicodeDecodeError``). Kafka keeps up to ``offset.metadata.max.bytes`` (4,096 by
default) per partition; a record is ~100 bytes.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meterstream.config import KafkaSettings


@dataclass
class InFlight:
    """One batch's identity: ``ranges`` ``(topic, partition) -> (first, last)``; ``now_ms`` its clock reading."""

    batch_id: str
    ranges: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    now_ms: int | None = None

    def token(self, table: str) -> str:
        return f"{self.batch_id}:{table}"


def metadata(commit_ms: int, batch: InFlight | None = None, tp: tuple[str, int] | None = None) -> str:
    """What a commit stores per partition: the commit time, and the batch written from that offset."""
    if batch is None or tp is None or tp not in batch.ranges:
        return str(commit_ms)
    first, last = batch.ranges[tp]
    return json.dumps({"t": commit_ms, "b": batch.batch_id, "n": batch.now_ms, "r": [first, last]}, separators=(",", ":"))


def commit_time(value: str | None) -> int | None:
    """The commit time (ms) in a commit's metadata, either form; None if there is none."""
    if not value:
        return None
    if value.isdigit():
        return int(value)
    try:
        data = json.loads(value)
        return int(data["t"])
    except (ValueError, KeyError, TypeError):
        return None


def recorded(topic: str, partition: int, offset: int, value: str | None) -> tuple[str, int | None, int, int] | None:
    """``(batch id, now_ms, first, last)`` if the metadata records a batch written from ``offset``."""
    if not value or value.isdigit():
        return None
    try:
        data = json.loads(value)
        first, last = int(data["r"][0]), int(data["r"][1])
        batch_id = str(data["b"])
        now_ms = int(data["n"]) if data.get("n") is not None else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if first != offset:  # committed again since, at another offset: that batch was finished
        return None
    return batch_id, now_ms, first, last


def gather(records: dict[tuple[str, int], tuple[str, int | None, int, int]]) -> list[InFlight]:
    """The batches named by several partitions' records, one :class:`InFlight` each."""
    batches: dict[str, InFlight] = {}
    for tp, (batch_id, now_ms, first, last) in sorted(records.items()):
        batch = batches.setdefault(batch_id, InFlight(batch_id, now_ms=now_ms))
        batch.ranges[tp] = (first, last)
    return list(batches.values())


def committed_metadata(
    kafka: KafkaSettings, group_id: str, topics: list[str], timeout: float = 30.0
) -> dict[tuple[str, int], tuple[int, str]]:
    """``(topic, partition) -> (committed offset, metadata)`` of ``group_id`` on ``topics``, exactly.

    Synchronous (runs its own event loop: call it from a thread, not from a running loop).
    """
    from aiokafka.admin import AIOKafkaAdminClient

    from meterstream.kafka_clients import aiokafka_client_args

    async def read() -> dict[tuple[str, int], tuple[int, str]]:
        admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout * 1000), **aiokafka_client_args(kafka))
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group_id)
        finally:
            await admin.close()
        return {
            (tp.topic, tp.partition): (meta.offset, meta.metadata or "")
            for tp, meta in offsets.items()
            if tp.topic in topics and meta.offset >= 0
        }

    return asyncio.run(asyncio.wait_for(read(), timeout))
