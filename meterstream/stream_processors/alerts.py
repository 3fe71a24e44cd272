"""Budget alerts exactly once on the topic, across crashes: an outbox in ClickHouse.

In a batch the worker publishes the alerts (as soon as the batch is rated, so
they do not wait for the store), then stores the rated rows and the alert rows,
and waits for the broker's confirmations before committing the offsets. A
crash can stop it between any two of those steps, so when partitions are
assigned, before their first batch is rated, :func:`reconcile_alerts` runs for
the customers of those partitions:

1. reads the ids already on ``budget-alerts`` since the start of the previous
   month (the topic is the record of what was sent);
2. for every customer with a budget, compares month-to-date credits in the
   store with the thresholds recorded in ``budget_alerts`` and records any that
   were crossed but not recorded (a crash between rated rows and alert rows);
3. publishes every recorded alert whose id is not on the topic yet.

A crash after an alert was published but before its batch was stored replays
the batch: it raises the same alert (deterministic id), which step 1 found on
the topic, so it is recorded and not sent again. So each threshold crossing is
published once, and none is missed. Why at
assignment and not at start-up: a worker joining a running group found, at
start-up, alerts another worker had stored and was about to publish, and
published them too (tests/system/test_scale_out.py). At assignment every
live worker has finished the batches of the partitions that moved (they settle
on revocation), and each customer's partition has one owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from meterstream.budgets import BudgetBook, customer_decision, thresholds_to_alert
from meterstream.clock import utc_now
from meterstream.config import KafkaSettings
from meterstream.kafka_clients import aiokafka_client_args
from meterstream.periods import period_of, previous_period
from meterstream.producers.ledger import RedisLedger
from meterstream.schemas.records import (
    DEFAULT_BUDGET_KEY,
    AlertKind,
    BudgetAlert,
    EnforcementState,
    ThresholdAction,
)
from meterstream.storage.clickhouse import ClickHouseStore

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Sends one record: (topic name, key, value) -> the broker's delivery future. In the worker this is
#: Faust's producer through the declared side topics (app.py); at start-up a short-lived aiokafka one.
Send = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]


class OutboxKafka:
    """The outbox's Kafka side on one event loop: aiokafka reads ``budget-alerts``, ``send`` publishes.

    Called from the worker's batch thread while the loop runs (the pass at partition
    assignment), or from the main thread before the app starts (the start-up steps).
    """

    def __init__(self, kafka: KafkaSettings, loop: asyncio.AbstractEventLoop, send: Send) -> None:
        self.kafka = kafka
        self.loop = loop
        self.send = send

    def run(self, coro: Awaitable[T], timeout: float) -> T:
        if self.loop.is_running():
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]
        return self.loop.run_until_complete(coro)

    def published_ids(self, topic: str, since: datetime, timeout: float) -> set[str]:
        return self.run(published_alert_ids(self.kafka, topic, since, timeout), timeout + 10)

    def publish(self, topic: str, records: list[tuple[bytes, bytes]], timeout: float) -> None:
        """Send ``(key, value)`` records and wait until the broker has confirmed every one."""
        async def send_all() -> None:
            futures = [await self.send(topic, key, value) for key, value in records]
            await asyncio.wait_for(asyncio.gather(*futures), timeout)

        self.run(send_all(), timeout + 10)


@contextmanager
def standalone_outbox(kafka: KafkaSettings, loop: asyncio.AbstractEventLoop | None = None) -> Iterator[OutboxKafka]:
    """An :class:`OutboxKafka` with its own aiokafka producer (idempotent, acks=all) on ``loop``
    (a new one if None): the worker's start-up steps, before its app runs, and tools."""
    own = loop is None
    loop = loop or asyncio.new_event_loop()

    async def start() -> AIOKafkaProducer:  # aiokafka clients are made on their running loop
        producer = AIOKafkaProducer(**aiokafka_client_args(kafka), acks="all", enable_idempotence=True)
        await producer.start()
        return producer

    producer = loop.run_until_complete(start())
    try:
        yield OutboxKafka(kafka, loop, lambda topic, key, value: producer.send(topic, value, key=key))
    finally:
        loop.run_until_complete(producer.stop())
        if own:
            loop.close()

_TOTALS = """
SELECT customer_id, period, sum(credits) AS credits
FROM usage_rated FINAL
WHERE period IN {periods:Array(String)}
GROUP BY customer_id, period
"""
_RECORDED = """
SELECT alert_id, if(kind = '', 'threshold', kind) AS kind, customer_id, period, threshold_percent,
       budget_credits, spent_credits, action, crossed_at, triggering_event_id, run_id,
       projected_exhaustion_at, detail
FROM budget_alerts FINAL
WHERE period IN {periods:Array(String)}
ORDER BY crossed_at, alert_id
"""


async def published_alert_ids(kafka: KafkaSettings, topic: str, since: datetime, timeout: float = 30.0) -> set[str]:
    """Ids of the alerts on ``topic`` published since ``since``, read to the end of every partition."""
    consumer = AIOKafkaConsumer(**aiokafka_client_args(kafka), enable_auto_commit=False,
                                isolation_level="read_committed")  # fmt: skip
    ids: set[str] = set()
    deadline = time.monotonic() + timeout
    await asyncio.wait_for(consumer.start(), timeout)
    try:
        # Fresh metadata of every topic (a consumer without a subscription holds none); aiokafka's client
        # object, as BatchConsumer._broker_reachable uses it.
        cluster = await asyncio.wait_for(consumer._client.fetch_all_metadata(), timeout)
        partitions = sorted(cluster.partitions_for_topic(topic) or ())
        if not partitions:
            return ids
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        stamp = int(since.timestamp() * 1000)
        starts = await asyncio.wait_for(consumer.offsets_for_times({tp: stamp for tp in tps}), timeout)
        ends = await asyncio.wait_for(consumer.end_offsets(tps), timeout)
        todo = set()
        for tp in tps:
            start = starts.get(tp)
            if start is not None and start.offset < ends[tp]:
                consumer.seek(tp, start.offset)
                todo.add(tp)
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout:.0f} s")
            batch = await consumer.getmany(*todo, timeout_ms=500)
            for records in batch.values():
                for record in records:
                    try:
                        ids.add(BudgetAlert.model_validate_json(record.value or b"").alert_id)
                    except ValueError:
                        log.warning("skipping an unreadable message on %s at offset %d", topic, record.offset)
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
    finally:
        await consumer.stop()
    return ids


def missing_alerts(
    store: ClickHouseStore, budgets: BudgetBook, periods: list[str], now: datetime,
    owns: Callable[[str], bool] = lambda customer_id: True,
) -> list[BudgetAlert]:
    """Thresholds that month-to-date credits in the store have reached but ``budget_alerts`` lacks
    (for the customers ``owns`` accepts)."""
    recorded: dict[tuple[str, str], set[int]] = {}
    for row in store.query(_RECORDED, {"periods": periods}).dicts():
        if row["kind"] == AlertKind.THRESHOLD.value:
            recorded.setdefault((row["customer_id"], row["period"]), set()).add(int(row["threshold_percent"]))
    missing = []
    for row in store.query(_TOTALS, {"periods": periods}).dicts():
        budget = budgets.for_customer(row["customer_id"])
        if budget is None or not owns(row["customer_id"]):
            continue
        spent: Decimal = row["credits"]
        for threshold in thresholds_to_alert(spent, budget, recorded.get((row["customer_id"], row["period"]), set())):
            missing.append(
                BudgetAlert(
                    alert_id=BudgetAlert.make_id(row["customer_id"], row["period"], threshold),
                    customer_id=row["customer_id"],
                    period=row["period"],
                    threshold_percent=threshold,
                    budget_credits=budget.monthly_credits,
                    spent_credits=spent,
                    crossed_at=now,
                    triggering_event_id="reconciled-at-start",
                    action=budget.action if threshold >= 100 else ThresholdAction.ALERT,
                )
            )
    return missing


def reconcile_alerts(
    store: ClickHouseStore,
    budgets: BudgetBook,
    kafka: OutboxKafka,
    topic: str,
    *,
    now: datetime | None = None,
    timeout: float = 30.0,
    owns: Callable[[str], bool] = lambda customer_id: True,
    open_periods: Callable[[datetime], Iterable[str]] | None = None,
) -> tuple[set[str], int]:
    """Record and publish what a crash left undone for the customers ``owns`` accepts (those of
    the partitions this worker was assigned); returns (ids on the topic, alerts published now).

    ``open_periods(now)``: the billing periods to look at (``Catalog.open_billing_periods``:
    an anniversary customer's previous period can be labelled two months back); by default
    this and last calendar month.
    """
    now = now or utc_now()
    if open_periods is None:
        period = period_of(now)
        periods = [previous_period(period), period]
    else:
        periods = sorted(open_periods(now))
    since = datetime(int(periods[0][:4]), int(periods[0][5:7]), 1, tzinfo=timezone.utc)
    published = kafka.published_ids(topic, since, timeout)
    missing = missing_alerts(store, budgets, periods, now, owns)
    if missing:
        store.insert_batch([], [], missing)
    pending = [
        BudgetAlert.model_validate(row)
        for row in store.query(_RECORDED, {"periods": periods}).dicts()
        if row["alert_id"] not in published and owns(row["customer_id"])
    ]
    if pending:
        kafka.publish(topic, [(alert.customer_id.encode(), alert.model_dump_json().encode()) for alert in pending],
                      timeout)  # fmt: skip
        published.update(alert.alert_id for alert in pending)
        log.warning("published %d alerts a previous run had recorded but not sent", len(pending))
    return published, len(pending)


_CURRENT_SPEND = """
SELECT customer_id, period, sum(credits) AS credits, max(occurred_at) AS watermark
FROM usage_rated FINAL
WHERE period IN {periods:Array(String)}
GROUP BY customer_id, period
"""


def current_states(
    store: ClickHouseStore, budgets: BudgetBook, now: datetime | None = None, *, catalog_fingerprint: str = "",
    billing_period: Callable[[str, datetime], str] | None = None,
) -> list[EnforcementState]:
    """The decision for every customer with a budget and spend this period, or named in the file.

    Published at start-up so SDK guards know each cap before the first event of
    the period arrives. The ``default`` budget is published under
    :data:`DEFAULT_BUDGET_KEY` (nothing spent): a customer with no state of its
    own has spent nothing this period as of this start, so guards apply that cap.
    ``billing_period(customer, now)`` (``Catalog.billing_period``) is each customer's current
    period, as the worker labels its states; by default the calendar month.
    """
    now = now or utc_now()
    period = period_of(now)
    period_for = billing_period or (lambda customer_id, at: period)
    # A current billing period starts this month or last (an anniversary one before its anchor
    # day is labelled with last month): both months' rows, then each customer's own period.
    totals = store.query(_CURRENT_SPEND, {"periods": [previous_period(period), period]})
    rows = {(r["customer_id"], r["period"]): r for r in totals.dicts()}
    epoch = datetime(2000, 1, 1, tzinfo=timezone.utc)
    states = []
    if budgets.default is not None:
        default = customer_decision(DEFAULT_BUDGET_KEY, period, Decimal(0), budgets.default, watermark=epoch, now=now,
                                    catalog_fingerprint=catalog_fingerprint)  # fmt: skip
        states.append(default)
    for customer in sorted(set(budgets.customers) | {c for c, _ in rows}):
        budget = budgets.for_customer(customer)
        if budget is None:
            continue
        customer_period = period_for(customer, now)
        row = rows.get((customer, customer_period))
        spent = row["credits"] if row else Decimal(0)
        watermark = row["watermark"] if row else epoch
        states.append(customer_decision(customer, customer_period, spent, budget, watermark=watermark, now=now,
                                        catalog_fingerprint=catalog_fingerprint))  # fmt: skip
    return states


def reconcile_ledger(ledger: RedisLedger | None, states: list[EnforcementState]) -> int:
    """Set the ledger's counted totals of every hard-capped customer to what the store holds.

    Run at start-up: a batch counted in the ledger by a worker that died before storing
    it is counted again, from the store, when it is replayed. Returns the customers set.
    """
    if ledger is None:
        return 0
    done = 0
    for state in states:
        if state.key == DEFAULT_BUDGET_KEY or state.run_id or state.at_cap is ThresholdAction.ALERT:
            continue
        ledger.count(state.customer_id, state.period, state.spent_credits, ())
        done += 1
    return done


def publish_states(kafka: OutboxKafka, topic: str, states: list[EnforcementState], timeout: float = 30.0) -> None:
    if states:
        kafka.publish(topic, [(state.key.encode(), state.model_dump_json().encode()) for state in states], timeout)
