"""After a crash: write the recorded in-flight batch again, blindly, with its deduplication tokens.

See :mod:`meterstream.stream_processors.inflight` for the record. When a worker takes
partitions it reads the committed offsets and metadata of every partition of the event
topics; a partition whose metadata records a batch written from its committed offset names a
batch whose write may have been cut. Such a batch is replayed whole (every partition it
covered, whichever worker owns them now), once per assignment:

- its ranges are read again exactly (a group-less consumer, assign and seek);
- the messages are rated as they were rated then: the recorded clock reading (so a period
  closed meanwhile still bills as it did), duplicates within the batch dropped, and an event
  skipped if ``events_raw`` holds it at any *other* position (stored before the batch, as the
  worker's dedupe saw it then); a reversal counts as accepted if the reversal the store holds
  for its outcome is one of the batch's own events;
- the raw and rated rows are inserted with the batch's tokens, so each table and view that has
  the block skips it and each one that lacks it receives it. Alerts and dead letters are not
  replayed: the normal stream, which resumes at the committed offsets, derives them again.

Nothing here touches the worker's in-memory state: it is loaded from the store afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from aiokafka.errors import KafkaError

from meterstream.budgets import BudgetBook
from meterstream.clock import fixed_clock, utc_now
from meterstream.config import KafkaSettings
from meterstream.kafka_clients import aiokafka_client_args
from meterstream.pricing.plans import Catalog
from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.schemas.records import RatedUsage
from meterstream.storage.clickhouse import ClickHouseStore, StoreError
from meterstream.stream_processors.inflight import InFlight, committed_metadata, gather, recorded
from meterstream.stream_processors.processing import (
    BatchProcessor,
    BatchResult,
    InboundMessage,
    Kind,
    MonthToDate,
    dedupe_key,
)
from meterstream.stream_processors.state import _ACCEPTED_REVERSALS, _BILLED_OUTCOMES

log = logging.getLogger(__name__)


class _Replayed:
    """Dedupe and reversal lookups as the first run of the batch saw them (SeenEvents, BilledOutcomes)."""

    def __init__(self, store: ClickHouseStore, batch: InFlight) -> None:
        self.store = store
        self.batch = batch
        self.elsewhere: set[str] = set()
        self.own: set[str] = set()
        self.billed: dict[str, RatedUsage] = {}
        self.reversed: dict[str, str] = {}

    def load(self, events: Sequence[tuple[InboundMessage, UsageEvent | OutcomeEvent]]) -> None:
        decoded = [event for _, event in events]
        if not decoded:
            return
        self.own = {dedupe_key(e.customer_id, e.event_id) for e in decoded}
        params: dict[str, Any] = {
            "customers": sorted({e.customer_id for e in decoded}),
            "ids": sorted({e.event_id for e in decoded}),
        }
        inside = []
        for i, ((topic, partition), (first, last)) in enumerate(sorted(self.batch.ranges.items())):
            inside.append(
                f"(source_topic = {{t{i}:String}} AND source_partition = {{p{i}:UInt32}}"
                f" AND source_offset BETWEEN {{f{i}:UInt64}} AND {{l{i}:UInt64}})"
            )
            params.update({f"t{i}": topic, f"p{i}": partition, f"f{i}": first, f"l{i}": last})
        sql = (
            "SELECT DISTINCT customer_id, event_id FROM events_raw "
            "WHERE customer_id IN {customers:Array(String)} AND event_id IN {ids:Array(String)} "
            f"AND NOT ({' OR '.join(inside)})"
        )
        self.elsewhere = {dedupe_key(r["customer_id"], r["event_id"]) for r in self.store.query(sql, params).dicts()}
        targets = {e.reversal_of for e in decoded if isinstance(e, OutcomeEvent) and e.reversal_of}
        if targets:
            params = {"customers": sorted({e.customer_id for e in decoded}), "ids": sorted(targets)}
            fields = RatedUsage.model_fields
            for row in self.store.query(_BILLED_OUTCOMES, params).dicts():
                values = {name: value for name, value in row.items() if name in fields}
                self.billed[dedupe_key(row["customer_id"], row["event_id"])] = RatedUsage(**values)
            for row in self.store.query(_ACCEPTED_REVERSALS, params).dicts():
                if dedupe_key(row["customer_id"], row["event_id"]) not in self.own:
                    self.reversed.setdefault(dedupe_key(row["customer_id"], row["reversal_of"]), row["event_id"])

    # SeenEvents
    def __contains__(self, key: str) -> bool:
        return key in self.elsewhere

    def add(self, key: str) -> None:
        pass

    # BilledOutcomes
    def billed_outcome(self, customer_id: str, event_id: str) -> RatedUsage | None:
        return self.billed.get(dedupe_key(customer_id, event_id))

    def reversed_by(self, customer_id: str, event_id: str) -> str | None:
        return self.reversed.get(dedupe_key(customer_id, event_id))

    def remember(self, result: BatchResult) -> None:
        pass


class Replayer:
    """Finds the batches a crash may have cut and writes them again (see the module docstring)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        group_id: str,
        kinds: dict[str, Kind],
        catalog: Catalog,
        store: ClickHouseStore,
        late_grace: timedelta,
        timeout: float = 30.0,
    ) -> None:
        self.kafka = kafka
        self.group_id = group_id
        self.kinds = kinds
        self.catalog = catalog
        self.store = store
        self.late_grace = late_grace
        self.timeout = timeout
        #: Batches replayed by this process (for /stats/ and tests).
        self.replayed = 0

    def run(self, assigned: set[tuple[str, int]]) -> int:
        """Replay every recorded batch that covers an assigned partition; returns how many."""
        try:
            records = self._records()
        except (TimeoutError, KafkaError, OSError) as exc:
            log.error("could not read the recorded batches of group %s (%s); going on without a replay", self.group_id, exc)
            return 0
        batches = [b for b in gather(records) if any(tp in assigned for tp in b.ranges)]
        log.info("partitions taken: %d recorded batches in flight, %d to replay", len(gather(records)), len(batches))
        for batch in batches:
            try:
                self.replay(batch)
            except StoreError:
                raise  # the store is away: the caller retries (replaying again is harmless)
            except (KafkaError, TimeoutError, OSError) as exc:
                # Its messages are gone (retention) or the broker is away: going on beats a crash loop;
                # a table may then lack part of that batch, as before these records existed.
                log.error("could not replay batch %s (%s); going on without it", batch.batch_id, exc)
        return len(batches)

    def _records(self) -> dict[tuple[str, int], tuple[str, int | None, int, int]]:
        found: dict[tuple[str, int], tuple[str, int | None, int, int]] = {}
        for (topic, partition), (offset, value) in committed_metadata(
            self.kafka, self.group_id, list(self.kinds), self.timeout
        ).items():
            record = recorded(topic, partition, offset, value)
            if record is not None:
                found[(topic, partition)] = record
        return found

    def read(self, batch: InFlight) -> list[InboundMessage]:
        """The batch's messages, exactly its recorded ranges, in offset order per partition.

        Synchronous, like :func:`committed_metadata` (its own event loop: the worker runs the replay
        in a thread), and with the worker's own client family: an aiokafka consumer in no group,
        its records turned into messages as the batch consumer turns them (consumer.py).
        """
        return asyncio.run(self._read(batch))

    async def _read(self, batch: InFlight) -> list[InboundMessage]:
        from aiokafka import AIOKafkaConsumer
        from aiokafka import TopicPartition as AioTopicPartition

        consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **aiokafka_client_args(self.kafka)
        )
        got: dict[tuple[str, int], list[InboundMessage]] = {tp: [] for tp in batch.ranges}
        await consumer.start()
        try:
            partitions = {(t, p): AioTopicPartition(t, p) for t, p in batch.ranges}
            consumer.assign(list(partitions.values()))
            for key, (first, _) in batch.ranges.items():
                consumer.seek(partitions[key], first)
            open_ = set(batch.ranges)
            deadline = time.monotonic() + self.timeout
            while open_:
                if time.monotonic() > deadline:
                    missing = sorted(f"{t}:{p}" for t, p in open_)
                    raise KafkaError(f"replay of batch {batch.batch_id}: ranges not read within {self.timeout} s: {missing}")
                fetched = await consumer.getmany(timeout_ms=500)
                for tp, records in fetched.items():
                    key = (tp.topic, tp.partition)
                    if key not in open_:
                        continue
                    first, last = batch.ranges[key]
                    for record in records:
                        if first <= record.offset <= last:
                            got[key].append(
                                InboundMessage(self.kinds[tp.topic], record.value, tp.topic, tp.partition,
                                               record.offset, record.timestamp)
                            )  # fmt: skip
                        if record.offset >= last:
                            open_.discard(key)
                            break
        finally:
            await consumer.stop()
        return [m for tp in sorted(got) for m in got[tp]]

    def replay(self, batch: InFlight) -> tuple[int, int]:
        """Rate the batch as it was rated and insert it with its tokens; returns (raw rows, rated rows) sent."""
        messages = self.read(batch)
        now = datetime.fromtimestamp(batch.now_ms / 1000, tz=timezone.utc) if batch.now_ms else utc_now()
        lookups = _Replayed(self.store, batch)
        processor = BatchProcessor(
            self.catalog, BudgetBook(), seen=lookups, late_grace=self.late_grace, clock=fixed_clock(now), outcomes=lookups
        )
        result = processor.process(messages, lambda key: MonthToDate(), now=now, prepare=lookups.load)
        self.store.insert_batch(result.raw, result.rated, (), token=batch.batch_id)
        self.replayed += 1
        where = ", ".join(f"{t}:{p}@{first}-{last}" for (t, p), (first, last) in sorted(batch.ranges.items()))
        log.warning(
            "replayed the batch a crash may have cut (%s; %d messages, %d rows) with its deduplication tokens",
            where, len(messages), len(result.rated),
        )  # fmt: skip
        return len(result.raw), len(result.rated)
