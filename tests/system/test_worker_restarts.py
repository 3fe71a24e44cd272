"""Faults with real processes: the worker stopped or killed mid-stream and restarted.

12,000 events (500 of them resent by the client) for 12 customers with budgets;
the worker is stopped (SIGTERM) or killed (SIGKILL) after ~3,000 messages and
a new one takes over. Invoice totals must be exact and every threshold each
customer reached must be on the alert topic exactly once.

History: with Faust changelog tables and processing_guarantee="exactly_once"
(faust-streaming 0.15.3, Kafka 4.4) these failed — 34-111 events never rated
after SIGKILL; alerts repeated and missing after SIGTERM — which is why the
worker's state now lives in the store (meterstream/stream_processors/state.py)
and alerts go through an outbox (meterstream/stream_processors/alerts.py).
Every wait is bounded.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterstream.budgets import BudgetBook, thresholds_to_alert
from meterstream.pricing.plans import load_catalog
from meterstream.producers import MeterClient
from meterstream.schemas.events import UsageEvent
from meterstream.storage.queries import run_saved_query
from meterstream.stream_processors.runner import WorkerProcess

pytestmark = pytest.mark.system

NOW = datetime.now(timezone.utc)
PERIOD = NOW.strftime("%Y-%m")
CUSTOMERS = [f"crash-{i}" for i in range(12)]
BUDGETS = "customers:\n" + "".join(
    f'  {c}: {{monthly_credits: "{400 + 150 * i}", thresholds: [25, 50, 75, 100]}}\n' for i, c in enumerate(CUSTOMERS)
)


def _events(count: int) -> list[UsageEvent]:
    return [
        UsageEvent(
            event_id=f"k{i}", customer_id=CUSTOMERS[(i * 7) % len(CUSTOMERS)], occurred_at=NOW - timedelta(seconds=i),
            model=("gpt-4o", "gpt-4o-mini", "claude-haiku-4-5")[i % 3], input_tokens=500 + i % 900,
            output_tokens=50 + i % 300,
        )  # fmt: skip
        for i in range(count)
    ]


def _wait_rows(pipeline, expected: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    rows = -1
    while time.monotonic() < deadline:
        rows = run_saved_query(pipeline.clickhouse, "store_totals", period=PERIOD).dicts()[0]["rated_rows"]
        if rows >= expected:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"only {rows} of {expected} rows stored after {timeout} s")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_worker_interrupted_mid_stream_restarts_with_exact_totals_and_alerts_once(pipeline_factory, how):
    pipeline = pipeline_factory(budgets=BUDGETS, start=False)
    events = _events(12_000)
    with MeterClient(pipeline.kafka) as meter:
        for event in events:
            meter.record(event)
        for event in events[:500]:  # client resends: must be counted once, before and after the crash
            meter.record(event)
    assert meter.failed == 0

    pipeline.env["METERSTREAM_WORKER__BATCH_SIZE"] = "200"
    pipeline.worker = WorkerProcess(pipeline.env, pipeline.web_port, pipeline.worker.log_path)
    pipeline.start()
    deadline = time.monotonic() + 120
    while pipeline.worker.stats()["messages"] < 3_000:
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.1)
    if how == "SIGKILL":
        pipeline.worker.kill()
    else:
        pipeline.worker.stop()

    pipeline.worker = WorkerProcess(pipeline.env, pipeline.web_port, pipeline.worker.log_path)
    pipeline.start()
    _wait_rows(pipeline, len(events))
    # Resends of the first 500 arrive after the originals; wait until the restarted worker has seen the end.
    with MeterClient(pipeline.kafka) as meter:
        meter.record_llm_call("crash-marker", "gpt-4o-mini", input_tokens=1, output_tokens=1, event_id="marker")
    _wait_rows(pipeline, len(events) + 1)

    catalog = load_catalog()
    expected_credits: dict[str, Decimal] = {}
    for event in events:
        expected_credits[event.customer_id] = expected_credits.get(event.customer_id, Decimal(0)) + catalog.rate(event).credits
    stored = {
        row["customer_id"]: row
        for row in run_saved_query(pipeline.clickhouse, "month_to_date", period=PERIOD, customer="").dicts()
    }
    for customer, credits in expected_credits.items():
        assert stored[customer]["usage_credits"] + stored[customer]["outcome_credits"] == credits
        assert stored[customer]["events"] == sum(1 for e in events if e.customer_id == customer)

    # Every threshold each customer reached is alerted exactly once (read_committed).
    budgets = BudgetBook.model_validate(__import__("yaml").safe_load(BUDGETS))
    expected_alerts = Counter(
        (customer, t)
        for customer, credits in expected_credits.items()
        for t in thresholds_to_alert(credits, budgets.for_customer(customer), frozenset())
    )
    assert len(expected_alerts) > 12  # the budgets are set so that most thresholds are crossed
    messages = pipeline.read_topic(pipeline.topics.budget_alerts.name, sum(expected_alerts.values()))
    alerts = Counter(
        (a["customer_id"], a["threshold_percent"]) for a in (json.loads(m.value()) for m in messages)
    )
    assert alerts == expected_alerts
