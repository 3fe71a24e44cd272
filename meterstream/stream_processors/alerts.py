"""Budget alerts exactly once on the topic, across crashes: an outbox in ClickHouse.

In a batch the worker stores rated rows, then the alert rows, then publishes
the alerts and waits for the broker. A crash can stop it between any two of
those steps, so when partitions are assigned, before their first batch is rated,
:func:`reconcile_alerts` runs for the customers of those partitions:

1. reads the ids already on ``budget-alerts`` since the start of the previous
   month (the topic is the record of what was sent);
2. for every customer with a budget, compares month-to-date credits in the
   store with the thresholds recorded in ``budget_alerts`` and records any that
   were crossed but not recorded (a crash between rated rows and alert rows);
3. publishes every recorded alert whose id is not on the topic yet.

So each threshold crossing is published once, and none is missed. Why at
assignment and not at start-up: a worker joining a running group found, at
start-up, alerts another worker had stored and was about to publish, and
published them too (tests/system/test_scale_out.py). At assignment every
live worker has finished the batches of the partitions that moved (they settle
on revocation), and each customer's partition has one owner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from meterstream.budgets import BudgetBook, customer_decision, thresholds_to_alert
from meterstream.clock import utc_now
from meterstream.config import KafkaSettings
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


def published_alert_ids(kafka: KafkaSettings, topic: str, since: datetime, timeout: float = 30.0) -> set[str]:
    """Ids of the alerts on ``topic`` published since ``since``, read to the end of every partition."""
    consumer = Consumer(
        {
            **kafka.confluent_config(),
            "group.id": "meterstream-alert-ledger",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    ids: set[str] = set()
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        partitions = list(metadata.topics[topic].partitions) if topic in metadata.topics else []
        if not partitions:
            return ids
        stamp = int(since.timestamp() * 1000)
        starts = consumer.offsets_for_times([TopicPartition(topic, p, stamp) for p in partitions], timeout=timeout)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1] for p in partitions}
        todo = {tp.partition for tp in starts if tp.offset >= 0 and tp.offset < ends[tp.partition]}
        consumer.assign([tp for tp in starts if tp.partition in todo])
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout:.0f} s")
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                raise KafkaException(message.error())
            partition, offset = message.partition(), message.offset()
            try:
                ids.add(BudgetAlert.model_validate_json(message.value() or b"").alert_id)
            except ValueError:
                log.warning("skipping an unreadable message on %s at offset %s", topic, offset)
            if partition is not None and offset is not None and offset + 1 >= ends[partition]:
                todo.discard(partition)
    finally:
        consumer.close()
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
    kafka: KafkaSettings,
    topic: str,
    *,
    now: datetime | None = None,
    timeout: float = 30.0,
    owns: Callable[[str], bool] = lambda customer_id: True,
) -> tuple[set[str], int]:
    """Record and publish what a crash left undone for the customers ``owns`` accepts (those of
    the partitions this worker was assigned); returns (ids on the topic, alerts published now)."""
    now = now or utc_now()
    period = period_of(now)
    periods = [previous_period(period), period]
    since = datetime(int(periods[0][:4]), int(periods[0][5:7]), 1, tzinfo=timezone.utc)
    published = published_alert_ids(kafka, topic, since, timeout)
    missing = missing_alerts(store, budgets, periods, now, owns)
    if missing:
        store.insert_batch([], [], missing)
    pending = [
        BudgetAlert.model_validate(row)
        for row in store.query(_RECORDED, {"periods": periods}).dicts()
        if row["alert_id"] not in published and owns(row["customer_id"])
    ]
    if pending:
        producer = Producer(kafka.producer_config())
        failures: list[str] = []
        for alert in pending:
            producer.produce(
                topic,
                key=alert.customer_id.encode(),
                value=alert.model_dump_json().encode(),
                on_delivery=lambda err, msg: failures.append(str(err)) if err else None,
            )
        if producer.flush(timeout) or failures:
            raise KafkaException(f"could not publish {len(pending)} pending alerts: {failures[:1]}")
        published.update(alert.alert_id for alert in pending)
        log.warning("published %d alerts a previous run had recorded but not sent", len(pending))
    return published, len(pending)


_CURRENT_SPEND = """
SELECT customer_id, sum(credits) AS credits, max(occurred_at) AS watermark
FROM usage_rated FINAL
WHERE period = {period:String}
GROUP BY customer_id
"""


def current_states(
    store: ClickHouseStore, budgets: BudgetBook, now: datetime | None = None, *, catalog_fingerprint: str = ""
) -> list[EnforcementState]:
    """The decision for every customer with a budget and spend this period, or named in the file.

    Published at start-up so SDK guards know each cap before the first event of
    the period arrives. The ``default`` budget is published under
    :data:`DEFAULT_BUDGET_KEY` (nothing spent): a customer with no state of its
    own has spent nothing this period as of this start, so guards apply that cap.
    """
    now = now or utc_now()
    period = period_of(now)
    rows = {r["customer_id"]: r for r in store.query(_CURRENT_SPEND, {"period": period}).dicts()}
    epoch = datetime(2000, 1, 1, tzinfo=timezone.utc)
    states = []
    if budgets.default is not None:
        default = customer_decision(DEFAULT_BUDGET_KEY, period, Decimal(0), budgets.default, watermark=epoch, now=now,
                                    catalog_fingerprint=catalog_fingerprint)  # fmt: skip
        states.append(default)
    for customer in sorted(set(budgets.customers) | set(rows)):
        budget = budgets.for_customer(customer)
        if budget is None:
            continue
        row = rows.get(customer)
        spent = row["credits"] if row else Decimal(0)
        watermark = row["watermark"] if row else epoch
        states.append(customer_decision(customer, period, spent, budget, watermark=watermark, now=now,
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


def publish_states(kafka: KafkaSettings, topic: str, states: list[EnforcementState], timeout: float = 30.0) -> None:
    if not states:
        return
    producer = Producer(kafka.producer_config())
    for state in states:
        producer.produce(topic, key=state.key.encode(), value=state.model_dump_json().encode())
    if producer.flush(timeout):
        raise KafkaException(f"could not publish {len(states)} enforcement states within {timeout:.0f} s")
