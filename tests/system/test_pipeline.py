"""The whole pipeline on the real broker and the real ClickHouse engine.

SDK -> Kafka -> worker (a child process, as in production) -> ClickHouse, read
back through the same saved queries the CLI uses.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from meterstream.clock import current_period, utc_now
from meterstream.pricing.plans import load_catalog
from meterstream.producers import MeterClient
from meterstream.schemas.events import Attribution, Meter, OutcomeEvent, UsageEvent
from meterstream.storage.queries import run_saved_query

pytestmark = pytest.mark.system

MODELS = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-pro"]


def _month_to_date(pipeline, period: str, customer: str = "") -> dict[str, dict]:
    rows = run_saved_query(pipeline.clickhouse, "month_to_date", period=period, customer=customer).dicts()
    # every credit the events were rated with: usage credits and outcome credits
    return {row["customer_id"]: {**row, "credits": row["usage_credits"] + row["outcome_credits"]} for row in rows}


def _customer_totals(pipeline, customer: str, events) -> dict[str, Decimal | int]:
    """A customer's stored events and credits over every period the events fall in (a test near the 1st spans two)."""
    totals: dict[str, Decimal | int] = {"events": 0, "credits": Decimal(0)}
    for period in sorted({event.period for event in events}):
        row = _month_to_date(pipeline, period, customer).get(customer, {"events": 0, "credits": Decimal(0)})
        totals["events"] += row["events"]
        totals["credits"] += row["credits"]
    return totals


def _usage(customer: str, i: int, now: datetime, **fields) -> UsageEvent:
    base = {
        "event_id": f"{customer}-{i}",
        "customer_id": customer,
        "occurred_at": now - timedelta(seconds=i),
        "model": MODELS[i % len(MODELS)],
        "input_tokens": 100 + 37 * i,
        "cached_input_tokens": (100 + 37 * i) // 3 if i % 2 else 0,
        "output_tokens": 10 + 11 * i,
        "workflow_id": "support-agent",
        "run_id": f"run-{i // 5}",
    }
    base.update(fields)
    return UsageEvent(**base)


@pytest.mark.clock
def test_n_events_arrive_as_exactly_n_rated_rows_with_exact_totals(pipeline_factory):
    pipeline = pipeline_factory()
    # Read once the worker runs. The usage spans the 23 minutes before now: at the start of a
    # month it spans two periods, each checked on its own.
    now = utc_now()
    catalog = load_catalog()
    customers = [f"cust-{c}" for c in range(7)]
    events: list[UsageEvent | OutcomeEvent] = []
    for i in range(1400):
        events.append(_usage(customers[i % 7], i, now))
    for i in range(40):  # non-token meters and outcomes ride the same pipeline
        events.append(
            UsageEvent(
                event_id=f"docs-{i}", customer_id=customers[i % 7], occurred_at=now,
                meter=Meter.DOCUMENTS, quantity=Decimal("1.5"), unit="page",
            )  # fmt: skip
        )
        events.append(
            OutcomeEvent(
                event_id=f"outcome-{i}", customer_id=customers[i % 7], occurred_at=now,
                outcome_type="resolved_ticket", run_id=f"run-{i}",
                attribution=Attribution.AI_ONLY if i % 4 else Attribution.HUMAN_ASSISTED,
            )  # fmt: skip
        )

    with MeterClient(pipeline.kafka) as meter:
        for event in events:
            meter.record(event)
        assert meter.flush(30) == 0
    assert (meter.delivered, meter.failed) == (len(events), 0)
    stats = pipeline.wait_processed(len(events))
    assert stats["rated"] == len(events) and stats["dead_letters"] == 0

    expected_credits: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    expected_cost: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    expected_count: Counter[tuple[str, str]] = Counter()
    for event in events:
        rated = catalog.rate(event)
        key = (event.period, event.customer_id)
        expected_credits[key] += rated.credits
        expected_cost[key] += rated.cost_to_serve
        expected_count[key] += 1

    periods = sorted({period for period, _ in expected_count})
    stored_rows = 0
    for period in periods:
        stored = _month_to_date(pipeline, period)
        assert set(stored) == {customer for p, customer in expected_count if p == period}
        for customer, row in stored.items():
            assert row["events"] == expected_count[period, customer]
            assert row["credits"] == expected_credits[period, customer]  # Decimal, exact
            assert row["cost_to_serve"] == expected_cost[period, customer]
        totals = run_saved_query(pipeline.clickhouse, "store_totals", period=period).dicts()[0]
        assert totals["raw_events"] == totals["rated_rows"]
        stored_rows += totals["rated_rows"]
    assert stored_rows == len(events)


def test_a_hand_priced_event_is_stored_to_the_last_digit(pipeline_factory, now):
    # PRICING.md's example, at the default book's gpt-4o rates:
    # credits 12 x 0.5 + 3 x 2 = 12; cost 12,000 x 2.50/1M + 3,000 x 10/1M = 0.06.
    pipeline = pipeline_factory()
    with MeterClient(pipeline.kafka) as meter:
        meter.record_llm_call("hand-priced", "gpt-4o", input_tokens=12_000, output_tokens=3_000, occurred_at=now)
    pipeline.wait_processed(1)
    row = _month_to_date(pipeline, current_period(lambda: now), "hand-priced")["hand-priced"]
    assert row["credits"] == Decimal("12")
    assert row["cost_to_serve"] == Decimal("0.06")


def test_resent_events_are_counted_once(pipeline_factory, now):
    pipeline = pipeline_factory()
    events = [_usage("dupes", i, now) for i in range(30)]
    with MeterClient(pipeline.kafka) as meter:
        for event in events + events[:10]:
            meter.record(event)
    stats = pipeline.wait_processed(40)
    assert stats["duplicates"] == 10
    row = _customer_totals(pipeline, "dupes", events)
    assert row["events"] == 30
    catalog = load_catalog()
    assert row["credits"] == sum((catalog.rate(e).credits for e in events), Decimal(0))


BUDGETS = """
customers:
  alert-a: {monthly_credits: "100", thresholds: [50, 80, 100]}
  alert-b: {monthly_credits: "100", thresholds: [50, 80, 100], action: block}
  alert-c: {monthly_credits: "100", thresholds: [50, 80, 100]}
"""


def _five_credit_calls(meter: MeterClient, customer: str, count: int, at: datetime, start: int = 0) -> None:
    # gpt-4o input at 0.5 credits per 1K tokens: 10,000 input tokens = exactly 5 credits.
    for i in range(start, start + count):
        meter.record_llm_call(customer, "gpt-4o", input_tokens=10_000, output_tokens=0, event_id=f"{customer}-{i}",
                              occurred_at=at)  # fmt: skip


def _alerts(pipeline, expected: int) -> list[dict]:
    messages = pipeline.read_topic(pipeline.topics.budget_alerts.name, expected)
    return [json.loads(m.value()) for m in messages]


@pytest.mark.clock
def test_alerts_fire_exactly_at_the_thresholds_crossed_and_once(pipeline_factory):
    pipeline = pipeline_factory(budgets=BUDGETS)
    # Read once the worker runs: every call is in this period, the one the budget counts.
    now = utc_now()
    period = current_period(lambda: now)
    with MeterClient(pipeline.kafka) as meter:
        _five_credit_calls(meter, "alert-a", 17, now)  # 85 credits: 50% and 80%
        _five_credit_calls(meter, "alert-b", 20, now)  # exactly 100 credits: 50%, 80%, 100%
        _five_credit_calls(meter, "alert-c", 9, now)  # 45 credits: nothing
    pipeline.wait_processed(46)
    alerts = _alerts(pipeline, expected=5)
    crossed = sorted((a["customer_id"], a["threshold_percent"]) for a in alerts)
    assert crossed == [("alert-a", 50), ("alert-a", 80), ("alert-b", 50), ("alert-b", 80), ("alert-b", 100)]
    by_key = {(a["customer_id"], a["threshold_percent"]): a for a in alerts}
    assert by_key[("alert-b", 100)]["action"] == "block"
    assert by_key[("alert-b", 50)]["action"] == "alert"
    assert by_key[("alert-a", 80)]["alert_id"] == "alert-" + __import__("hashlib").sha256(
        f"alert-a|{period}|80".encode()
    ).hexdigest()[:24]
    for alert in alerts:
        assert Decimal(alert["spent_credits"]) * 100 >= Decimal(alert["budget_credits"]) * alert["threshold_percent"]

    # More spend that crosses nothing new for a and b, and 50% for c.
    with MeterClient(pipeline.kafka) as meter:
        _five_credit_calls(meter, "alert-a", 2, now, start=100)  # 95 credits
        _five_credit_calls(meter, "alert-b", 3, now, start=100)  # 115 credits
        _five_credit_calls(meter, "alert-c", 1, now, start=100)  # 50 credits
    pipeline.wait_processed(6)
    alerts = _alerts(pipeline, expected=6)
    crossed = Counter((a["customer_id"], a["threshold_percent"]) for a in alerts)
    assert crossed == Counter(
        {("alert-a", 50): 1, ("alert-a", 80): 1, ("alert-b", 50): 1, ("alert-b", 80): 1, ("alert-b", 100): 1,
         ("alert-c", 50): 1}
    )  # fmt: skip
    stored = run_saved_query(pipeline.clickhouse, "budget_alerts", period=period, customer="").dicts()
    assert sorted((r["customer_id"], r["threshold_percent"]) for r in stored) == sorted(crossed)


MALFORMED = {
    "invalid json": b"{not json",
    "invalid utf-8": b'{"event_id": "\xff\xfe", "customer_id": "x"}',
    "naive datetime": b'{"event_id":"m1","customer_id":"c","occurred_at":"2026-11-01T00:00:00","model":"gpt-4o"}',
    "string token count": (
        b'{"event_id":"m2","customer_id":"c","occurred_at":"2026-11-01T00:00:00Z","model":"gpt-4o",'
        b'"input_tokens":"12"}'
    ),
    "negative quantity": (
        b'{"event_id":"m3","customer_id":"c","occurred_at":"2026-11-01T00:00:00Z","meter":"documents",'
        b'"quantity":-1}'
    ),
    "unknown model": (
        b'{"event_id":"m4","customer_id":"c","occurred_at":"2026-11-01T00:00:00Z","model":"no-such-model",'
        b'"input_tokens":5}'
    ),
    "far future": b'{"event_id":"m5","customer_id":"c","occurred_at":"2099-01-01T00:00:00Z","model":"gpt-4o"}',
    "oversized": b'{"event_id":"m6","pad":"' + b"x" * 70_000 + b'"}',
    "empty": b"",
}


def test_malformed_messages_go_to_the_dead_letter_topic_and_nothing_else_is_lost(pipeline_factory, now):
    pipeline = pipeline_factory()
    good = [_usage("dlq-ok", i, now) for i in range(60)]
    with MeterClient(pipeline.kafka) as meter:
        for event in good[:30]:
            meter.record(event)
    pipeline.produce_raw(pipeline.topics.usage.name, list(MALFORMED.values()))
    outcome_on_usage_topic = OutcomeEvent(
        event_id="wrong-topic", customer_id="dlq-ok", occurred_at=now, outcome_type="resolved_ticket",
        attribution=Attribution.AI_ONLY,
    ).model_dump_json().encode()  # fmt: skip
    pipeline.produce_raw(pipeline.topics.usage.name, [outcome_on_usage_topic])
    with MeterClient(pipeline.kafka) as meter:
        for event in good[30:]:
            meter.record(event)
    stats = pipeline.wait_processed(len(good) + len(MALFORMED) + 1)
    assert stats["dead_letters"] == len(MALFORMED) + 1

    letters = [json.loads(m.value()) for m in pipeline.read_topic(pipeline.topics.dead_letter.name, len(MALFORMED) + 1)]
    assert len(letters) == len(MALFORMED) + 1
    raws = sorted(base64.b64decode(letter["raw"]) for letter in letters)
    assert raws == sorted([*MALFORMED.values(), outcome_on_usage_topic])
    reasons = {base64.b64decode(letter["raw"]): letter["reason"] for letter in letters}
    assert "no price for model 'no-such-model'" in reasons[MALFORMED["unknown model"]]
    assert "input_tokens" in reasons[MALFORMED["string token count"]]
    assert "timezone" in reasons[MALFORMED["naive datetime"]]
    assert "future" in reasons[MALFORMED["far future"]]
    assert "limit" in reasons[MALFORMED["oversized"]]
    for letter in letters:
        assert letter["source_topic"] == pipeline.topics.usage.name
        assert letter["source_offset"] >= 0 and letter["source_partition"] >= 0

    assert _customer_totals(pipeline, "dlq-ok", good)["events"] == len(good)


def test_usage_cli_reads_through_the_running_worker(pipeline_factory):
    pipeline = pipeline_factory()
    with MeterClient(pipeline.kafka) as meter:
        for i in range(5):
            meter.record_llm_call("cli-reader", "gpt-4o-mini", input_tokens=1000, output_tokens=100, event_id=f"c{i}")
    pipeline.wait_processed(5)
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "usage", "--json", "--customer", "cli-reader"],
        env={**pipeline.worker.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["customer_id"], r["events"]) for r in rows] == [("cli-reader", 5)]
    # 5 x (1000 x 0.03 + 100 x 0.12) / 1000 = 0.21 credits
    assert (Decimal(rows[0]["usage_credits"]), Decimal(rows[0]["outcome_credits"])) == (Decimal("0.21"), 0)


# Not a `clock` test: settling reads usage_recent, whose TTL runs on the ClickHouse server's clock, so
# moving only the application's clock weeks back would test a skew production never has.
def test_the_worker_settles_closed_days_on_its_timer(pipeline_factory):
    """Settling runs inside the worker (it owns the embedded store); invoices then read settled days."""
    pipeline = pipeline_factory(start=False)
    pipeline.worker.env["METERSTREAM_WORKER__SETTLE_INTERVAL_SECONDS"] = "10"
    pipeline.start()
    two_days_ago = utc_now() - timedelta(days=2)  # a closed day, read once the worker runs
    with MeterClient(pipeline.kafka) as meter:
        for i in range(20):
            meter.record_llm_call(f"cust-{i % 4}", "gpt-4o-mini", input_tokens=1000, output_tokens=100,
                                  event_id=f"settle-{i}", occurred_at=two_days_ago)  # fmt: skip
    pipeline.wait_processed(20)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "settled 4 customer-days" not in pipeline.worker.log_tail(400):
        time.sleep(1)
    assert "settled 4 customer-days" in pipeline.worker.log_tail(400)
