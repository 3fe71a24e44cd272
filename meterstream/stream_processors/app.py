"""The Faust worker: usage and outcome topics in; rated rows, counters, alerts and dead letters out.

One agent consumes both event topics in batches (``take_events``). For each
batch, in this order, so that a message is acknowledged only after everything
it produced is durable:

1. :class:`~meterstream.stream_processors.state.StoreBackedState` loads from
   ClickHouse what the batch needs (month-to-date totals of new keys, which
   replayed events are already stored), then
   :class:`~meterstream.stream_processors.processing.BatchProcessor` decodes,
   dedupes, rates and aggregates (pure code);
2. the sink writes raw events, rated rows and alerts to ClickHouse, retrying
   with backoff while the store is unavailable (backpressure: the batch is not
   acknowledged, so offsets do not move past unwritten rows);
3. rejections go to the dead-letter topic and alerts to ``budget-alerts``;
   the worker waits for the broker to confirm both;
4. the in-memory state takes the batch's totals.

Faust acknowledges the batch's messages when the agent asks for the next batch
and commits acknowledged offsets (at least once). A replayed batch is
recognised through the store, so nothing is counted or alerted twice; see
:mod:`meterstream.stream_processors.state` for why the state is not in Faust tables.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import faust
import orjson

from meterstream.budgets import load_budgets
from meterstream.config import Settings
from meterstream.pricing.plans import load_catalog
from meterstream.storage.clickhouse import Storage, StoreError
from meterstream.storage.queries import UnknownQuery, query_parameters, saved_query
from meterstream.stream_processors.processing import BatchProcessor, BatchResult, InboundMessage
from meterstream.stream_processors.state import StoreBackedState
from meterstream.topics import Topics

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def create_app(settings: Settings, store: Storage, published_alerts: set[str] | None = None) -> faust.App:
    """Build the worker app from settings and an open store (nothing is read from module globals).

    ``published_alerts`` holds the alert ids already on the ``budget-alerts`` topic
    (read at start-up), so an alert is never published twice.
    """
    worker = settings.worker
    kafka = settings.kafka
    topics = Topics.from_settings(kafka)
    catalog = load_catalog(worker.plans_file)
    budgets = load_budgets(worker.budgets_file, catalog)
    stats = WorkerStats()
    published = published_alerts if published_alerts is not None else set()
    state = StoreBackedState(
        store,  # type: ignore[arg-type]
        topics=[topics.usage.name, topics.outcomes.name],
        window_seconds=worker.window_seconds,
        window_expires_seconds=worker.window_expires_seconds,
        recent_capacity=worker.recent_ids,
        dedupe_horizon_seconds=worker.dedupe_horizon_seconds,
    )
    processor = BatchProcessor(
        catalog,
        budgets,
        window_seconds=worker.window_seconds,
        seen=state,
        late_grace=timedelta(seconds=worker.late_grace_seconds),
    )

    credentials: Any = None
    if kafka.sasl_mechanism and kafka.sasl_username and kafka.sasl_password is not None:
        credentials = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=ssl.create_default_context(cafile=kafka.ssl_cafile) if kafka.security_protocol == "SASL_SSL" else None,
        )
    elif kafka.security_protocol == "SSL":
        credentials = faust.SSLCredentials(ssl.create_default_context(cafile=kafka.ssl_cafile))

    app = faust.App(
        worker.app_id,
        broker_credentials=credentials,
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
        store="memory://",
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        web_port=worker.web_port,
        web_bind=worker.web_bind,
        web_host=worker.web_bind,
        datadir=str(worker.data_dir),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        processing_guarantee="at_least_once",
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
    enforcement_topic = app.topic(topics.enforcement.name, key_serializer="raw", value_serializer="raw")

    # One store call at a time: chDB runs in this process and inserts and reads share it.
    store_lock = asyncio.Lock()
    log.info(
        "%d plans, %d customers assigned; %d customer budgets",
        len(catalog.plans), len(catalog.customers), len(budgets.customers),
    )  # fmt: skip

    @app.on_partitions_assigned.connect
    async def _reassigned(app: faust.App, assigned: Any, **_: Any) -> None:
        # Another worker may have written for these partitions meanwhile.
        state.reset()

    async def with_store(call: Callable[[], T], what: str) -> T:
        """Run a store call in a thread; while the store is unavailable, retry with backoff."""
        delay = settings.clickhouse.retry_backoff_initial
        while True:
            try:
                async with store_lock:
                    return await asyncio.to_thread(call)
            except StoreError as exc:
                stats.store_retries += 1
                log.warning("%s failed (%s); retrying in %.1f s, offsets held", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.clickhouse.retry_backoff_max)

    async def publish(result: BatchResult, keys: list[bytes | None]) -> None:
        futures = []
        for letter, key in zip(result.dead_letters, keys, strict=True):
            futures.append(await dead_letter_topic.send(key=key, value=letter.model_dump_json().encode()))
        fresh = [alert for alert in result.alerts if alert.alert_id not in published]
        for alert in fresh:
            futures.append(
                await alerts_topic.send(key=alert.customer_id.encode(), value=alert.model_dump_json().encode())
            )
        for key, decision in result.enforcement.items():
            futures.append(await enforcement_topic.send(key=key.encode(), value=decision.model_dump_json().encode()))
        # Wait for the broker to confirm before the batch is acknowledged.
        for fut in futures:
            await fut
        published.update(alert.alert_id for alert in fresh)

    @app.agent(events_topic)
    async def rate_events(stream: faust.Stream) -> None:
        async for events in stream.take_events(worker.batch_size, within=worker.batch_timeout):
            # Faust acks a batch's messages when the loop moves on, and also when it is torn down
            # by a shutdown: a batch cut short by SIGTERM would be committed without being stored.
            # So a shutdown waits for the batch in hand; if it cannot finish in time, the process
            # exits without committing (the batch is replayed, and recognised, on restart).
            batch = asyncio.ensure_future(handle_batch(events))
            try:
                await asyncio.shield(batch)
            except asyncio.CancelledError:
                done, _ = await asyncio.wait([batch], timeout=worker.shutdown_drain_seconds)
                if not done or batch.exception() is not None:
                    log.error("in-flight batch not finished at shutdown; exiting without committing it")
                    os._exit(1)
                raise

    async def handle_batch(events: list[Any]) -> None:
        messages = [
            InboundMessage(
                kind="outcome" if event.message.topic == topics.outcomes.name else "usage",
                value=event.message.value,
                topic=event.message.topic,
                partition=event.message.partition,
                offset=event.message.offset,
            )
            for event in events
        ]
        keys_by_offset = {(e.message.topic, e.message.partition, e.message.offset): e.message.key for e in events}
        result = await with_store(
            lambda: processor.process(messages, state.month_to_date, prepare=state.prepare, history=state),
            "loading state",
        )
        await with_store(lambda: store.insert_batch(result.raw, result.rated, result.alerts), "store write")
        dead_letter_keys = [
            keys_by_offset.get((d.source_topic, d.source_partition, d.source_offset)) for d in result.dead_letters
        ]
        await publish(result, dead_letter_keys)
        state.commit(result)
        stats.messages += len(messages)
        stats.rated += len(result.rated)
        stats.duplicates += result.duplicates
        stats.dead_letters += len(result.dead_letters)
        stats.alerts += len(result.alerts)
        stats.batches += 1

    @app.timer(interval=60.0)
    async def expire_windows() -> None:
        """Drop tumbling-window counters older than the configured horizon."""
        state.expire_windows()

    @app.page("/stats/")
    async def stats_view(web: Any, request: Any) -> Any:
        assigned = sorted(f"{tp.topic}:{tp.partition}" for tp in app.assignor.assigned_actives())
        ready = bool(assigned) and not app.rebalancing
        body = {**stats.as_dict(), "assigned": assigned, "ready": ready, "store_lookups": state.lookups}
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
    app.meterstream_state = state  # type: ignore[attr-defined]
    app.meterstream_agent = rate_events  # type: ignore[attr-defined]
    app.meterstream_topics = {  # type: ignore[attr-defined]
        "alerts": alerts_topic,
        "dead_letter": dead_letter_topic,
        "enforcement": enforcement_topic,
    }
    return app
