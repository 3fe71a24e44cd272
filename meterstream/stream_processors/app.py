"""The worker: usage and outcome topics in; rated rows, counters, alerts and dead letters out.

A Faust app whose consumer reads both event topics in batches
(:class:`~meterstream.stream_processors.consumer.BatchConsumer`: aiokafka
``getmany``; see there for why not a Faust agent). For each batch, in this
order, so that an offset is committed only after everything its message
produced is durable:

1. :class:`~meterstream.stream_processors.state.StoreBackedState` loads from
   ClickHouse what the batch needs (month-to-date totals of new keys, which
   replayed events are already stored), then
   :class:`~meterstream.stream_processors.processing.BatchProcessor` decodes,
   dedupes, rates and aggregates (pure code);
2. the store (:class:`~meterstream.storage.clickhouse.ClickHouseStore`) gets raw
   events, rated rows and alerts, retrying
   with backoff while the store is unavailable (backpressure: the batch is not
   committed, so offsets do not move past unwritten rows);
3. rejections go to the dead-letter topic and alerts to ``budget-alerts``
   (side topics declared with ``app.topic``, sent through Faust's producer);
   the worker waits for the broker to confirm both;
4. the offsets are committed (at least once, every ``commit_interval``).

The enforcement state (a view, not money) does not wait for the store: each
customer's new state is sent to ``enforcement-state`` as soon as the batch is
rated, with a heartbeat that tells guards how current the view is (the produce
time the batch reached on its slowest partition, or now while idle). Alerts keep
their store-first outbox (step 2, then 3). After the write, the shared
reservation ledger (if configured) is set to the stored totals and the batch's
settled calls are removed from it, in one atomic step per customer.

The in-memory state takes a batch's totals as soon as it is rated, and the next
batch is rated while this one is written (two stages, see consumer.py). A
replayed batch is recognised through the store, so nothing is counted or
alerted twice; see :mod:`meterstream.stream_processors.state` for why the
state is not in Faust tables.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from operator import attrgetter
from typing import Any, TypeVar

import faust
import orjson
from faust.app.base import BootStrategy

from meterstream.budgets import load_budgets
from meterstream.clock import Clock, utc_now
from meterstream.config import Settings
from meterstream.kafka_clients import faust_broker, faust_credentials
from meterstream.periods import period_of
from meterstream.pricing.engine import RatedBatch
from meterstream.pricing.plans import load_catalog
from meterstream.producers.ledger import LedgerUnavailable, RedisLedger
from meterstream.schemas.records import HEARTBEAT_KEY, Decision, EnforcementState, RawBatch, ThresholdAction
from meterstream.storage.clickhouse import Storage, StoreError
from meterstream.storage.settle import settle_store
from meterstream.stream_processors import quiet_logs
from meterstream.stream_processors.alerts import OutboxKafka
from meterstream.stream_processors.consumer import BatchConsumer
from meterstream.stream_processors.processing import BatchProcessor, BatchResult, InboundMessage
from meterstream.stream_processors.state import StoreBackedState, state_capacities
from meterstream.topics import Topics

log = logging.getLogger(__name__)
_place, _timestamp_ms = attrgetter("topic", "partition"), attrgetter("timestamp_ms")
T = TypeVar("T")

#: Longer message keys are not copied onto a dead letter (it records where the message is).
MAX_DEAD_LETTER_KEY = 1024


@dataclass
class WorkerStats:
    """Counters served at ``/stats/`` and logged: how far the worker has got."""

    #: Messages stored and committable (``staged``: rated, decisions and alerts published, the
    #: write maybe still in hand).
    messages: int = 0
    staged: int = 0
    rated: int = 0
    #: Store writes made: fewer than ``batches`` when batches waiting for a slow store went as one.
    inserts: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    alerts: int = 0
    batches: int = 0
    store_retries: int = 0
    #: Dead letters the broker refused even without their raw bytes (their partitions are held).
    unpublishable_dead_letters: int = 0
    #: Since when (epoch seconds) the store has been unavailable, and why; None while it answers.
    store_unavailable_since: float | None = None
    store_last_error: str | None = None
    #: The last batch: its messages, seconds to rate it (decode to decisions published) and to
    #: write it (store write to broker confirmations; not the wait for the writes before it), and
    #: the store's part of that (its linger included).
    last_batch_messages: int = 0
    last_rate_seconds: float = 0.0
    last_write_seconds: float = 0.0
    last_store_seconds: float = 0.0
    #: Seconds spent since start rating batches (decode to decisions published) and in store writes:
    #: beside the uptime, which of the two stages bounds the worker's rate.
    rate_seconds: float = 0.0
    store_seconds: float = 0.0
    #: Full garbage collections the worker ran (WORKER__GC_COLLECT_SECONDS) and the last one's seconds.
    gc_collections: int = 0
    gc_last_seconds: float = 0.0
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "staged": self.staged,
            "rated": self.rated,
            "inserts": self.inserts,
            "duplicates": self.duplicates,
            "dead_letters": self.dead_letters,
            "alerts": self.alerts,
            "batches": self.batches,
            "store_retries": self.store_retries,
            "unpublishable_dead_letters": self.unpublishable_dead_letters,
            "store": "ok" if self.store_unavailable_since is None else "unavailable",
            "store_unavailable_seconds": None if self.store_unavailable_since is None
            else round(time.time() - self.store_unavailable_since, 1),
            "store_last_error": self.store_last_error,
            "last_batch": {"messages": self.last_batch_messages, "rate_seconds": round(self.last_rate_seconds, 4),
                           "write_seconds": round(self.last_write_seconds, 4),
                           "store_seconds": round(self.last_store_seconds, 4)},
            "busy_seconds": {"rate": round(self.rate_seconds, 3), "store": round(self.store_seconds, 3)},
            "gc": {"automatic": gc.isenabled(), "collections": self.gc_collections,
                   "last_seconds": round(self.gc_last_seconds, 4)},
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "pid": os.getpid(),
        }


def take_over_garbage_collection() -> None:
    """Freeze what start-up built and turn Python's automatic collector off (the worker process only).

    The worker's timer then runs a full collection every ``WORKER__GC_COLLECT_SECONDS``
    (:func:`collect_garbage`): a batch holds ~20 objects per event until it is stored, and the
    automatic collector, a pass every 700 new objects, scanned each of them several times.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


def collect_garbage(stats: WorkerStats) -> None:
    """The full collection the automatic collector no longer makes; nothing while that one is on
    (the app runs inside another process, e.g. a test's)."""
    if gc.isenabled():
        return
    started = time.perf_counter()
    found = gc.collect()
    stats.gc_collections += 1
    stats.gc_last_seconds = seconds = time.perf_counter() - started
    log.debug("garbage collection: %d objects unreachable, %.3f s", found, seconds)


@dataclass(eq=False)
class _Staged:
    """A rated batch whose rows are not stored yet (the write that stores them may be another batch's)."""

    result: BatchResult
    raw_stored: frozenset[tuple[str, int, int]]
    rated_at: float  # time.monotonic()
    stored: bool = False


@dataclass
class _Activity:
    """When the worker last rated a batch, and whether a write is in progress (for the heartbeat)."""

    last_batch: float = 0.0
    writing: int = 0


def create_app(
    settings: Settings,
    store: Storage,
    published_alerts: set[str] | None = None,
    reconcile_alerts_for: Callable[[set[int], OutboxKafka], set[str]] | None = None,
    clock: Clock = utc_now,
) -> faust.App:
    """Build the worker app from settings and an open store (nothing is read from module globals).

    ``published_alerts`` holds the alert ids already on the ``budget-alerts`` topic
    (read at start-up), so an alert is never published twice. ``reconcile_alerts_for``
    runs the alert outbox for the assigned partitions of the event topics (its Kafka side on
    this app's loop and producer) and returns the ids on the topic
    (meterstream/stream_processors/alerts.py); None in unit tests.
    ``clock`` is the time every decision of the worker reads (periods closed, windows expired,
    days settled).
    """
    worker = settings.worker
    kafka = settings.kafka
    topics = Topics.from_settings(kafka)
    catalog = load_catalog(worker.plans_file)
    budgets = load_budgets(worker.budgets_file, catalog)
    stats = WorkerStats()
    published = published_alerts if published_alerts is not None else set()
    ledger = RedisLedger.from_settings(settings.ledger)
    fingerprint = catalog.fingerprint()

    def reconcile_assigned() -> None:
        if reconcile_alerts_for is None:
            return
        partitions = {tp.partition for tp in consumer.assigned if tp.topic == topics.usage.name}
        try:
            published.update(reconcile_alerts_for(partitions, OutboxKafka(kafka, app.loop, send)))
        except StoreError:
            raise  # the batch is retried, and with it this pass
        except Exception:  # the broker: unsent alerts stay recorded for the next assignment's pass
            log.error("the alert outbox pass for partitions %s failed", sorted(partitions), exc_info=True)

    state = StoreBackedState(
        store,  # type: ignore[arg-type]
        topics=[topics.usage.name, topics.outcomes.name],
        window_seconds=worker.window_seconds,
        window_expires_seconds=worker.window_expires_seconds,
        **state_capacities(recent_ids=worker.recent_ids, batch_size=worker.batch_size,
                           writes_in_hand=worker.writes_in_hand),  # fmt: skip
        dedupe_horizon_seconds=worker.dedupe_horizon_seconds,
        run_capped=lambda customer_id: getattr(budgets.for_customer(customer_id), "run_cap", None) is not None,
        clock=clock,
        on_assigned=reconcile_assigned,
        # Totals are kept per billing period (anniversary customers' are not calendar months).
        period_of=catalog.billing_period,
        preload_periods=catalog.open_billing_periods,
        committed=lambda: consumer.committed_at_assignment,
    )
    processor = BatchProcessor(
        catalog,
        budgets,
        window_seconds=worker.window_seconds,
        seen=state,
        late_grace=timedelta(seconds=worker.late_grace_seconds),
        clock=clock,
        outcomes=state,
    )

    # Only what the worker uses: no tables (the state is derived from the store, state.py), so no
    # store, changelog partitions or replication; Faust's consumer off (the BatchConsumer below
    # reads the event topics in batches). ``datadir``: Faust creates it at every start
    # (App.on_first_start), so it goes to the git-ignored state directory, not the cwd.
    app = faust.App(
        worker.app_id,
        broker=faust_broker(kafka),
        broker_credentials=faust_credentials(kafka),
        producer_acks=-1,
        # A batch's states and alerts are sent in a burst: a few ms of linger makes that burst a few
        # produce requests instead of many (no measurable change of the broker's CPU here, BENCHMARKS.md).
        producer_linger=0.005,
        web_port=worker.web_port,
        web_bind=worker.web_bind,
        datadir=str(worker.data_dir),
    )
    app.boot_strategy = BootStrategy(app, enable_kafka_consumer=False)
    # The side topics, declared once; the worker only sends to them (created by topics.ensure_topics).
    side_topics = {
        spec.name: app.topic(spec.name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        for spec in (topics.dead_letter, topics.budget_alerts, topics.enforcement)
    }

    async def send(topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        """One record to a side topic; returns the broker's delivery future (awaited by the caller)."""
        return await side_topics[topic].send(key=key, value=value)

    activity = _Activity()
    # One store call at a time: chDB runs in this process and inserts and reads share it.
    store_lock = asyncio.Lock()
    log.info(
        "%d plans, %d customers assigned; %d customer budgets",
        len(catalog.plans), len(catalog.customers), len(budgets.customers),
    )  # fmt: skip

    async def with_store(call: Callable[[], T], what: str, *, exclusive: bool = True) -> T:
        """Run a store call in a thread; while the store is unavailable, retry with backoff.

        ``exclusive`` calls (writes, the web view's reads) run one at a time; the batch
        processing (which reads the store only now and then) runs beside a write, which is
        what lets one batch be rated while the previous one is inserted (chDB releases the
        GIL, and the client serialises the engine calls themselves).
        """
        delay = settings.clickhouse.retry_backoff_initial
        while True:
            try:
                if not exclusive:
                    result = await asyncio.to_thread(call)
                else:
                    async with store_lock:
                        result = await asyncio.to_thread(call)
            except StoreError as exc:
                if not exc.retryable:
                    # A wrong password, a missing table, a SQL error: no retry fixes it. The batch
                    # is not committed; the consumer stops the worker (consumer.py) naming this.
                    log.critical("%s failed and will not be retried: %s", what, exc)
                    stats.store_last_error = str(exc)[:300]
                    raise
                stats.store_retries += 1
                stats.store_last_error = str(exc)[:300]
                if stats.store_unavailable_since is None:
                    stats.store_unavailable_since = time.time()
                log.warning("%s failed (%s); retrying in %.1f s, offsets held", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.clickhouse.retry_backoff_max)
                continue
            if stats.store_unavailable_since is not None:
                log.warning("the store is available again after %.1f s (%d retries so far); catching up",
                            time.time() - stats.store_unavailable_since, stats.store_retries)
                stats.store_unavailable_since = None
            return result

    async def send_dead_letters(result: BatchResult, keys: list[bytes | None]) -> dict[tuple[str, int], int]:
        """Publish the batch's dead letters; returns the messages whose letter the broker refuses for good.

        A letter the broker will not take whole (too large for it, whatever its settings) goes
        again without its raw bytes (size and digest kept: the value stays on the source topic).
        If even that is refused with an error that retrying cannot fix, the message's partition
        is held (``{(topic, partition): offset}``; see BatchConsumer.hold) and the other
        partitions go on. Errors worth retrying (the broker unreachable) fail the batch as before.
        """
        held: dict[tuple[str, int], int] = {}
        sent = []
        for letter, key in zip(result.dead_letters, keys, strict=True):
            if key is not None and len(key) > MAX_DEAD_LETTER_KEY:
                key = None  # a hostile key: the letter carries the value's place, the key is not needed
            sent.append((letter, key, await _send(topics.dead_letter.name, key, letter.model_dump_json().encode())))
        for letter, key, pending in sent:
            error = await _delivered(pending)
            if error is None:
                continue
            where = f"{letter.source_topic}:{letter.source_partition}@{letter.source_offset}"
            compact = letter.compact(f"letter not publishable whole: {type(error).__name__}")
            error2 = await _delivered(await _send(topics.dead_letter.name, key, compact.model_dump_json().encode()))
            if error2 is None:
                log.warning("dead letter for %s refused whole (%s); sent without its raw bytes", where, error)
                continue
            if getattr(error2, "retriable", False) or letter.source_topic is None or letter.source_partition is None:
                raise error2
            tp = (letter.source_topic, letter.source_partition)
            held[tp] = min(held.get(tp, letter.source_offset or 0), letter.source_offset or 0)
            stats.unpublishable_dead_letters += 1
            log.critical("dead letter for %s cannot be published (%s); holding that partition", where, error2)
        return held

    async def _send(topic: str, key: bytes | None, value: bytes) -> Any:
        """The producer's delivery future, or the exception ``send`` raised at once (e.g. too large)."""
        try:
            return await send(topic, key, value)
        except Exception as exc:
            return exc

    async def _delivered(pending: Any) -> BaseException | None:
        if isinstance(pending, BaseException):
            return pending
        try:
            await pending
        except Exception as exc:
            return exc
        return None

    async def publish_alerts(result: BatchResult) -> list[Awaitable[Any]]:
        """Send the batch's new alerts now, before its store write; the write waits for the broker.

        A crash before the write replays the batch: the same alerts (deterministic ids) are
        found on the topic by the outbox pass at assignment and not sent again; the write
        records them (alerts.py).
        """
        futures = []
        fresh = [alert for alert in result.alerts if alert.alert_id not in published]
        for alert in fresh:
            value = alert.model_dump_json().encode()
            futures.append(await send(topics.budget_alerts.name, alert.customer_id.encode(), value))
        published.update(alert.alert_id for alert in fresh)
        return futures

    def heartbeat(as_of: datetime | None = None) -> EnforcementState:
        """``updated_at``: how current the published view is (now, or the produce time it has reached)."""
        now = clock()
        as_of = min(as_of, now) if as_of is not None else now
        return EnforcementState(
            key=HEARTBEAT_KEY, customer_id="", period=period_of(now), decision=Decision.OK,
            reason="worker heartbeat", spent_credits=Decimal(0), watermark=as_of, updated_at=as_of,
            catalog_fingerprint=fingerprint,
        )  # fmt: skip

    def reached(messages: Sequence[InboundMessage]) -> datetime | None:
        """The produce time the batch has reached on every partition it read (the slowest one's newest).

        A worker working through a backlog thus publishes an old ``as_of``: guards see their
        view's real age, not the time of the last batch.
        """
        newest: dict[tuple[str, int], int] = {}
        for place, group in itertools.groupby(messages, key=_place):  # a group per run of one partition (few)
            top = max(filter(None, map(_timestamp_ms, group)), default=0)  # no timestamp counts as none
            if top > newest.get(place, 0):
                newest[place] = top
        if not newest or min(newest.values()) <= 0:
            return None
        return datetime.fromtimestamp(min(newest.values()) / 1000, tz=timezone.utc)

    async def publish_states(
        states: dict[str, EnforcementState], as_of: datetime | None = None
    ) -> list[Awaitable[Any]]:
        """Send the batch's decisions and a heartbeat now (a view, not money: no store involved)."""
        futures = []
        for key, decision in states.items():
            futures.append(await send(topics.enforcement.name, key.encode(), decision.model_dump_json().encode()))
        futures.append(await send(topics.enforcement.name, HEARTBEAT_KEY.encode(),
                                  heartbeat(as_of).model_dump_json().encode()))  # fmt: skip
        return futures

    def count_in_ledger(states: dict[str, EnforcementState]) -> None:
        """After the write: the ledger's counted totals follow the stored money; settled calls leave it."""
        assert ledger is not None
        for state in states.values():
            if state.run_id or state.at_cap is ThresholdAction.ALERT:
                continue
            ledger.count(state.customer_id, state.period, state.spent_credits, state.counted_ids)

    #: Rated batches not stored yet, in order: a write stores every one of them in one insert.
    unstored: collections.deque[_Staged] = collections.deque()
    #: Set when a batch joins ``unstored`` (a lingering write looks again).
    staged_more = asyncio.Event()

    def enough_waiting() -> bool:
        return len(unstored) >= worker.writes_in_hand or sum(len(e.result.raw) for e in unstored) >= worker.batch_size

    async def linger(entry: _Staged) -> None:
        """Wait (at most ``insert_linger_seconds`` after ``entry`` was rated) for more batches to write with it."""
        while not enough_waiting():
            left = entry.rated_at + worker.insert_linger_seconds - time.monotonic()
            if left <= 0:
                return
            staged_more.clear()
            try:
                await asyncio.wait_for(staged_more.wait(), left)
            except TimeoutError:
                return

    async def store_rows(entry: _Staged) -> None:
        """Store ``entry``'s rows, with those of every batch rated after it that waits for its write.

        Writes run in batch order, each after the previous one succeeded, so ``entry`` is the
        oldest unstored batch. The write lingers (``insert_linger_seconds``) and the batches in
        hand go as one insert (a store pays a fixed cost per insert and per part); each batch's
        offsets are still committed only after its own write, which finds its rows stored.
        """
        if entry.stored:
            return
        await linger(entry)
        group = list(unstored)
        assert group and group[0] is entry, "writes out of order"
        if len(group) == 1:
            raw, rated, alerts, raw_stored = entry.result.raw, entry.result.rated, entry.result.alerts, entry.raw_stored
        else:
            raw = RawBatch.concat([e.result.raw for e in group])
            rated = RatedBatch.concat([e.result.rated for e in group])
            alerts = [a for e in group for a in e.result.alerts]
            raw_stored = frozenset().union(*(e.raw_stored for e in group))
        started = time.monotonic()
        await with_store(lambda: store.insert_batch(raw, rated, alerts, raw_stored=raw_stored), "store write")
        stats.store_seconds += time.monotonic() - started
        for e in group:
            e.stored = True
            unstored.popleft()
        stats.inserts += 1

    async def stage_batch(
        messages: Sequence[InboundMessage], keys: Sequence[bytes | None]
    ) -> Callable[[], Awaitable[dict[tuple[str, int], int]]]:
        """Rate a batch and take it into the in-memory state; return the write that makes it durable.

        The state takes the batch before it is written so that the next batch, rated while
        this one is written, sees its totals and ids. The state is derived from the store:
        if the write cannot complete the process exits (see consumer.py) and a restart
        rebuilds it from what was stored.
        """
        rating_started = time.monotonic()
        result = await with_store(
            lambda: processor.process(messages, state.month_to_date, prepare=state.prepare, history=state),
            "loading state",
            exclusive=False,
        )
        entry = _Staged(result, frozenset(state.raw_stored), time.monotonic())
        unstored.append(entry)
        staged_more.set()
        state.commit(result)
        activity.last_batch = time.monotonic()
        state_sent = await publish_states(result.enforcement, reached(messages))
        alerts_sent = await publish_alerts(result)
        stats.staged += len(messages)
        stats.last_batch_messages, stats.last_rate_seconds = len(messages), time.monotonic() - rating_started
        stats.rate_seconds += stats.last_rate_seconds
        if result.dead_letters:
            key_of: dict[tuple[str | None, int | None, int | None], Any] = {
                (m.topic, m.partition, m.offset): key for m, key in zip(messages, keys, strict=True)
            }
            dead_letter_keys = [
                key_of.get((d.source_topic, d.source_partition, d.source_offset)) for d in result.dead_letters
            ]
        else:
            dead_letter_keys = []

        async def write() -> dict[tuple[str, int], int]:
            write_started = time.monotonic()
            activity.writing += 1
            try:
                await store_rows(entry)
            finally:
                activity.writing -= 1
            stats.last_store_seconds = time.monotonic() - write_started
            if ledger is not None and result.enforcement:
                try:
                    await asyncio.to_thread(count_in_ledger, result.enforcement)
                except LedgerUnavailable as exc:
                    # Conservative meanwhile: the batch's settled calls stay held (until their TTL)
                    # and the next batch of each customer sets its counted total again.
                    log.warning("ledger not updated for this batch: %s", exc)
            held = await send_dead_letters(result, dead_letter_keys) if result.dead_letters else {}
            # The broker's confirmations, before the batch's offsets may be committed.
            for fut in (*alerts_sent, *state_sent):
                await fut
            stats.messages += len(messages)
            stats.rated += len(result.rated)
            stats.duplicates += result.duplicates
            stats.dead_letters += len(result.dead_letters)
            stats.alerts += len(result.alerts)
            stats.batches += 1
            stats.last_write_seconds = time.monotonic() - write_started
            return held

        return write

    async def handle_batch(messages: Sequence[InboundMessage], keys: Sequence[bytes | None]) -> None:
        """One batch, rated and written (what the consumer does, without the overlap)."""
        write = await stage_batch(messages, keys)
        await write()

    consumer = BatchConsumer(
        kafka,
        topics=[topics.usage.name, topics.outcomes.name],
        kinds={topics.usage.name: "usage", topics.outcomes.name: "outcome"},
        group_id=worker.app_id,
        stage=stage_batch,
        # Partitions are moving: another worker may write for them meanwhile.
        on_revoked=state.reset,
        batch_size=worker.batch_size,
        batch_timeout=worker.batch_timeout,
        commit_interval=worker.commit_interval,
        session_timeout=worker.session_timeout,
        shutdown_drain=worker.shutdown_drain_seconds,
        writes_in_hand=worker.writes_in_hand,
        # The fatal path (consumer.fatal) commits nothing, closes the store, flushes the log, exits.
        on_fatal=getattr(store, "close", lambda: None),
        loop=app.loop,
        beacon=app.beacon,
    )

    @app.task
    async def _consume() -> None:
        # Logging is set up by now: hold back the repeats a broker outage makes (quiet_logs.py).
        quiet_logs.install()
        # A runtime dependency of the app: started now, stopped before the app's producer.
        await app.add_runtime_dependency(consumer)

    @app.timer(interval=1.0)
    async def beat() -> None:
        """Tell guards the view is current while nothing is read (batches send their own heartbeat).

        Silent while a write is stuck (the store is down): guards then see the view age.
        """
        if activity.writing == 0 and time.monotonic() - activity.last_batch >= 1.0:
            fut = await send(topics.enforcement.name, HEARTBEAT_KEY.encode(), heartbeat().model_dump_json().encode())
            await fut

    @app.timer(interval=60.0)
    async def expire_windows() -> None:
        """Drop tumbling-window counters older than the configured horizon."""
        state.expire_windows()

    if worker.gc_collect_seconds > 0:

        @app.timer(interval=worker.gc_collect_seconds)
        async def collect() -> None:
            collect_garbage(stats)

    @app.timer(interval=worker.settle_interval_seconds)
    async def settle_days() -> None:
        """Settle closed days so invoices read per-day sums instead of every row (sql/007, storage/settle.py)."""
        result = await with_store(lambda: settle_store(store, now=clock()), "settle")
        if result.customer_days:
            log.info("settled %d customer-days in %.1f s", result.customer_days, result.seconds)

    @app.page("/stats/")
    async def stats_view(web: Any, request: Any) -> Any:
        assigned = sorted(f"{tp.topic}:{tp.partition}" for tp in consumer.assigned)
        ready = bool(assigned) and not consumer.rebalancing
        held = {f"{tp.topic}:{tp.partition}": offset for tp, offset in consumer.held.items()}
        body = {
            **stats.as_dict(), "assigned": assigned, "ready": ready, "store_lookups": state.lookups, "held": held,
            "broker": consumer.broker_stats(),
        }  # fmt: skip
        return web.bytes(orjson.dumps(body), content_type="application/json")

    # Handles for tests and the CLI (the batch path is unit-tested through ``meterstream_handle_batch``).
    app.meterstream_stats = stats  # type: ignore[attr-defined]
    app.meterstream_state = state  # type: ignore[attr-defined]
    app.meterstream_handle_batch = handle_batch  # type: ignore[attr-defined]
    app.meterstream_stage_batch = stage_batch  # type: ignore[attr-defined]
    return app
