"""Anniversary customers' budget totals after a worker restart, on the real broker and engine.

A customer billed in periods anchored on the 15th has, on 10 December, a current period
labelled 2025-11 (15 November to 14 December) and a previous one labelled 2025-10 (15 October
to 14 November): two months back, outside the calendar months a restarted worker used to
preload, and an event of it (10 November) is in calendar month 2025-11, so it was not loaded
per batch either. The worker's store-backed state now keys, preloads and loads totals by
billing period (meterstream/stream_processors/state.py, the catalog's rule as a dependency):
each threshold of each period is alerted exactly once across the restart, at the right total.
The test's clock (and the workers') is 10 December 2025.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meterstream.producers import MeterClient
from meterstream.schemas.events import UsageEvent
from meterstream.stream_processors.runner import WorkerProcess

pytestmark = pytest.mark.system

PLANS = """
currency: USD
default_plan: basic
plans:
  basic:
    versions:
      - version: basic-1
        effective_from: "2025-01-01"
        price_book: {meters: {requests: {credits_per_unit: "1"}}}
        overage: {model: per_unit, unit_price: "0.01"}
customers:
  wayne: {plan: basic, effective_from: "2025-08-15", billing_anchor: anniversary}
"""
BUDGETS = 'customers:\n  wayne: {monthly_credits: "1000", thresholds: [50, 100]}\n'


def _requests(event_id: str, day: datetime, quantity: int) -> UsageEvent:
    return UsageEvent(event_id=event_id, customer_id="wayne", occurred_at=day, meter="requests", quantity=quantity)


@pytest.mark.parametrize("clock_at", ["2025-12-10T12:00:00+00:00"])
def test_anniversary_totals_are_preloaded_by_billing_period_after_a_restart(pipeline_factory, tmp_path) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS)
    pipeline = pipeline_factory(budgets=BUDGETS, start=False, env={"METERSTREAM_WORKER__PLANS_FILE": str(plans)})
    pipeline.start()
    before = [
        _requests("oct-1", datetime(2025, 11, 10, 9, tzinfo=UTC), 600),  # period 2025-10 (late: billed in 2025-11)
        _requests("nov-1", datetime(2025, 12, 5, 9, tzinfo=UTC), 600),  # period 2025-11
    ]
    with MeterClient(pipeline.kafka) as meter:
        for event in before:
            meter.record(event)
    assert meter.failed == 0
    pipeline.wait_processed(len(before))
    pipeline.worker.stop()

    # A new worker: 500 more credits in each period take both to 1,100 of 1,000.
    pipeline.worker = WorkerProcess(pipeline.env, pipeline.web_port, pipeline.worker.log_path)
    pipeline.start()
    after = [
        _requests("oct-2", datetime(2025, 11, 12, 9, tzinfo=UTC), 500),
        _requests("nov-2", datetime(2025, 12, 6, 9, tzinfo=UTC), 500),
    ]
    with MeterClient(pipeline.kafka) as meter:
        for event in after:
            meter.record(event)
    assert meter.failed == 0
    pipeline.wait_processed(len(after))

    expected = Counter({("2025-10", 50): 1, ("2025-10", 100): 1, ("2025-11", 50): 1, ("2025-11", 100): 1})
    messages = pipeline.read_topic(pipeline.topics.budget_alerts.name, sum(expected.values()))
    alerts = [json.loads(m.value()) for m in messages]
    assert Counter((a["period"], a["threshold_percent"]) for a in alerts) == expected
    spent = {(a["period"], a["threshold_percent"]): Decimal(a["spent_credits"]) for a in alerts}
    # The 100% alerts were raised by the restarted worker at the whole period's total, not 500.
    assert spent[("2025-10", 100)] == spent[("2025-11", 100)] == Decimal(1100)
