"""`meterstream dlq` and `meterstream reconcile` on a real worker, broker and store.

Nothing lost, nothing counted twice: malformed messages are listed with their
reasons, a replayed dead letter is rated once however often it is replayed, and
reconcile agrees with the store until an event reaches Kafka that the (stopped)
worker never stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Producer

from meterstream.producers import MeterClient
from meterstream.schemas.events import Attribution, OutcomeEvent, UsageEvent
from meterstream.schemas.records import DeadLetter
from meterstream.storage.queries import run_saved_query

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.now(timezone.utc)
PERIOD = NOW.strftime("%Y-%m")

MALFORMED = {
    "invalid json": b"{not json",
    "invalid utf-8": b'{"event_id": "\xff\xfe", "customer_id": "x"}',
    "string token count": (
        b'{"event_id":"bad-2","customer_id":"ops-a","occurred_at":"2026-11-01T00:00:00Z","model":"gpt-4o",'
        b'"input_tokens":"12"}'
    ),
}


def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterstream.cli", *args],
        env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def _usage(customer: str, i: int) -> UsageEvent:
    return UsageEvent(
        event_id=f"{customer}-{i}", customer_id=customer, occurred_at=NOW - timedelta(seconds=i),
        model=["gpt-4o", "gpt-4o-mini"][i % 2], input_tokens=100 + 7 * i, output_tokens=10 + i,
    )  # fmt: skip


def _stored(pipeline, customer: str) -> dict:
    rows = run_saved_query(pipeline.clickhouse, "month_to_date", period=PERIOD, customer=customer).dicts()
    return rows[0] if rows else {"events": 0}


def _json(result: subprocess.CompletedProcess[str]):
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def test_dead_letters_replay_and_reconcile(pipeline_factory):
    pipeline = pipeline_factory()
    env = pipeline.env
    good = [_usage("ops-a", i) for i in range(12)] + [_usage("ops-b", i) for i in range(8)]
    outcome = OutcomeEvent(
        event_id="ops-b-outcome", customer_id="ops-b", occurred_at=NOW, outcome_type="resolved_ticket",
        attribution=Attribution.AI_ONLY,
    )  # fmt: skip
    with MeterClient(pipeline.kafka) as meter:
        for event in [*good, outcome]:
            meter.record(event)
    pipeline.produce_raw(pipeline.topics.usage.name, list(MALFORMED.values()))
    stats = pipeline.wait_processed(len(good) + 1 + len(MALFORMED))
    assert stats["dead_letters"] == len(MALFORMED)

    # dlq list: every malformed message, with its source and reason.
    listed = _json(_cli(env, "dlq", "list", "--json"))
    assert len(listed) == len(MALFORMED)
    assert all(row["source_topic"] == pipeline.topics.usage.name for row in listed)
    assert sorted(row["size"] for row in listed) == sorted(len(raw) for raw in MALFORMED.values())
    reasons = " | ".join(row["reason"] for row in listed)
    assert "input_tokens" in reasons and "invalid event" in reasons
    assert len(_json(_cli(env, "dlq", "list", "--json", "--limit", "2"))) == 2
    table = _cli(env, "dlq", "list")
    assert table.returncode == 0 and "input_tokens" in table.stdout

    # dlq show: UTF-8 raw bytes as text, others as hex.
    by_size = {row["size"]: row for row in listed}
    text_row = by_size[len(MALFORMED["invalid json"])]
    shown = _cli(env, "dlq", "show", str(text_row["offset"]), "--partition", str(text_row["partition"]))
    assert shown.returncode == 0, shown.stderr
    assert "{not json" in shown.stdout
    binary_row = by_size[len(MALFORMED["invalid utf-8"])]
    shown = _json(_cli(env, "dlq", "show", f"{binary_row['partition']}:{binary_row['offset']}", "--json"))
    assert shown["raw_text"] is None and bytes.fromhex(shown["raw_hex"]) == MALFORMED["invalid utf-8"]
    missing = _cli(env, "dlq", "show", "0:99999")
    assert missing.returncode != 0 and "no dead letter" in missing.stderr

    # Everything agrees so far.
    agreed = _cli(env, "reconcile", "--period", PERIOD)
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    assert "reconciled" in agreed.stdout and "NOT" not in agreed.stdout
    report = _json(_cli(env, "reconcile", "--period", PERIOD, "--json"))
    assert report["reconciled"] is True
    assert report["kafka"]["events"] == len(good) + 1 == report["store"]["rated_rows"] == report["store"]["raw_events"]
    assert report["kafka"]["invalid"] == len(MALFORMED) and report["kafka"]["dead_letters"] == len(MALFORMED)
    assert report["store"]["customers"] == 2 and Decimal(report["kafka"]["usage_and_outcome_credits"]) == Decimal(report["store"]["usage_and_outcome_credits"])

    # A dead letter whose raw bytes are a valid event (as if rejected before a price fix).
    fixed = _usage("ops-c", 1)
    letter = DeadLetter(
        reason="no price for model 'gpt-4o' (before the fix)", raw=fixed.model_dump_json().encode(),
        source_topic=pipeline.topics.usage.name, source_partition=0, source_offset=0, rejected_at=NOW,
    )  # fmt: skip
    producer = Producer(pipeline.kafka.producer_config())
    producer.produce(pipeline.topics.dead_letter.name, key=b"ops-c", value=letter.model_dump_json().encode())
    assert producer.flush(30) == 0
    listed = _json(_cli(env, "dlq", "list", "--json"))
    [row] = [r for r in listed if r["key"] == "ops-c"]
    ref = f"{row['partition']}:{row['offset']}"

    dry = _json(_cli(env, "dlq", "replay", "--offset", ref, "--dry-run", "--json"))
    assert dry["dry_run"] is True and len(dry["replayed"]) == 1 and dry["replayed"][0]["to_offset"] is None
    assert _cli(env, "dlq", "replay").returncode != 0  # neither --offset nor --all

    for attempt in range(2):  # replaying twice still bills the event once
        replayed = _json(_cli(env, "dlq", "replay", "--offset", ref, "--json"))
        assert len(replayed["replayed"]) == 1 and not replayed["skipped"]
        assert replayed["replayed"][0]["to_topic"] == pipeline.topics.usage.name
        assert replayed["replayed"][0]["key"] == "ops-c" and replayed["replayed"][0]["to_offset"] >= 0
        stats = pipeline.wait_processed(1)
        assert _stored(pipeline, "ops-c")["events"] == 1, attempt
    assert stats["duplicates"] >= 1 and stats["dead_letters"] == len(MALFORMED)

    report = _json(_cli(env, "reconcile", "--period", PERIOD, "--json"))
    assert report["reconciled"] is True, report
    assert report["kafka"]["events"] == len(good) + 2 and report["kafka"]["duplicates"] >= 1
    assert report["kafka"]["dead_letters"] == len(MALFORMED) + 1

    # An event reaches Kafka while the worker is stopped: missing in the store.
    pipeline.worker.stop()
    late = _usage("ops-a", 99)
    with MeterClient(pipeline.kafka) as meter:
        meter.record(late)
    differs = _cli(env, "reconcile", "--period", PERIOD)
    assert differs.returncode == 1, differs.stdout + differs.stderr
    assert "NOT reconciled" in differs.stdout and late.event_id in differs.stdout
    report = _json(_cli(env, "reconcile", "--period", PERIOD, "--json"))
    assert report["reconciled"] is False
    assert report["missing_in_store"] == [{"customer_id": "ops-a", "event_id": late.event_id}]
    assert report["extra_in_store"] == []
    assert [m["customer_id"] for m in report["credit_mismatches"]] == ["ops-a"]


def test_reconcile_rejects_a_bad_period(pipeline_factory):
    pipeline = pipeline_factory(start=False)
    result = _cli(pipeline.env, "reconcile", "--period", "2026-13")
    assert result.returncode == 2 and "--period" in result.stderr


def test_reconcile_accounts_for_every_committed_offset_and_reports_a_stuck_group(pipeline_factory):
    pipeline = pipeline_factory()
    env = {**pipeline.env, "METERSTREAM_WORKER__COMMIT_INTERVAL": "0.1"}
    good = [_usage("acct", i) for i in range(10)]
    with MeterClient(pipeline.kafka) as meter:
        for event in [*good, *good[:3]]:  # three resent
            meter.record(event)
    pipeline.produce_raw(pipeline.topics.usage.name, list(MALFORMED.values()))
    # Dated 1 minute ago but stamped by its producer 10 minutes ago: more than 5 minutes in the
    # future of its broker timestamp. Dead-lettered, and still so for reconcile, whenever it runs.
    sent_at = datetime.now(timezone.utc)
    skewed = _usage("acct", 50).model_copy(update={"occurred_at": sent_at}).model_dump_json().encode()
    stamp = int((sent_at - timedelta(minutes=10)).timestamp() * 1000)
    producer = Producer(pipeline.kafka.producer_config())
    producer.produce(pipeline.topics.usage.name, key=b"acct", value=skewed, timestamp=stamp)
    assert producer.flush(30) == 0
    total = len(good) + 3 + len(MALFORMED) + 1
    stats = pipeline.wait_processed(total)
    assert stats["dead_letters"] == len(MALFORMED) + 1
    pipeline.worker.stop()  # its final commit covers everything

    report = _json(_cli(env, "reconcile", "--period", PERIOD, "--json"))
    assert report["reconciled"] is True, report
    acct = report["kafka"]["committed_accounting"]
    assert acct["committed"] == total == acct["stored"] + acct["duplicates"] + acct["dead_lettered"]
    assert (acct["stored"], acct["duplicates"], acct["dead_lettered"]) == (10, 3, len(MALFORMED) + 1)
    assert report["kafka"]["unaccounted"] == [] and report["kafka"]["stuck"] == []

    # Messages wait with the worker stopped: lag, then, past --stuck-after with no commit, stuck.
    with MeterClient(pipeline.kafka) as meter:
        meter.record(_usage("acct", 60))
    time.sleep(8)
    stuck = _cli(env, "reconcile", "--period", PERIOD, "--stuck-after", "0.1")
    assert stuck.returncode == 1, stuck.stdout + stuck.stderr
    assert "stuck:" in stuck.stdout and "stopped at offset" in stuck.stdout
    report = _json(_cli(env, "reconcile", "--period", PERIOD, "--json"))  # 5 minutes: lag only
    assert report["kafka"]["stuck"] == [] and report["kafka"]["committed_accounting"]["uncommitted"] == 1
