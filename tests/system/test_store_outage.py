"""A store outage with real processes: the ClickHouse server stopped (SIGTERM) or killed (SIGKILL)
while events flow, and restarted ~20 s later. The worker holds its offsets, retries with backoff,
shows it in /stats/ and its log, and catches up: nothing lost, nothing counted twice, each
threshold alerted once, `meterstream reconcile` exits 0. A worker started while the store is
down waits (bounded) instead of crashing. Every wait is bounded.

Each test has a private server (meterstream.services.clickhouse on free ports), so stopping it
disturbs no other test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from meterstream.budgets import BudgetBook, thresholds_to_alert
from meterstream.pricing.plans import load_catalog
from meterstream.producers import MeterClient
from meterstream.schemas.events import UsageEvent
from meterstream.storage.queries import run_saved_query
from meterstream.stream_processors.runner import WorkerProcess, WorkerProcessError
from tests.servers import private_clickhouse
from tests.system.conftest import Pipeline

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.now(timezone.utc)
PERIOD = NOW.strftime("%Y-%m")
CUSTOMERS = [f"out-{i}" for i in range(10)]
BUDGETS = "customers:\n" + "".join(
    f'  {c}: {{monthly_credits: "{200 + 60 * i}", thresholds: [25, 50, 75, 100]}}\n' for i, c in enumerate(CUSTOMERS)
)
OUTAGE_SECONDS = 20.0


def _events(count: int) -> list[UsageEvent]:
    return [
        UsageEvent(
            event_id=f"o{i}", customer_id=CUSTOMERS[(i * 3) % len(CUSTOMERS)], occurred_at=NOW - timedelta(seconds=i % 600),
            model=("gpt-4o", "gpt-4o-mini")[i % 2], input_tokens=400 + i % 700, output_tokens=40 + i % 200,
        )  # fmt: skip
        for i in range(count)
    ]


class Producer(threading.Thread):
    """Sends events at a steady rate, counting what was sent when."""

    def __init__(self, pipeline: Pipeline, events: list[UsageEvent], rate: float) -> None:
        super().__init__(daemon=True)
        self.pipeline, self.events, self.rate = pipeline, events, rate
        self.sent = 0
        self.failed = 0

    def run(self) -> None:
        started = time.monotonic()
        with MeterClient(self.pipeline.kafka) as meter:
            for i, event in enumerate(self.events):
                meter.record(event)
                self.sent = i + 1
                pause = started + (i + 1) / self.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        self.failed = meter.failed


def _stats(worker: WorkerProcess) -> dict:
    try:
        return worker.stats(timeout=2)
    except Exception:
        return {}


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_store_outage_while_events_flow_worker_retries_and_catches_up_exactly(base_settings, tmp_path, how):
    with private_clickhouse(tmp_path / "ch") as (server, dsn):
        (tmp_path / "p").mkdir()
        # The worker process collects garbage itself (take_over_garbage_collection): often, here. Its
        # settings go in at construction (the worker process copies the environment then).
        pipeline = Pipeline(base_settings, tmp_path / "p", dsn, BUDGETS, env={
            "METERSTREAM_WORKER__GC_COLLECT_SECONDS": "2", "METERSTREAM_CLICKHOUSE__RETRY_BACKOFF_MAX": "2"})  # fmt: skip
        try:
            pipeline.start()
            events = _events(9_000)
            producer = Producer(pipeline, events, rate=200.0)  # 45 s of traffic
            producer.start()
            deadline = time.monotonic() + 60
            while _stats(pipeline.worker).get("messages", 0) < 1_000:
                assert time.monotonic() < deadline, "the worker made no progress"
                time.sleep(0.2)

            sent_at_stop = producer.sent
            stopped_at = time.monotonic()
            if how == "SIGTERM":
                assert server.down() is True
            else:
                os.kill(server.status().pid, signal.SIGKILL)
            seen_unavailable, lag_peak = False, 0
            while time.monotonic() - stopped_at < OUTAGE_SECONDS:
                stats = _stats(pipeline.worker)
                assert stats, "the worker must keep running (and answering /stats/) while the store is down"
                seen_unavailable |= stats["store"] == "unavailable" and stats["store_retries"] > 0
                lag_peak = max(lag_peak, producer.sent - stats["messages"])
                time.sleep(0.5)
            assert seen_unavailable, "the outage must show in /stats/"
            sent_during_outage = producer.sent - sent_at_stop
            server.up()
            restarted_at = time.monotonic()
            producer.join(120)
            assert not producer.is_alive() and producer.failed == 0
            deadline = time.monotonic() + 180
            while (stats := _stats(pipeline.worker)).get("messages", 0) < len(events):
                assert time.monotonic() < deadline, f"the worker did not catch up: {stats}"
                lag_peak = max(lag_peak, producer.sent - stats.get("messages", 0))
                time.sleep(0.2)
            caught_up = time.monotonic() - restarted_at
            assert stats["store"] == "ok"
            assert stats["gc"]["automatic"] is False and stats["gc"]["collections"] >= 5, stats["gc"]
            # Sequential stages, each timed: neither can have been busy for longer than the worker ran.
            busy = stats["busy_seconds"]
            assert 0 < busy["rate"] <= stats["uptime_seconds"] and 0 < busy["store"] <= stats["uptime_seconds"], stats

            catalog = load_catalog()
            expected: dict[str, Decimal] = {}
            for event in events:
                expected[event.customer_id] = expected.get(event.customer_id, Decimal(0)) + catalog.rate(event).credits
            stored = {r["customer_id"]: r for r in run_saved_query(pipeline.clickhouse, "month_to_date", period=PERIOD,
                                                                   customer="").dicts()}  # fmt: skip
            assert {c: stored[c]["usage_credits"] + stored[c]["outcome_credits"] for c in expected} == expected
            assert sum(stored[c]["events"] for c in expected) == len(events)

            budgets = BudgetBook.model_validate(yaml.safe_load(BUDGETS))
            expected_alerts = Counter((c, t) for c, credits in expected.items()
                                      for t in thresholds_to_alert(credits, budgets.for_customer(c), frozenset()))  # fmt: skip
            messages = pipeline.read_topic(pipeline.topics.budget_alerts.name, sum(expected_alerts.values()))
            alerts = Counter((a["customer_id"], a["threshold_percent"]) for a in (json.loads(m.value()) for m in messages))
            assert alerts == expected_alerts

            log = pipeline.worker.log_path.read_text(errors="replace")
            assert "retrying in" in log and "offsets held" in log and "available again" in log
            time.sleep(2)  # one commit interval: reconcile reads the group's committed offsets too
            env = {**pipeline.worker.env, "COLUMNS": "200"}
            reconciled = subprocess.run([sys.executable, "-m", "meterstream.cli", "reconcile", "--period", PERIOD],
                                        env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)  # fmt: skip
            assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
            print(f"\noutage ({how}): {len(events)} events at 200/s, {sent_during_outage} produced during the "
                  f"{OUTAGE_SECONDS:.0f} s outage, lag peak {lag_peak} messages, caught up {caught_up:.1f} s after "
                  f"the restart, {stats['store_retries']} store retries, {sum(alerts.values())} alerts once")
        finally:
            pipeline.stop()


def test_a_worker_started_while_the_store_is_down_waits_then_runs(base_settings, tmp_path):
    with private_clickhouse(tmp_path / "ch") as (server, dsn):
        (tmp_path / "p").mkdir()
        pipeline = Pipeline(base_settings, tmp_path / "p", dsn, None)
        server.down()
        try:
            # Launched by hand (not WorkerProcess.start) so that the wait can be observed.
            pipeline.worker.log_path.parent.mkdir(parents=True, exist_ok=True)
            with pipeline.worker.log_path.open("ab") as log:
                pipeline.worker.process = subprocess.Popen(
                    [sys.executable, "-m", "meterstream.cli", "worker"], env=pipeline.worker.env, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            deadline = time.monotonic() + 60
            while "waiting for ClickHouse at http://127.0.0.1:" not in pipeline.worker.log_path.read_text(errors="replace"):
                assert pipeline.worker.process.poll() is None, pipeline.worker.log_tail()
                assert time.monotonic() < deadline, pipeline.worker.log_tail()
                time.sleep(0.2)
            server.up()
            pipeline.worker.wait_ready(120)  # it connected once the server was back
        finally:
            pipeline.stop()

        # Bounded: with the store still down after START_WAIT_SECONDS, it exits and says why.
        server.down()
        env = {**pipeline.worker.env, "METERSTREAM_CLICKHOUSE__START_WAIT_SECONDS": "3"}
        gave_up = subprocess.run([sys.executable, "-m", "meterstream.cli", "worker"], env=env, capture_output=True,
                                 text=True, timeout=120, cwd=ROOT)  # fmt: skip
        assert gave_up.returncode != 0
        assert "still unavailable after 3 s" in " ".join(gave_up.stderr.split())


def test_a_wrong_password_stops_the_worker_at_once_with_a_clear_message(base_settings, tmp_path):
    with private_clickhouse(tmp_path / "ch") as (server, dsn):
        (tmp_path / "p").mkdir()
        pipeline = Pipeline(base_settings, tmp_path / "p", dsn.replace(":meterstream@", ":s3cr3t-wr0ng@"), None)
        started = time.monotonic()
        with pytest.raises(WorkerProcessError) as stopped:
            pipeline.start()
        assert time.monotonic() - started < 60  # no waiting for a password to fix itself
        message = " ".join(str(stopped.value).split())
        assert "refused the credentials or grants" in message
        assert "s3cr3t-wr0ng" not in pipeline.worker.log_path.read_text(errors="replace")  # the secret is never logged
        pipeline.stop()
