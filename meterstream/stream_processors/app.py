"""The Faust worker: usage and outcome topics in; rated rows, counters, alerts and dead letters out.

One agent consumes both event topics in batches (``take_events``). For each
batch, in this order, so that an offset is committed only after everything the
batch produced is durable:

1. :class:`~meterstream.stream_processors.processing.BatchProcessor` decodes,
   dedupes, rates and aggregates (pure code);
2. the sink writes raw events, rated rows and alerts to ClickHouse, retrying
   with backoff while the store is unavailable (backpressure: the batch is not
   acked, so offsets do not move past unwritten rows);
3. rejections go to the dead-letter topic and alerts to ``budget-alerts``,
   and the worker waits for the broker to confirm both;
4. the month-to-date and tumbling-window tables are updated, one write per key.

Faust acks the batch's messages when the agent asks for the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import faust
import orjson
from aiokafka.partitioner import murmur2

from meterstream.budgets import load_budgets
from meterstream.config import Settings
from meterstream.pricing.plans import load_catalog
from meterstream.storage.clickhouse import Storage, StoreError
from meterstream.storage.queries import UnknownQuery, query_parameters, saved_query
from meterstream.stream_processors.processing import (
    BatchProcessor,
    BatchResult,
    InboundMessage,
    MonthToDate,
)
from meterstream.topics import Topics

log = logging.getLogger(__name__)


class CustomerPartitionedTable(faust.Table):
    """A table whose changelog partition follows the customer, not the current event.

    Keys look like ``customer|...``. Faust's default takes the partition from the
    event being processed, which does not exist in a batch (``take_events``).
    Hashing the customer part with Kafka's default partitioner (murmur2, which
    the SDK also uses) puts each key on the partition its customer's events
    arrive on, so a worker that owns that partition recovers that key.
    """

    def partition_for_key(self, key: Any) -> int | None:
        customer = str(key[0] if isinstance(key, tuple) else key).split("|", 1)[0]
        partitions = self.partitions or self.app.conf.topic_partitions
        return (murmur2(customer.encode()) & 0x7FFFFFFF) % partitions


@dataclass
class WorkerStats:
    """Counters served at ``/stats/`` and logged: how far the worker has got."""

    messages: int = 0
    rated: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    alerts: int = 0
    batches: int = 0
    store_retries: int = 0
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "rated": self.rated,
            "duplicates": self.duplicates,
            "dead_letters": self.dead_letters,
            "alerts": self.alerts,
            "batches": self.batches,
            "store_retries": self.store_retries,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "pid": os.getpid(),
        }


def create_app(settings: Settings, store: Storage) -> faust.App:
    """Build the worker app from settings and an open store (nothing is read from module globals)."""
    worker = settings.worker
    kafka = settings.kafka
    topics = Topics.from_settings(kafka)
    catalog = load_catalog(worker.plans_file)
    budgets = load_budgets(worker.budgets_file)
    stats = WorkerStats()

    app = faust.App(
        worker.app_id,
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
        store="memory://",
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        Table=CustomerPartitionedTable,
        web_port=worker.web_port,
        web_bind=worker.web_bind,
        web_host=worker.web_bind,
        datadir=str(worker.data_dir),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Offsets, table changelogs, alerts and dead letters commit in one Kafka
        # transaction: after a crash the tables, the side topics and the consumer
        # position agree, so nothing is counted twice or alerted twice.
        processing_guarantee="exactly_once",
        broker_commit_every=worker.batch_size,
        broker_commit_interval=worker.commit_interval,
        broker_session_timeout=worker.session_timeout,
        broker_heartbeat_interval=worker.session_timeout / 4,
        stream_wait_empty=False,
    )

    events_topic = app.topic(
        topics.usage.name,
        topics.outcomes.name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    alerts_topic = app.topic(topics.budget_alerts.name, key_serializer="raw", value_serializer="raw")
    dead_letter_topic = app.topic(topics.dead_letter.name, key_serializer="raw", value_serializer="raw")

    table_schema = faust.Schema(key_type=bytes, value_type=dict, key_serializer="raw", value_serializer="json")
    month_to_date = app.Table("month-to-date", default=None, schema=table_schema)
    usage_windows = app.Table("usage-windows", default=None, schema=table_schema)
    seen_events = app.Table(
        "seen-events",
        default=None,
        schema=faust.Schema(key_type=bytes, value_type=int, key_serializer="raw", value_serializer="json"),
    )

    class TableSeenEvents:
        """Counted events (``customer|event_id`` -> unix time), kept for the dedupe horizon."""

        def __contains__(self, key: str) -> bool:
            return key.encode() in seen_events

        def add(self, key: str) -> None:
            seen_events[key.encode()] = int(time.time())

    processor = BatchProcessor(catalog, budgets, window_seconds=worker.window_seconds, seen=TableSeenEvents())

    # One store call at a time: chDB runs in this process and inserts and reads share it.
    store_lock = asyncio.Lock()
    log.info("%d plans, %d customers assigned; %d customer budgets", len(catalog.plans), len(catalog.customers),
             len(budgets.customers))

    def kind_of(topic_name: str) -> str:
        return "outcome" if topic_name == topics.outcomes.name else "usage"

    def current_month_to_date(key: str) -> MonthToDate:
        return MonthToDate.from_json(month_to_date.get(key.encode()))

    async def write_rows(result: BatchResult) -> None:
        delay = settings.clickhouse.retry_backoff_initial
        while True:
            try:
                async with store_lock:
                    await asyncio.to_thread(store.insert_batch, result.raw, result.rated, result.alerts)
                return
            except StoreError as exc:
                stats.store_retries += 1
                log.warning("store write failed (%s); retrying in %.1f s without committing offsets", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.clickhouse.retry_backoff_max)

    async def publish(result: BatchResult, keys: list[bytes | None]) -> None:
        futures = []
        for letter, key in zip(result.dead_letters, keys, strict=True):
            futures.append(await dead_letter_topic.send(key=key, value=letter.model_dump_json().encode()))
        for alert in result.alerts:
            futures.append(
                await alerts_topic.send(key=alert.customer_id.encode(), value=alert.model_dump_json().encode())
            )
        # Wait for the broker to confirm before the batch's offsets are committed.
        for fut in futures:
            await fut

    @app.agent(events_topic)
    async def rate_events(stream: faust.Stream) -> None:
        async for events in stream.take_events(worker.batch_size, within=worker.batch_timeout):
            messages = [
                InboundMessage(
                    kind=kind_of(event.message.topic),  # type: ignore[arg-type]
                    value=event.message.value,
                    topic=event.message.topic,
                    partition=event.message.partition,
                    offset=event.message.offset,
                )
                for event in events
            ]
            keys_by_offset = {(e.message.topic, e.message.partition, e.message.offset): e.message.key for e in events}
            result = processor.process(messages, current_month_to_date)
            await write_rows(result)
            dead_letter_keys = [
                keys_by_offset.get((d.source_topic, d.source_partition, d.source_offset)) for d in result.dead_letters
            ]
            await publish(result, dead_letter_keys)
            for key, value in result.month_to_date.items():
                month_to_date[key.encode()] = value.to_json()
            for key, counts in result.windows.items():
                usage_windows[key.encode()] = counts.merged_json(usage_windows.get(key.encode()))
            processor.commit(result)
            stats.messages += len(messages)
            stats.rated += len(result.rated)
            stats.duplicates += result.duplicates
            stats.dead_letters += len(result.dead_letters)
            stats.alerts += len(result.alerts)
            stats.batches += 1

    @app.timer(interval=60.0)
    async def expire_windows() -> None:
        """Drop tumbling-window counters older than the configured horizon."""
        horizon = datetime.now(timezone.utc) - timedelta(seconds=worker.window_expires_seconds)
        cutoff = horizon.strftime("%Y-%m-%dT%H:%M:%SZ")
        stale = [key for key in list(usage_windows.keys()) if key.decode().split("|", 1)[1] < cutoff]
        for key in stale:
            del usage_windows[key]

    @app.timer(interval=60.0)
    async def expire_seen_events() -> None:
        """Forget counted event ids older than the dedupe horizon."""
        cutoff = int(time.time()) - worker.dedupe_horizon_seconds
        stale = [key for key, seen_at in list(seen_events.items()) if seen_at < cutoff]
        for key in stale:
            del seen_events[key]

    @app.page("/stats/")
    async def stats_view(web: Any, request: Any) -> Any:
        assigned = sorted(f"{tp.topic}:{tp.partition}" for tp in app.assignor.assigned_actives())
        ready = bool(assigned) and not app.rebalancing and app.tables.recovery.completed.is_set()
        body = {**stats.as_dict(), "assigned": assigned, "ready": ready}
        return web.bytes(orjson.dumps(body), content_type="application/json")

    @app.page("/store/query/{name}/")
    async def query_view(web: Any, request: Any, name: str) -> Any:
        """Run a saved query for the CLI while this worker owns the embedded store."""
        try:
            sql = saved_query(name)
        except UnknownQuery:
            return web.bytes(orjson.dumps({"error": f"unknown query {name!r}"}), status=404)
        params = {p: request.query.get(p, "") for p in query_parameters(name)}
        try:
            async with store_lock:
                rows = await asyncio.to_thread(store.query, sql, params)
        except StoreError as exc:
            return web.bytes(orjson.dumps({"error": str(exc)}), status=503)
        return web.bytes(orjson.dumps(rows.to_json_dict()), content_type="application/json")

    # Handles for tests and the CLI (agents are unit-tested through ``rate_events.test_context()``).
    app.meterstream_stats = stats  # type: ignore[attr-defined]
    app.meterstream_agent = rate_events  # type: ignore[attr-defined]
    app.meterstream_topics = {"alerts": alerts_topic, "dead_letter": dead_letter_topic}  # type: ignore[attr-defined]
    return app

