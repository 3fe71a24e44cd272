"""Late events: kept in their own period, never rewriting a closed invoice, billed as a flagged adjustment.

The worker runs with a grace of 0 s, so every earlier month is closed. Events
that occurred in the previous month are stored in that month and marked
billed on this month's invoice; the previous month's invoice stays as issued
and this month's carries a late_adjustment line equal to the difference the
late usage makes to the previous month's invoice (computed offline with
`meterstream rate` on the same events, to the cent).

The plan has one version, in effect since 2000, so the figures do not depend on
which month the test's clock is in (``make test-clock`` runs it at month
boundaries).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from meterstream.clock import current_period, utc_now
from meterstream.producers import MeterClient

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]

#: acme on one plan version whatever the month: 40,000 credits included, overage from the first credit beyond.
#: The four late events (4 x 20M input tokens x 0.6 credits per 1K = 48,000 credits) reach 8,000 into overage.
PLANS_YAML = """
currency: USD
default_plan: growth
plans:
  growth:
    versions:
      - version: "growth-test"
        effective_from: "2000-01-01"
        price_book: default
        base_fee: "500"
        included_credits: "40000"
        overage:
          model: graduated
          tiers:
            - {up_to: "100000", unit_price: "0.012"}
            - {up_to: null, unit_price: "0.010"}
        credit_value: "0.01"
customers:
  acme:
    plan: growth
"""


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "meterstream.cli", *args], env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip


@pytest.mark.clock
def test_late_usage_of_a_closed_period_is_a_flagged_adjustment_on_the_next_invoice(pipeline_factory, tmp_path):
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS_YAML)
    pipeline = pipeline_factory(start=False)
    pipeline.env["METERSTREAM_WORKER__PLANS_FILE"] = str(plans)
    pipeline.env["METERSTREAM_WORKER__LATE_GRACE_SECONDS"] = "0"
    pipeline.worker.env.update(
        {"METERSTREAM_WORKER__PLANS_FILE": str(plans), "METERSTREAM_WORKER__LATE_GRACE_SECONDS": "0"}
    )
    pipeline.start()
    # Read once the worker runs, so both sides of the test are in the same month. "Late" events
    # occurred three days before the 1st of this month: in last month, which is closed.
    now = utc_now()
    this_month = current_period(lambda: now)
    last_month_day = now.replace(day=1) - timedelta(days=3)
    last_month = current_period(lambda: last_month_day)

    with MeterClient(pipeline.kafka) as meter:
        # acme is on the growth plan: 50,000 credits included, so push it into overage.
        on_time = [meter.record_llm_call("acme", "claude-sonnet-4-5", input_tokens=2_000_000, output_tokens=0,
                                         occurred_at=now, event_id=f"now-{i}")
                   for i in range(5)]  # fmt: skip
        late = [meter.record_llm_call("acme", "claude-sonnet-4-5", input_tokens=20_000_000, output_tokens=0,
                                      occurred_at=last_month_day + timedelta(minutes=i), event_id=f"late-{i}")
                for i in range(4)]  # fmt: skip
    pipeline.wait_processed(len(on_time) + len(late))

    issued = json.loads(_cli(pipeline.env, "invoice", "--customer", "acme", "--period", last_month, "--json").stdout)
    current = _cli(pipeline.env, "invoice", "--customer", "acme", "--period", this_month, "--json")
    assert current.returncode == 0, current.stderr
    invoice = json.loads(current.stdout)
    [adjustment] = [line for line in invoice["lines"] if line["kind"] == "late_adjustment"]
    assert last_month in adjustment["description"] and Decimal(adjustment["quantity"]) == 4

    # The closed month as issued had none of the late usage.
    assert Decimal(issued["usage"]["credits_used"]) == 0
    # What the late usage adds to the closed month, by that month's rules: the offline rating of the
    # late events for that month, minus the invoice as issued.
    events_file = tmp_path / "late.jsonl"
    events_file.write_text("".join(e.model_dump_json(exclude_none=True) + "\n" for e in late))
    offline = _cli(pipeline.env, "rate", "--plan", str(plans), "--events", str(events_file), "--period", last_month)
    assert offline.returncode == 0, offline.stderr
    revised = Decimal(json.loads(offline.stdout)[0]["total"])
    assert Decimal(adjustment["amount"]) == revised - Decimal(issued["total"])
    assert Decimal(adjustment["amount"]) > 0
    assert Decimal(invoice["total"]) == sum(Decimal(line["amount"]) for line in invoice["lines"])

    # Usage reports still show the late events where they happened.
    usage = json.loads(_cli(pipeline.env, "usage", "--period", last_month, "--customer", "acme", "--json",
                            "--no-spend").stdout)  # fmt: skip
    assert usage[0]["events"] == 4
