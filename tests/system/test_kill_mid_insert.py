"""Issue 15, point 4: a worker SIGKILLed mid-write, repeatedly, leaves no table or view short or doubled.

A real worker on the real broker writes into its own database on the shared ClickHouse
server. With ``METERSTREAM_TEST_PAUSE_AFTER_INSERT`` the worker holds each batch's write
after each table's insert and says so in its log; the test SIGKILLs it there, alternately
after ``events_raw`` (usage_rated and its views not yet written) and after ``usage_rated``
(budget_alerts not yet written, nothing committed), then at random moments without the
pause (mid-insert, mid-commit, mid-rating), restarting it each time. Nothing is detached
or repaired by hand: each restart writes again, from usage_rated's own rows and with their
deduplication tokens, the batches stored past the committed offsets
(meterstream/storage/batches.py), and skips the raw rows events_raw already holds.

Then every table and view is checked against the events sent, physically (``count()``
without FINAL, merges stopped for the test, so a doubled block would show) and against
``usage_rated FINAL``:
events_raw, usage_rated, usage_recent, usage_hourly, usage_daily, usage_day_counts, and
after a settle run usage_settled / usage_settled_days through the invoice queries.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import yaml

from meterstream.budgets import BudgetBook, thresholds_to_alert
from meterstream.clock import utc_now
from meterstream.pricing.plans import load_catalog
from meterstream.producers import MeterClient
from meterstream.schemas.events import UsageEvent
from meterstream.storage.clickhouse import open_store
from meterstream.storage.settle import settle
from meterstream.stream_processors.runner import WorkerProcess
from tests.servers import private_clickhouse
from tests.store.test_settled_usage import _same_as_final
from tests.system.conftest import Pipeline

pytestmark = pytest.mark.system

CUSTOMERS = [f"kill-{i}" for i in range(8)]
BUDGETS = "customers:\n" + "".join(
    f'  {c}: {{monthly_credits: "{60 + 40 * i}", thresholds: [25, 50, 75]}}\n' for i, c in enumerate(CUSTOMERS)
)
EVENTS = 4_000
RESENT = 300
PAUSED_KILLS = 8
RANDOM_KILLS = 4
RECOVERED = "stored past the committed offsets"
#: Every table a batch's write reaches (directly or through a materialised view).
TABLES = ("events_raw", "usage_rated", "usage_hourly", "usage_daily", "usage_recent", "usage_day_counts", "budget_alerts")


def _events(now: datetime) -> list[UsageEvent]:
    # ~41 hours back: many hours and three days, so every rollup group and day partition is exercised.
    return [
        UsageEvent(
            event_id=f"e{i}", customer_id=CUSTOMERS[(i * 5) % len(CUSTOMERS)], occurred_at=now - timedelta(seconds=37 * i),
            model=("gpt-4o", "gpt-4o-mini", "claude-haiku-4-5")[i % 3], input_tokens=400 + i % 700,
            cached_input_tokens=(i % 4) * 50, output_tokens=30 + i % 250,
        )  # fmt: skip
        for i in range(EVENTS)
    ]


def _send_with_resends(pipeline, events: list[UsageEvent]) -> None:
    """Every event, with RESENT client resends among the originals (each stored once); all delivered."""
    with MeterClient(pipeline.kafka) as meter:
        for i, event in enumerate(events):
            meter.record(event)
            if i % 13 == 0 and i // 13 < RESENT:
                meter.record(events[i // 2])
    assert meter.failed == 0


def _lines(worker: WorkerProcess, text: str) -> int:
    try:
        return worker.log_path.read_text(errors="replace").count(text)
    except OSError:
        return 0


def _restart(pipeline, *, pause: bool) -> None:
    env = dict(pipeline.env)
    if pause:
        env["METERSTREAM_TEST_PAUSE_AFTER_INSERT"] = "1.0"
    else:
        env.pop("METERSTREAM_TEST_PAUSE_AFTER_INSERT", None)
    pipeline.worker = WorkerProcess(env, pipeline.web_port, pipeline.worker.log_path)
    pipeline.start()


def _check_exact(pipeline, events: list[UsageEvent]) -> dict[str, int]:
    """Every table and view against the events sent: physically (count() without FINAL) and
    against usage_rated FINAL; returns the rows checked per table."""
    store = open_store(pipeline.clickhouse, apply_migrations=False)
    try:
        expected_rows = len(events)
        deadline = time.monotonic() + 300
        while (stored := int(store.query("SELECT count() FROM usage_rated FINAL").rows[0][0])) < expected_rows:
            assert time.monotonic() < deadline, f"{stored} of {expected_rows} rows after the kills"
            pipeline.worker._check_alive()
            time.sleep(0.5)
        time.sleep(2)  # anything more (a double) would have landed by now; checked below

        catalog = load_catalog()
        rated = {(e.customer_id, e.event_id): catalog.rate(e) for e in events}
        checked: dict[str, int] = {}

        def scalar(sql: str) -> int:
            return int(store.query(sql).rows[0][0])

        # events_raw and usage_rated: one physical row per event, exactly the events sent.
        for table in ("events_raw", "usage_rated"):
            rows = store.query(f"SELECT customer_id, event_id FROM {table}").rows
            assert Counter(map(tuple, rows)) == Counter(rated.keys()), table
            checked[table] = len(rows)
        final = {
            (r[0], r[1]): r[2:]
            for r in store.query(
                "SELECT customer_id, event_id, credits, cost_to_serve, input_tokens, output_tokens FROM usage_rated FINAL"
            ).rows
        }
        for key, row in rated.items():
            assert final[key] == [row.credits, row.cost_to_serve, row.input_tokens, row.output_tokens], key

        # usage_recent: every event (all within its 10 days), once, physically.
        recent = store.query("SELECT customer_id, event_id, day, credits FROM usage_recent").rows
        assert Counter((r[0], r[1]) for r in recent) == Counter(rated.keys())
        assert all(r[2] == rated[(r[0], r[1])].occurred_at.date() and r[3] == rated[(r[0], r[1])].credits for r in recent)
        checked["usage_recent"] = len(recent)

        # The rollups: per customer and hour/day, rows received once each (no fallback needed) and exact sums.
        for rollup, bucket in (("usage_hourly", "hour"), ("usage_daily", "day")):
            expected: dict[tuple[str, str], list] = defaultdict(lambda: [0, Decimal(0), Decimal(0), 0, 0, 0])
            for row in rated.values():
                at = row.occurred_at.astimezone(timezone.utc)
                when = at.strftime("%Y-%m-%d %H") if bucket == "hour" else at.strftime("%Y-%m-%d")
                acc = expected[(row.customer_id, when)]
                acc[0] += 1
                acc[1] += row.credits
                acc[2] += row.cost_to_serve
                acc[3] += row.input_tokens
                acc[4] += row.cached_input_tokens
                acc[5] += row.output_tokens
            fmt = "%Y-%m-%d %H" if bucket == "hour" else "%Y-%m-%d"
            rows = store.query(
                f"SELECT customer_id, formatDateTime({bucket}, '{fmt}'), sum(inserted_rows), uniqExactMerge(event_ids), "
                f"sum(credits), sum(cost_to_serve), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens) "
                f"FROM {rollup} GROUP BY 1, 2"
            ).rows
            got = {(r[0], r[1]): [int(r[2]), r[4], r[5], int(r[6]), int(r[7]), int(r[8])] for r in rows}
            assert all(int(r[2]) == int(r[3]) for r in rows), f"{rollup}: a row received twice"
            assert got == {k: v for k, v in expected.items()}, rollup
            checked[rollup] = sum(int(r[2]) for r in rows)

        # usage_day_counts: rows received per customer-day, exactly.
        per_day = Counter((r.customer_id, r.occurred_at.astimezone(timezone.utc).date()) for r in rated.values())
        counts = {
            (r[0], r[1]): int(r[2])
            for r in store.query("SELECT customer_id, day, sum(rows) FROM usage_day_counts GROUP BY 1, 2").rows
        }
        assert counts == dict(per_day)
        checked["usage_day_counts"] = sum(counts.values())

        # The settled path: settle the closed days, then the invoice queries agree with usage_rated FINAL.
        periods = sorted({r.period for r in rated.values()})
        assert settle(store.client).customer_days > 0
        assert _same_as_final(store, periods, tuple(CUSTOMERS))
        checked["usage_settled (customer-days)"] = scalar("SELECT count() FROM usage_settled_days FINAL")
        # budget_alerts: every threshold the stored totals reached, alerted once (by id, after FINAL).
        assert scalar("SELECT count() FROM budget_alerts FINAL") == scalar("SELECT uniqExact(alert_id) FROM budget_alerts")
        budgets = BudgetBook.model_validate(yaml.safe_load(BUDGETS))
        spent: dict[tuple[str, str], Decimal] = defaultdict(Decimal)  # per customer and billing period
        for row in rated.values():
            spent[(row.customer_id, row.period)] += row.credits
        expected_alerts = {(c, p, t) for (c, p), credits in spent.items()
                           for t in thresholds_to_alert(credits, budgets.for_customer(c), frozenset())}  # fmt: skip
        alerted = Counter((r[0], r[1], int(r[2])) for r in store.query(
            "SELECT customer_id, period, threshold_percent FROM budget_alerts FINAL WHERE kind IN ('', 'threshold')"
        ).rows)  # fmt: skip
        assert set(alerted) == expected_alerts and set(alerted.values()) <= {1}
        checked["budget_alerts (thresholds)"] = len(alerted)
    finally:
        store.close()
    return checked



def test_sigkill_mid_insert_repeatedly_leaves_every_table_and_view_exact(pipeline_factory):
    now = utc_now()
    events = _events(now)
    pipeline = pipeline_factory(budgets=BUDGETS, start=False)
    pipeline.env["METERSTREAM_WORKER__BATCH_SIZE"] = "150"
    _send_with_resends(pipeline, events)

    # The tables first, with merges stopped: a ReplacingMergeTree merge would hide a doubled block,
    # and this test counts physical rows (the worker's own migrate finds them applied).
    setup = open_store(pipeline.clickhouse)
    try:
        for table in TABLES:
            setup.client.command(f"SYSTEM STOP MERGES {table}")
    finally:
        setup.close()

    rng = random.Random(15)
    kills = Counter()
    _restart(pipeline, pause=True)
    for k in range(PAUSED_KILLS):
        table = ("events_raw", "usage_rated")[k % 2]
        marker = f"test pause after INSERT INTO {table}"
        # After 1 to 4 batches of this worker's (so that the kills land at different offsets).
        seen = _lines(pipeline.worker, marker) + rng.randint(0, 3)
        deadline = time.monotonic() + 120
        while _lines(pipeline.worker, marker) <= seen:
            assert time.monotonic() < deadline, f"no write reached the pause after {table}:\n{pipeline.worker.log_tail()}"
            pipeline.worker._check_alive()
            time.sleep(0.05)
        pipeline.worker.kill()
        kills[f"after INSERT INTO {table}"] += 1
        recovered = _lines(pipeline.worker, RECOVERED)
        _restart(pipeline, pause=k < PAUSED_KILLS - 1)
        if table == "usage_rated":
            # The cut batch is stored, not committed: the restarted worker writes it again from its
            # rows when it takes the partitions (before its first batch).
            deadline = time.monotonic() + 120
            while _lines(pipeline.worker, RECOVERED) <= recovered:
                assert time.monotonic() < deadline, f"the cut batch was not recovered:\n{pipeline.worker.log_tail()}"
                pipeline.worker._check_alive()
                time.sleep(0.05)
    for _ in range(RANDOM_KILLS):
        time.sleep(rng.uniform(0.3, 2.5))  # anywhere: rating, inserting, committing
        pipeline.worker.kill()
        kills["random"] += 1
        _restart(pipeline, pause=False)

    checked = _check_exact(pipeline, events)

    recoveries = _lines(pipeline.worker, RECOVERED)
    assert sum(kills.values()) >= 10 and recoveries >= kills["after INSERT INTO usage_rated"]
    print(f"\nkills: {dict(kills)}; recoveries at assignment: {recoveries}; rows checked per table: {checked}")


#: The tables whose merges would hide a doubled block (ReplacingMergeTree), and the rest a batch reaches.
NO_MERGES = ("max_bytes_to_merge_at_max_space_in_pool = 1, max_bytes_to_merge_at_min_space_in_pool = 1, "
             "min_parts_to_merge_at_once = 1000000")
SERVER_KILLS = 10


def test_clickhouse_server_sigkilled_mid_write_repeatedly_leaves_every_table_and_view_exact(base_settings, tmp_path):
    """The store's server, not the worker, killed (SIGKILL) while the worker writes, and restarted
    on the same data, repeatedly: half the kills right after a table's insert (the worker held
    there by the test pause), half at random. The worker keeps its batch in memory and retries the
    write with the same tokens (the store outage path), so the tables and views the killed insert
    did not reach get it and the others skip it. Merges are kept off for the whole run by the
    tables' settings (a server restart forgets SYSTEM STOP MERGES), and checked to have done nothing.
    """
    with private_clickhouse(tmp_path / "ch") as (server, dsn):
        (tmp_path / "p").mkdir()
        pipeline = Pipeline(base_settings, tmp_path / "p", dsn, BUDGETS)
        pipeline.env["METERSTREAM_WORKER__BATCH_SIZE"] = "150"
        pipeline.env["METERSTREAM_CLICKHOUSE__RETRY_BACKOFF_MAX"] = "1"
        events = _events(utc_now())
        try:
            _send_with_resends(pipeline, events)
            setup = open_store(pipeline.clickhouse)
            try:
                for table in TABLES:
                    setup.client.command(f"ALTER TABLE {table} MODIFY SETTING {NO_MERGES}")
            finally:
                setup.close()
            _restart(pipeline, pause=True)  # held after each insert: half the kills land there
            rng = random.Random(16)
            kills = Counter()
            for k in range(SERVER_KILLS):
                if k % 2 == 0:
                    table = ("events_raw", "usage_rated")[(k // 2) % 2]
                    marker = f"test pause after INSERT INTO {table}"
                    seen = _lines(pipeline.worker, marker) + rng.randint(0, 2)
                    deadline = time.monotonic() + 120
                    while _lines(pipeline.worker, marker) <= seen:
                        assert time.monotonic() < deadline, f"no write reached {marker}:\n{pipeline.worker.log_tail()}"
                        pipeline.worker._check_alive()
                        time.sleep(0.02)
                    where = f"after INSERT INTO {table}"
                else:
                    time.sleep(rng.uniform(0.05, 1.5))  # anywhere: mid-insert, mid-view, between batches
                    where = "random"
                os.kill(server.status().pid, signal.SIGKILL)
                kills[where] += 1
                time.sleep(rng.uniform(0.2, 1.0))
                server.up()
                pipeline.worker._check_alive()
            checked = _check_exact(pipeline, events)
            store = open_store(pipeline.clickhouse, apply_migrations=False)
            try:
                merged = store.query(
                    "SELECT count() FROM system.parts WHERE database = currentDatabase() AND active AND level > 1 "
                    "AND table IN {tables:Array(String)}", {"tables": list(TABLES)}
                ).rows[0][0]
                # An inserted part has level 0, or 1 where the insert collapsed it (optimize_on_insert);
                # a merge makes one level higher than the parts it merged.
                assert merged == 0, "a merge ran: it could have hidden a doubled block"
            finally:
                store.close()
            retries = pipeline.worker.stats(timeout=5)["store_retries"]
            assert sum(kills.values()) >= 10 and retries > 0
            print(f"\nserver kills: {dict(kills)}; store retries: {retries}; rows checked per table: {checked}")
        finally:
            pipeline.stop()
