"""Invoices from the stream's rated rows equal the offline rating of the same events.

The worker rates with examples/plans.yaml (three plans, a price change, grants,
a commitment, a discount); `meterstream invoice` reads ClickHouse and
`meterstream rate` rates the same events from a file with no Kafka or ClickHouse.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from meterstream.demo import generate_traffic
from meterstream.producers import MeterClient

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PLANS = ROOT / "examples" / "plans.yaml"
NOW = datetime.now(timezone.utc)
PERIOD = NOW.strftime("%Y-%m")
CUSTOMERS = ["acme", "globex", "initech", "tenant-001"]  # growth, enterprise, starter+grant, default plan


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterstream.cli", *args],
        env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def _exact(value):
    """JSON numbers-as-strings compared by value: ClickHouse sums carry Decimal(38, 18) scale."""
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exact(v) for v in value]
    if isinstance(value, str):
        try:
            return Decimal(value)
        except ArithmeticError:
            return value
    return value


def _comparable(invoice: dict) -> dict:
    return _exact({k: v for k, v in invoice.items() if k != "as_of"})


@pytest.fixture(scope="module")
def billed(tmp_path_factory, base_settings, clickhouse_server_dsn):
    """One pipeline that has rated a realistic month for four customers, and the same events on disk."""
    from tests.system.conftest import Pipeline

    root = tmp_path_factory.mktemp("billing")
    pipeline = Pipeline(base_settings, root, clickhouse_server_dsn, budgets=None)
    pipeline.env["METERSTREAM_WORKER__PLANS_FILE"] = str(PLANS)
    pipeline.worker.env["METERSTREAM_WORKER__PLANS_FILE"] = str(PLANS)
    pipeline.start()
    traffic = generate_traffic(CUSTOMERS, 4000, seed=11, now=NOW)
    events = [*traffic.usage, *traffic.outcomes]
    events_file = root / "events.jsonl"
    events_file.write_text("".join(e.model_dump_json(exclude_none=True) + "\n" for e in events))
    with MeterClient(pipeline.kafka) as meter:
        for event in [*events, *traffic.duplicates]:
            meter.record(event)
    pipeline.wait_processed(len(events) + len(traffic.duplicates))
    yield pipeline, events_file
    pipeline.stop()


def test_stream_invoices_equal_offline_rating_of_the_same_events(billed):
    pipeline, events_file = billed
    offline = _cli(pipeline.env, "rate", "--plan", str(PLANS), "--events", str(events_file), "--period", PERIOD)
    assert offline.returncode == 0, offline.stderr
    expected = {inv["customer_id"]: inv for inv in json.loads(offline.stdout)}
    assert set(expected) == set(CUSTOMERS)
    for customer in CUSTOMERS:
        result = _cli(pipeline.env, "invoice", "--customer", customer, "--period", PERIOD, "--json")
        assert result.returncode == 0, result.stderr
        stored = json.loads(result.stdout)  # one customer and period: an object
        assert _comparable(stored) == _comparable(expected[customer])
        assert Decimal(stored["total"]) == sum(Decimal(line["amount"]) for line in stored["lines"])
    assert expected["globex"]["plan_id"] == "enterprise"
    assert any(line["kind"] == "commitment_true_up" for line in expected["globex"]["lines"])
    assert expected["acme"]["status"] == "preview"  # the period is still open


def test_invoice_prints_a_readable_invoice(billed):
    pipeline, _ = billed
    result = _cli(pipeline.env, "invoice", "--customer", "acme", "--period", PERIOD)
    assert result.returncode == 0, result.stderr
    assert "acme" in result.stdout and "Base fee" in result.stdout and "Total" in result.stdout


def test_rerate_reports_old_and_new_totals_without_changing_what_is_stored(billed, tmp_path):
    pipeline, events_file = billed
    cheaper = PLANS.read_text().replace('base_fee: "500"', 'base_fee: "450"')
    assert cheaper != PLANS.read_text()
    new_plans = tmp_path / "plans-new.yaml"
    new_plans.write_text(cheaper)
    before = _cli(pipeline.env, "invoice", "--customer", "acme", "--period", PERIOD, "--json")
    result = _cli(pipeline.env, "rerate", "--plans", str(new_plans), "--period", PERIOD, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["customer_id"]: row for row in json.loads(result.stdout)}
    assert Decimal(rows["acme"]["difference"]) == Decimal("-50.00")
    assert Decimal(rows["globex"]["difference"]) == 0
    offline_new = _cli(pipeline.env, "rate", "--plan", str(new_plans), "--events", str(events_file), "--period", PERIOD)
    new_totals = {inv["customer_id"]: Decimal(inv["total"]) for inv in json.loads(offline_new.stdout)}
    assert {c: Decimal(r["new_total"]) for c, r in rows.items()} == new_totals
    after = _cli(pipeline.env, "invoice", "--customer", "acme", "--period", PERIOD, "--json")
    assert _comparable(json.loads(after.stdout)) == _comparable(json.loads(before.stdout))


def test_margin_revenue_adds_up_to_the_invoices(billed):
    pipeline, _ = billed
    invoices = {}
    for customer in CUSTOMERS:
        result = _cli(pipeline.env, "invoice", "--customer", customer, "--period", PERIOD, "--json")
        invoices[customer] = json.loads(result.stdout)
    by_customer = _cli(pipeline.env, "margin", "--period", PERIOD, "--by", "customer", "--json")
    assert by_customer.returncode == 0, by_customer.stderr
    rows = {row["customer"]: row for row in json.loads(by_customer.stdout)}
    for customer, inv in invoices.items():
        assert Decimal(rows[customer]["revenue"]) == Decimal(inv["total"])
        assert Decimal(rows[customer]["cost_to_serve"]) == Decimal(inv["usage"]["cost_to_serve"])
    by_model = json.loads(_cli(pipeline.env, "margin", "--period", PERIOD, "--by", "model", "--json").stdout)
    assert sum(Decimal(r["revenue"]) for r in by_model) == pytest.approx(
        sum(Decimal(i["total"]) for i in invoices.values()), abs=Decimal("0.05")
    )
    assert {r["model"] for r in by_model} >= {"gpt-4o", "gpt-4o-mini"}
