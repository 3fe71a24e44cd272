"""Crash recovery of the alert outbox, with the store put in exactly the state a crash leaves.

A worker killed between storing an alert row and publishing it leaves a row in
``budget_alerts`` that is not on ``budget-alerts``; one killed between the rated
rows and the alert rows leaves a crossing that no alert records. The next
start (``reconcile_alerts``, run by ``meterstream worker`` before consuming)
must publish the first once and record and publish the second once. The store
returns ``crossed_at`` without a timezone (chDB), which once made every restart
fail: these tests read it back through the real engine.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterstream.budgets import BudgetBook
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import BudgetAlert, ThresholdAction
from meterstream.storage.clickhouse import open_store
from meterstream.stream_processors.alerts import reconcile_alerts, standalone_outbox
from meterstream.topics import ensure_topics

pytestmark = pytest.mark.system

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
BUDGETS = BudgetBook.model_validate({"customers": {"acme": {"monthly_credits": "10", "thresholds": [50, 100]}}})


def _rated(customer: str, credits_each: int, count: int, at: datetime):
    # gpt-4o input: 0.5 credits per 1K tokens in the default price book.
    catalog = load_catalog()
    return [
        catalog.rate(UsageEvent(event_id=f"{customer}-{at:%m%d%H%M}-{i}", customer_id=customer, occurred_at=at,
                                model="gpt-4o", input_tokens=2000 * credits_each))  # fmt: skip
        for i in range(count)
    ]


def _alert(customer: str, period: str, threshold: int, spent: str, crossed_at: datetime) -> BudgetAlert:
    return BudgetAlert(
        alert_id=BudgetAlert.make_id(customer, period, threshold), customer_id=customer, period=period,
        threshold_percent=threshold, budget_credits=Decimal(10), spent_credits=Decimal(spent),
        crossed_at=crossed_at, triggering_event_id="e", action=ThresholdAction.ALERT,
    )  # fmt: skip


def _one_more_call(pipeline, customer: str, event_id: str, at: datetime) -> None:
    """A small call (1,000 gpt-4o-mini input tokens) that crosses no new threshold; waits until it is handled."""
    from meterstream.producers import MeterClient

    with MeterClient(pipeline.kafka) as meter:
        meter.record_llm_call(customer, "gpt-4o-mini", input_tokens=1000, output_tokens=0, event_id=event_id,
                              occurred_at=at)  # fmt: skip
    pipeline.wait_processed(1)


def _alerts_on(topic: str, kafka, expected: int) -> list[dict]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**kafka.confluent_config(), "group.id": "outbox-test", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        found: list[dict] = []
        quiet = 0
        for _ in range(60):  # at most ~30 s
            message = consumer.poll(0.5)
            if message is None:
                quiet += 1
                if len(found) >= expected and quiet >= 3:
                    break
                continue
            if not message.error():
                quiet = 0
                found.append(json.loads(message.value()))
        return found
    finally:
        consumer.close()


def test_a_stored_but_unpublished_alert_is_published_once_at_start(clickhouse, kafka_settings):
    topics = ensure_topics(kafka_settings)
    store = open_store(clickhouse)
    try:
        stored = _alert("acme", "2026-11", 50, "5", NOW - timedelta(hours=1))
        store.insert_batch([], _rated("acme", 1, 5, NOW - timedelta(hours=1)), [stored])
        # What the engine returns is what start-up validates (chDB gives it back without a zone).
        [row] = store.query("SELECT crossed_at FROM budget_alerts").dicts()
        assert row["crossed_at"] == stored.crossed_at and row["crossed_at"].tzinfo is not None

        with standalone_outbox(kafka_settings) as kafka:
            published, sent = reconcile_alerts(store, BUDGETS, kafka, topics.budget_alerts.name, now=NOW)
        assert sent == 1 and stored.alert_id in published
        # A second start finds it on the topic and sends nothing.
        with standalone_outbox(kafka_settings) as kafka:
            _, sent_again = reconcile_alerts(store, BUDGETS, kafka, topics.budget_alerts.name, now=NOW)
        assert sent_again == 0
    finally:
        store.close()
    on_topic = _alerts_on(topics.budget_alerts.name, kafka_settings, 1)
    assert [a["alert_id"] for a in on_topic] == [stored.alert_id]
    assert datetime.fromisoformat(on_topic[0]["crossed_at"]) == stored.crossed_at


def test_a_missed_crossing_is_recorded_and_published_once_at_start(clickhouse, kafka_settings):
    topics = ensure_topics(kafka_settings)
    store = open_store(clickhouse)
    try:
        # 11 credits against a cap of 10, stored without any alert row: 50% and 100% were missed.
        store.insert_batch([], _rated("acme", 1, 11, NOW - timedelta(minutes=5)), [])
        with standalone_outbox(kafka_settings) as kafka:
            published, sent = reconcile_alerts(store, BUDGETS, kafka, topics.budget_alerts.name, now=NOW)
        assert sent == 2
        rows = store.query("SELECT threshold_percent, spent_credits, crossed_at FROM budget_alerts FINAL "
                           "ORDER BY threshold_percent").dicts()  # fmt: skip
        assert [(r["threshold_percent"], r["spent_credits"], r["crossed_at"]) for r in rows] == [
            (50, Decimal(11), NOW), (100, Decimal(11), NOW)
        ]
        with standalone_outbox(kafka_settings) as kafka:
            _, sent_again = reconcile_alerts(store, BUDGETS, kafka, topics.budget_alerts.name, now=NOW)
        assert sent_again == 0
    finally:
        store.close()
    on_topic = _alerts_on(topics.budget_alerts.name, kafka_settings, 2)
    assert sorted(a["threshold_percent"] for a in on_topic) == [50, 100]


def test_the_worker_starts_with_an_unpublished_alert_in_its_store(pipeline_factory):
    """The crash loop as it was seen: an alert row stored, the worker stopped, then started."""
    pipeline = pipeline_factory(budgets="customers:\n  acme: {monthly_credits: '10', thresholds: [50]}\n", start=False)
    now = datetime.now(timezone.utc)  # the worker reconciles this and last month
    period = now.strftime("%Y-%m")
    stored = _alert("acme", period, 50, "5", now.replace(microsecond=0))
    store = open_store(pipeline.clickhouse)
    try:
        store.insert_batch([], _rated("acme", 1, 5, now.replace(microsecond=0)), [stored])
    finally:
        store.close()
    pipeline.start()  # used to exit at once: "Input should have timezone info"
    # The outbox pass runs when the partition's first batch after the assignment arrives (for the
    # customers of the partitions this worker owns, see stream_processors/alerts.py): send one.
    _one_more_call(pipeline, "acme", "after-start-1", now)
    on_topic = _alerts_on(pipeline.topics.budget_alerts.name, pipeline.kafka, 1)
    assert [a["alert_id"] for a in on_topic] == [stored.alert_id]
    pipeline.worker.stop()
    pipeline.start()
    _one_more_call(pipeline, "acme", "after-start-2", now)
    assert [a["alert_id"] for a in _alerts_on(pipeline.topics.budget_alerts.name, pipeline.kafka, 1)] == [
        stored.alert_id
    ]
