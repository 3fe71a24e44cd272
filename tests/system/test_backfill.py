"""meterstream import on the real broker and engine: docs/backfill.md's worked example, dedupe, per-line errors.

examples/backfill/ holds 160 events of 2026-08..2026-10: periods closed at any date this
test can run on (each closes 3 days after its month ends), so the late-usage rule applies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Consumer, TopicPartition

from meterstream.clock import current_period
from meterstream.producers import MeterClient

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "backfill" / "events.jsonl"
T = datetime(2026, 9, 14, 9, 30, tzinfo=timezone.utc)


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "meterstream.cli", *args], env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip


def _topic_size(pipeline, topic: str) -> int:
    consumer = Consumer({**pipeline.kafka.confluent_config(), "group.id": "sizer"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    finally:
        consumer.close()


def _stored(pipeline, period: str) -> dict[str, dict]:
    result = _cli(pipeline.env, "usage", "--period", period, "--json", "--no-spend")
    assert result.returncode == 0, result.stderr
    return {row["customer_id"]: row for row in json.loads(result.stdout)}


def test_worked_example_dry_run_then_import(pipeline_factory, tmp_path):
    pipeline = pipeline_factory()
    dry = _cli(pipeline.env, "import", str(EXAMPLE), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["records"] == 160 and plan["would_send"] == 160 and plan["already_stored"] == 0
    assert plan["closed_periods"] == ["2026-08", "2026-09", "2026-10"]
    assert all(g["late"] for g in plan["by_customer_period"])
    # the dry run sent nothing
    assert _topic_size(pipeline, pipeline.topics.usage.name) == 0
    assert _topic_size(pipeline, pipeline.topics.outcomes.name) == 0

    # the same events as CSV and as Parquet price the same
    csv_plan = json.loads(_cli(pipeline.env, "import", str(EXAMPLE.with_suffix(".csv")), "--dry-run", "--json").stdout)
    assert csv_plan["by_customer_period"] == plan["by_customer_period"]
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    columns = sorted({k for row in rows for k in row})
    for row in rows:
        row["attributes"] = json.dumps(row["attributes"]) if "attributes" in row else None
        for column in columns:
            row.setdefault(column, None)
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    pq_plan = json.loads(_cli(pipeline.env, "import", str(parquet), "--dry-run", "--json").stdout)
    assert pq_plan["by_customer_period"] == plan["by_customer_period"]

    # the table form, as docs/backfill.md shows it
    table = _cli(pipeline.env, "import", str(EXAMPLE), "--dry-run")
    assert table.returncode == 0 and "would be sent" in table.stdout

    before = current_period()  # the open period the worker bills late usage in (its clock)
    sent = _cli(pipeline.env, "import", str(EXAMPLE), "--json")
    assert sent.returncode == 0, sent.stderr
    report = json.loads(sent.stdout)
    assert report["sent"] == report["delivered"] == 160 and report["failed"] == 0
    # the speed reported is the whole import's, not the send's alone
    assert set(report["seconds_by_pass"]) == {"validate", "stored_ids", "send"}
    assert report["seconds"] >= sum(report["seconds_by_pass"].values()) - 0.002
    assert abs(report["events_per_second"] - 160 / report["seconds"]) <= 1
    pipeline.wait_processed(160)
    open_periods = sorted({before, current_period()})  # two only if a month turned meanwhile

    # what is stored is what the dry run priced, per customer and period, to the last digit
    for period in ("2026-08", "2026-09", "2026-10"):
        stored = _stored(pipeline, period)
        for group in (g for g in plan["by_customer_period"] if g["period"] == period):
            row = stored[group["customer_id"]]
            assert Decimal(str(row["usage_credits"])) == Decimal(group["usage_credits"])
            assert Decimal(str(row["outcome_credits"])) == Decimal(group["outcome_credits"])
            assert Decimal(str(row["cost_to_serve"])) == Decimal(group["cost_to_serve"])
            assert int(row["events"]) == group["events"]

    # closed periods are not rewritten: each invoice as issued has none of the backfilled usage
    for period in ("2026-08", "2026-09", "2026-10"):
        issued = _cli(pipeline.env, "invoice", "--customer", "acme", "--period", period, "--json")
        assert issued.returncode == 0, issued.stderr
        assert Decimal(json.loads(issued.stdout)["usage"]["credits_used"]) == 0  # one customer: one object
    # ...the open invoice carries it as flagged late adjustments
    late = []
    for period in open_periods:
        invoice = _cli(pipeline.env, "invoice", "--customer", "acme", "--period", period, "--json")
        assert invoice.returncode == 0, invoice.stderr
        late += [line for line in json.loads(invoice.stdout)["lines"] if line["kind"] == "late_adjustment"]
    assert {p for p in ("2026-08", "2026-09", "2026-10") if any(p in line["description"] for line in late)} == {
        "2026-08", "2026-09", "2026-10"}  # fmt: skip

    # importing the same file again sends nothing: everything is stored
    again = _cli(pipeline.env, "import", str(EXAMPLE), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sent"] == 0 and json.loads(again.stdout)["already_stored"] == 160


def test_dedupe_against_the_store_and_errors_per_line(pipeline_factory, tmp_path):
    pipeline = pipeline_factory()
    with MeterClient(pipeline.kafka) as meter:
        for i in range(2):
            meter.record_llm_call("acme", "gpt-4o", input_tokens=1000, output_tokens=100, occurred_at=T,
                                  event_id=f"live-{i}")  # fmt: skip
    pipeline.wait_processed(2)

    def line(event_id, **extra):
        event = {"event_id": event_id, "customer_id": "acme", "occurred_at": "2026-09-14T09:30:00Z",
                 "model": "gpt-4o", "input_tokens": 1000, "output_tokens": 100, **extra}  # fmt: skip
        return json.dumps(event)

    path = tmp_path / "history.jsonl"
    path.write_text("\n".join([
        line("live-0"), line("live-1"),                    # stored already
        line("old-0"), line("old-1"),
        line("old-1"),                                     # repeated in the file
        line("old-2", output_tokens=-5),                   # line 6: invalid
        line("old-3"),
    ]) + "\n")  # fmt: skip

    refused = _cli(pipeline.env, "import", str(path), "--no-progress")
    assert refused.returncode == 2
    assert f"{path}:6: output_tokens:" in refused.stderr.replace("\n", "")
    assert "nothing sent" in refused.stderr
    assert _topic_size(pipeline, pipeline.topics.usage.name) == 2  # only the live events

    done = _cli(pipeline.env, "import", str(path), "--skip-invalid", "--json")
    assert done.returncode == 2, done.stderr  # sent, but the file had an invalid record
    report = json.loads(done.stdout)
    assert (report["sent"], report["already_stored"], report["repeated_in_file"], report["invalid"]) == (3, 2, 1, 1)
    pipeline.wait_processed(3)
    assert _topic_size(pipeline, pipeline.topics.usage.name) == 5
    assert int(_stored(pipeline, "2026-09")["acme"]["events"]) == 5
