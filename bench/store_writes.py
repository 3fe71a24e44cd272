"""Write amplification in the open: what each insert feeds, what it costs, and the reads it buys.

    .venv/bin/python -m bench.store_writes                   # both phases (~8 min on the loaded 2-core VM; read store cached)
    .venv/bin/python -m bench.store_writes --phases insert   # insert cost per target only (~3-4 min)
    .venv/bin/python -m bench.store_writes --phases read     # read benefit per view only

It starts a **private ClickHouse server** (the project's own, ``meterstream.services.clickhouse``,
free ports, data under ``.local/bench/store-writes/``) so that the server process's CPU time is the
benchmark's alone, and stops it at the end.

``insert``: a workload of ``bench/workload.py`` (the worker benchmark's traffic: power-law
customers, resends) is rated untimed through the worker's own code,
:class:`~meterstream.stream_processors.processing.BatchProcessor` (budgets that every customer
with 20 events or more crosses, so ``budget_alerts`` gets rows), in batches of the worker's
default size. Then, on a fresh database made by the project's migrations, the same batches are
written with :meth:`ClickHouseStore.insert_batch` (events_raw, usage_rated and its views,
budget_alerts: the worker's write), once per variant of the schema: the full schema, each
materialized view of ``sql/0*.sql`` dropped in turn (a view whose source is another view's
target is starved with it), and no view at all (usage_rated bare). Variants are run in rotated
order for ``--rounds`` rounds; medians. Per variant: the server's CPU per stored event from
``system.query_log`` (``UserTimeMicroseconds + SystemTimeMicroseconds`` of each INSERT, which
includes the pushes to the views), per table; the server process's CPU
(``/proc/<pid>/stat``) over the inserts and until background merges are quiet; and in this
process the CPU of building the Arrow tables (``meterstream/storage/columns.py``) beside the
CPU of the whole ``insert_batch`` call.

``read``: a store of ``--rows`` synthetic rated rows for ``--customers`` customers
(``bench.invoice.insert_sql``, loaded through every view; the previous calendar month as of its
last day at 23:00 UTC, settled up to that day, as ``bench/usage_spend.py`` builds it; no resent
rows: the worker drops resends before it writes). For each view, the reads it serves are timed
against the same read over ``usage_rated FINAL`` alone (median of ``--runs`` after one untimed
run, the variants alternated), and the results compared row for row:
``invoice_usage`` for the heaviest and the median customer (also without ``usage_recent``: the
unsettled days from ``usage_rated FINAL``), ``period_usage`` and ``meterstream usage`` with spend
for every customer (``cs.reports.month_to_date``), ``usage_daily`` and ``usage_hourly`` for the
heaviest customer and for all customers, ``customer_periods``.

Output: a table, and ``bench/results/store-writes-<timestamp>.json`` with the machine, versions,
the load average at start and end, and every repetition. No figure here is asserted by a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import re
import signal
import statistics
import sys
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clickhouse_connect
import pyarrow
from rich.console import Console
from rich.table import Table

from bench.invoice import FULL_FINAL_INVOICE, insert_sql, spec_for
from bench.run import machine_info, source_fingerprint, versions
from bench.workload import generate, serialize
from meterstream.budgets import Budget, BudgetBook
from meterstream.config import ClickHouseSettings, LocalServicesSettings
from meterstream.cs.reports import month_to_date
from meterstream.demo import customer_ids
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.records import BudgetAlert, RatedUsage, RawEvent
from meterstream.services.clickhouse import ClickHouseServer
from meterstream.storage.batches import batch_id, ordered_rated_table, sources_of
from meterstream.storage.clickhouse import SQL_DIR, ClickHouseStore, QueryResult, _statements, open_store
from meterstream.storage.columns import raw_table
from meterstream.storage.queries import saved_query
from meterstream.storage.settle import settle
from meterstream.stream_processors.processing import BatchProcessor, InboundMessage, MonthToDate

REPO = Path(__file__).resolve().parents[1]
STATE_DIR = REPO / ".local" / "bench" / "store-writes"
RESULTS = REPO / "bench" / "results"
console = Console(width=200)

# -- the views, as the migrations define them ------------------------------------------------------

_VIEW = re.compile(
    r"CREATE\s+MATERIALIZED\s+VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s+TO\s+(\w+)\s+AS\s+.*?\bFROM\s+(\w+)",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True)
class View:
    """A materialized view of the migrations: ``name`` feeds ``target`` from each insert into ``source``."""

    name: str
    target: str
    source: str


def discover_views(sql_dir: Path = SQL_DIR) -> list[View]:
    """Every ``CREATE MATERIALIZED VIEW ... TO target AS SELECT ... FROM source`` of the numbered DDL."""
    views = []
    for path in sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql")):
        for statement in _statements(path.read_text()):
            match = _VIEW.match(statement)
            if match:
                views.append(View(*match.groups()))
    return views


def starved_by(views: Sequence[View], dropped: Sequence[str]) -> list[str]:
    """The views that receive nothing once ``dropped`` are gone: those reading a dropped view's target,
    transitively (usage_day_counts_mv reads usage_recent, which only usage_recent_mv fills)."""
    by_name = {v.name: v for v in views}
    unknown = [d for d in dropped if d not in by_name]
    if unknown:
        raise ValueError(f"no such materialized view in the migrations: {unknown}")
    dead_targets = {by_name[d].target for d in dropped}
    starved: list[str] = []
    changed = True
    while changed:
        changed = False
        for v in views:
            if v.name in dropped or v.name in starved:
                continue
            if v.source in dead_targets and not any(o.target == v.source and o.name not in dropped
                                                    and o.name not in starved for o in views):  # fmt: skip
                starved.append(v.name)
                dead_targets.add(v.target)
                changed = True
    return starved


def variants(views: Sequence[View]) -> list[tuple[str, list[str]]]:
    """(label, views to drop): the full schema, each view dropped in turn, no view."""
    plan: list[tuple[str, list[str]]] = [("full schema", [])]
    for v in views:
        starved = starved_by(views, [v.name])
        label = f"without {v.name}" + (f" (starves {', '.join(starved)})" if starved else "")
        plan.append((label, [v.name]))
    plan.append(("no views (usage_rated bare)", [v.name for v in views]))
    return plan


# -- the private server ----------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def private_server(state_dir: Path) -> Iterator[tuple[str, int]]:
    """The project's local ClickHouse server on free ports, data under ``state_dir``; (DSN, pid)."""
    services = LocalServicesSettings(state_dir=state_dir, clickhouse_http_port=_free_port(),
                                     clickhouse_tcp_port=_free_port(), start_timeout=90)  # fmt: skip
    server = ClickHouseServer(services)
    status = server.up()
    assert status.pid is not None
    try:
        yield f"http://meterstream:meterstream@127.0.0.1:{services.clickhouse_http_port}/", status.pid
    finally:
        server.down()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


# -- the batches the worker writes -----------------------------------------------------------------


@dataclass
class Batch:
    raw: list[RawEvent]
    rated: list[RatedUsage]
    alerts: list[BudgetAlert]


@dataclass
class RatedWorkload:
    batches: list[Batch] = field(default_factory=list)
    messages: int = 0
    duplicates: int = 0
    customers: int = 0
    seconds: float = 0.0

    @property
    def events(self) -> int:
        return sum(len(b.rated) for b in self.batches)

    @property
    def alerts(self) -> int:
        return sum(len(b.alerts) for b in self.batches)


def _messages(events: int, customers: int, now: datetime, partitions: int = 4) -> list[InboundMessage]:
    """The workload as the worker reads it: per-topic partitions by key, offsets in order."""
    offsets: Counter[tuple[str, int]] = Counter()
    out = []
    stamp = int(now.timestamp() * 1000)
    for kind, key, value in serialize(generate(events, customers, now=now)):
        topic = "usage.events" if kind == "usage" else "outcome.events"
        partition = zlib.crc32(key) % partitions
        offset = offsets[(topic, partition)]
        offsets[(topic, partition)] += 1
        out.append(InboundMessage(kind, value, topic, partition, offset, stamp))  # type: ignore[arg-type]
    return out


def _rate(messages: Sequence[InboundMessage], budgets: BudgetBook, now: datetime, batch_size: int) -> RatedWorkload:
    processor = BatchProcessor(load_catalog(None), budgets, clock=lambda: now)
    totals: dict[str, MonthToDate] = {}
    out = RatedWorkload(messages=len(messages))
    for start in range(0, len(messages), batch_size):
        result = processor.process(messages[start : start + batch_size], lambda k: totals.get(k, MonthToDate()), now=now)
        totals.update(result.month_to_date)
        processor.commit(result)  # what the worker's state commit remembers
        out.duplicates += result.duplicates
        if result.dead_letters:
            raise RuntimeError(f"the workload produced dead letters: {result.dead_letters[0]}")
        out.batches.append(Batch(result.raw, result.rated, result.alerts))
    out.customers = len({r.customer_id for b in out.batches for r in b.rated})
    return out


def rated_workload(events: int, customers: int, now: datetime, batch_size: int) -> RatedWorkload:
    """The worker's batches: rated once without budgets to size them, then with budgets every customer
    with >= 20 events crosses (f x its credits, f uniform in [0.4, 1.0), as bench/run.py's latency phase)."""
    started = time.perf_counter()
    messages = _messages(events, customers, now)
    first = _rate(messages, BudgetBook(), now, batch_size)
    credits: dict[str, Decimal] = defaultdict(Decimal)
    counts: Counter[str] = Counter()
    for b in first.batches:
        for r in b.rated:
            credits[r.customer_id] += r.credits
            counts[r.customer_id] += 1
    rng = random.Random(42)
    budgets = BudgetBook(customers={
        c: Budget(monthly_credits=(credits[c] * Decimal(str(round(rng.uniform(0.4, 1.0), 3)))).quantize(Decimal("0.0001")))
        for c in sorted(counts) if counts[c] >= 20 and credits[c] > 0
    })  # fmt: skip
    out = _rate(messages, budgets, now, batch_size)
    out.seconds = time.perf_counter() - started
    return out


# -- insert cost per target ------------------------------------------------------------------------

_TABLE_OF_INSERT = re.compile(r"INSERT\s+INTO\s+(?:[`\"]?\w+[`\"]?\.)?[`\"]?(\w+)", re.IGNORECASE)


def _query_log(client: Any, tag: str) -> dict[str, dict[str, Any]]:
    """Per table: the INSERTs of one variant (tagged ``log_comment``), their CPU (``cpu_us``: the
    query's threads, the pushes to the views included), rows written (views included) and each
    insert's CPU in the order they ran (``each_cpu_us``)."""
    client.command("SYSTEM FLUSH LOGS")
    rows = client.query(
        "SELECT query, ProfileEvents['UserTimeMicroseconds'] + ProfileEvents['SystemTimeMicroseconds'], "
        "written_rows, query_duration_ms FROM system.query_log "
        "WHERE type = 'QueryFinish' AND query_kind = 'Insert' AND log_comment = {tag:String} "
        "AND event_date >= yesterday() ORDER BY event_time_microseconds",
        parameters={"tag": tag},
    ).result_rows
    out: dict[str, dict[str, Any]] = {}
    for query, cpu_us, written, ms in rows:
        match = _TABLE_OF_INSERT.search(query)
        table = match.group(1) if match else "?"
        acc = out.setdefault(table, {"inserts": 0, "cpu_us": 0, "written_rows": 0, "wall_ms": 0, "each_cpu_us": []})
        acc["inserts"] += 1
        acc["cpu_us"] += cpu_us
        acc["written_rows"] += written
        acc["wall_ms"] += ms
        acc["each_cpu_us"].append(cpu_us)
    return out


def _median_batch(each_cpu_us: Sequence[float], sizes: Sequence[int]) -> float | None:
    """The median over a variant's batches of one table's insert CPU per event (robust to a batch that
    shared its core with someone else's work); None when the inserts do not match the batches."""
    if len(each_cpu_us) != len(sizes) or not sizes:
        return None
    return round(statistics.median(cpu / n for cpu, n in zip(each_cpu_us, sizes, strict=True)), 2)


def _merges_quiet(client: Any, database: str, timeout: float) -> float:
    started = time.monotonic()
    quiet = 0
    while time.monotonic() - started < timeout:
        running = client.query("SELECT count() FROM system.merges WHERE database = {d:String}",
                               parameters={"d": database}).result_rows[0][0]  # fmt: skip
        quiet = quiet + 1 if running == 0 else 0
        if quiet >= 3:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def insert_variant(dsn: str, pid: int, work: RatedWorkload, views: Sequence[View], dropped: Sequence[str],
                   merge_timeout: float) -> dict[str, Any]:  # fmt: skip
    """One variant on a fresh database: migrations, drop ``dropped``, the worker's writes, measured."""
    database = f"sw_{uuid.uuid4().hex[:10]}"
    store = open_store(ClickHouseSettings(dsn=dsn, database=database))
    client = store.client
    try:
        for name in dropped:
            client.command(f"DROP VIEW {name}")
        live = sorted(r[0] for r in client.query(
            "SELECT name FROM system.tables WHERE database = {d:String} AND engine = 'MaterializedView'",
            parameters={"d": database}).result_rows)  # fmt: skip
        expected = sorted(v.name for v in views if v.name not in dropped)
        if live != expected:
            raise RuntimeError(f"the migrations made views {live}, the benchmark expected {expected} "
                               "(discover_views out of step with sql/)")  # fmt: skip
        tag = f"store-writes:{database}"
        client.set_client_setting("log_comment", tag)
        now = datetime.now(timezone.utc)
        build_cpu = call_cpu = 0.0
        gc.collect()
        gc.disable()
        try:
            server0, wall0 = process_cpu_seconds(pid), time.perf_counter()
            for b in work.batches:
                t0 = time.thread_time()  # the Arrow tables insert_batch builds, built here alone
                raw_table(b.raw, now)
                ordered_rated_table(b.rated, sources_of(b.raw, b.rated), now,
                                    batch_id(b.raw, b.rated, [a.alert_id for a in b.alerts]))  # fmt: skip
                t1 = time.thread_time()
                store.insert_batch(b.raw, b.rated, b.alerts)
                build_cpu += t1 - t0
                call_cpu += time.thread_time() - t1
            wall = time.perf_counter() - wall0
            server1 = process_cpu_seconds(pid)
        finally:
            gc.enable()
        merge_wait = _merges_quiet(client, database, merge_timeout)
        server2 = process_cpu_seconds(pid)
        client.set_client_setting("log_comment", "")
        per_table = _query_log(client, tag)
        stored = client.query("SELECT count() FROM usage_rated FINAL").result_rows[0][0]
        if stored != work.events:
            raise RuntimeError(f"usage_rated holds {stored} events, {work.events} were written")
    finally:
        with contextlib.suppress(Exception):
            client.command(f"DROP DATABASE IF EXISTS {database}")
        store.close()
    n = work.events
    query_cpu = sum(t["cpu_us"] for t in per_table.values())
    return {
        "stored_events": n,
        "wall_seconds": round(wall, 3),
        "server_query_cpu_us_per_event": round(query_cpu / n, 2),
        "server_query_cpu_us_per_event_by_table": {k: round(v["cpu_us"] / n, 2) for k, v in sorted(per_table.items())},
        "median_batch_cpu_us_per_event_by_table": {
            "events_raw": _median_batch(per_table.get("events_raw", {}).get("each_cpu_us", []),
                                        [len(b.raw) for b in work.batches if b.raw]),
            "usage_rated": _median_batch(per_table.get("usage_rated", {}).get("each_cpu_us", []),
                                         [len(b.rated) for b in work.batches if b.rated]),
        },  # fmt: skip
        "written_rows_by_insert": {k: int(v["written_rows"]) for k, v in sorted(per_table.items())},
        "inserts_by_table": {k: int(v["inserts"]) for k, v in sorted(per_table.items())},
        "server_process_cpu_us_per_event_inserts": round((server1 - server0) * 1e6 / n, 2),
        "server_process_cpu_us_per_event_with_merges": round((server2 - server0) * 1e6 / n, 2),
        "merge_wait_seconds": round(merge_wait, 1),
        "client_arrow_build_cpu_us_per_event": round(build_cpu * 1e6 / n, 2),
        "client_insert_batch_cpu_us_per_event": round(call_cpu * 1e6 / n, 2),
    }


def phase_insert(dsn: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    views = discover_views()
    plan = variants(views)
    now = datetime.now(timezone.utc)
    with console.status(f"rating {args.events:,} messages through BatchProcessor (untimed)"):
        work = rated_workload(args.events, args.customers, now, args.batch_size)
    console.print(f"rated {work.messages:,} messages -> {work.events:,} events ({work.duplicates:,} resends "
                  f"dropped), {work.alerts:,} alerts, {len(work.batches)} batches, in {work.seconds:.1f} s")  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in plan}
    for rnd in range(args.rounds):
        order = plan[rnd % len(plan):] + plan[: rnd % len(plan)]
        for label, dropped in order:
            with console.status(f"round {rnd + 1}/{args.rounds}: {label}"):
                runs[label].append(insert_variant(dsn, pid, work, views, dropped, args.merge_timeout))
            r = runs[label][-1]
            console.print(f"  round {rnd + 1} {label}: {r['server_query_cpu_us_per_event']} µs/event "
                          f"(process {r['server_process_cpu_us_per_event_with_merges']})")  # fmt: skip

    def med(label: str, key: str) -> float:
        return round(float(statistics.median(r[key] for r in runs[label])), 2)

    def med_table(label: str, table: str) -> float:
        return round(float(statistics.median(r["server_query_cpu_us_per_event_by_table"].get(table, 0.0)
                                              for r in runs[label])), 2)

    def _median_of(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return round(float(statistics.median(known)), 2) if known else None

    full = plan[0][0]
    summary: list[dict[str, Any]] = []
    for label, dropped in plan:
        row: dict[str, Any] = {
            "variant": label,
            "dropped": dropped,
            "server_query_cpu_us_per_event": med(label, "server_query_cpu_us_per_event"),
            "usage_rated_insert_cpu_us_per_event": med_table(label, "usage_rated"),
            "usage_rated_median_batch_cpu_us_per_event": _median_of(
                [r["median_batch_cpu_us_per_event_by_table"]["usage_rated"] for r in runs[label]]),
            "events_raw_insert_cpu_us_per_event": med_table(label, "events_raw"),
            "budget_alerts_insert_cpu_us_per_event": med_table(label, "budget_alerts"),
            "server_process_cpu_us_per_event_with_merges": med(label, "server_process_cpu_us_per_event_with_merges"),
            "client_arrow_build_cpu_us_per_event": med(label, "client_arrow_build_cpu_us_per_event"),
            "client_insert_batch_cpu_us_per_event": med(label, "client_insert_batch_cpu_us_per_event"),
            "server_process_cpu_us_per_event_inserts": med(label, "server_process_cpu_us_per_event_inserts"),
            "range_server_query_cpu_us_per_event": [min(r["server_query_cpu_us_per_event"] for r in runs[label]),
                                                    max(r["server_query_cpu_us_per_event"] for r in runs[label])],  # fmt: skip
        }
        if dropped and label != full:
            row["saved_vs_full_us_per_event"] = round(
                med(full, "server_query_cpu_us_per_event") - row["server_query_cpu_us_per_event"], 2)
            full_batch = summary[0]["usage_rated_median_batch_cpu_us_per_event"]
            if full_batch is not None and row["usage_rated_median_batch_cpu_us_per_event"] is not None:
                row["saved_vs_full_median_batch_us_per_event"] = round(
                    full_batch - row["usage_rated_median_batch_cpu_us_per_event"], 2)
            row["saved_vs_full_process_us_per_event"] = round(
                med(full, "server_process_cpu_us_per_event_with_merges")
                - row["server_process_cpu_us_per_event_with_merges"], 2)  # fmt: skip
        summary.append(row)
    return {
        "views": [v.__dict__ for v in views],
        "workload": {"messages": work.messages, "stored_events": work.events, "resends_dropped": work.duplicates,
                     "alerts": work.alerts, "batches": len(work.batches), "batch_size": args.batch_size,
                     "customers": work.customers, "rating_seconds_untimed": round(work.seconds, 1)},  # fmt: skip
        "rounds": args.rounds,
        "summary": summary,
        "runs": runs,
    }


# -- read benefit per view -------------------------------------------------------------------------

#: invoice_usage over usage_rated FINAL alone (no settled days, no usage_recent, no usage_day_counts).
INVOICE_FINAL = FULL_FINAL_INVOICE

#: period_usage over usage_rated FINAL alone.
PERIOD_USAGE_FINAL = """
SELECT customer_id, kind, meter, model, outcome_type, attribution, price_book_version AS plan_version,
       endsWith(rule, ':reversal') AS is_reversal, billed_in, count() AS events,
       sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens,
       sum(output_tokens) AS output_tokens, sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve,
       max(quantity) AS max_quantity, sum(quantity) AS sum_quantity
FROM usage_rated FINAL
WHERE period = {period:String} AND ({customer:String} = '' OR customer_id = {customer:String})
GROUP BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in
ORDER BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in
"""

_SERIES_FINAL = """
SELECT {bucket} AS {name}, customer_id, meter, model, workflow_id, count() AS events,
       sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens,
       sum(output_tokens) AS output_tokens, sum(quantity) AS quantity, sum(credits) AS credits,
       sum(cost_to_serve) AS cost_to_serve
FROM usage_rated FINAL
WHERE period = {{period:String}} AND ({{customer:String}} = '' OR customer_id = {{customer:String}})
  AND ({{day:String}} = '' OR toDate(occurred_at, 'UTC') = toDateOrZero({{day:String}}))
GROUP BY {name}, customer_id, meter, model, workflow_id
ORDER BY {name}, customer_id, meter, model, workflow_id
"""
DAILY_FINAL = _SERIES_FINAL.format(bucket="toDate(occurred_at, 'UTC')", name="day")
HOURLY_FINAL = _SERIES_FINAL.format(bucket="toStartOfHour(occurred_at)", name="hour")
CUSTOMER_PERIODS_FINAL = "SELECT DISTINCT period FROM usage_rated WHERE customer_id = {customer:String} ORDER BY period"


def _edit(sql: str, old: str, new: str) -> str:
    if sql.count(old) != 1:
        raise RuntimeError(f"invoice_usage.sql changed: expected {old!r} exactly once")
    return sql.replace(old, new)


def invoice_without_recent() -> str:
    """invoice_usage.sql without usage_recent: settled days from usage_settled (usage_day_counts
    still says which), every other day from usage_rated FINAL. Derived from the saved query, so it
    fails loudly when that query changes shape."""
    sql = saved_query("invoice_usage")
    parts = sql.split("UNION ALL")
    if len(parts) != 3 or "FROM usage_recent FINAL" not in parts[1]:
        raise RuntimeError("invoice_usage.sql changed: expected three branches, the second from usage_recent")
    sql = parts[0] + "UNION ALL" + parts[2]
    sql = _edit(sql, "WHERE day < toDate(now(), 'UTC') - 7 AND day NOT IN", "WHERE day NOT IN")
    return _edit(sql, "AND toDate(occurred_at, 'UTC') < toDate(now(), 'UTC') - 7\n", "")


def _rows(result: QueryResult, drop: Sequence[str] = ()) -> list[tuple[Any, ...]]:
    keep = [i for i, c in enumerate(result.columns) if c not in drop]
    return [tuple(row[i] for i in keep) for row in result.rows]


class Reader:
    """Runs a query like ``ClickHouseStore.query`` and adds up what the server says it did
    (``elapsed_ns``, ``read_rows`` of clickhouse-connect's summary) since the last :meth:`reset`."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.client = store.client
        self.reset()

    def reset(self) -> None:
        self.server_ns = 0
        self.read_rows = 0

    def __call__(self, sql: str, parameters: dict[str, Any]) -> QueryResult:
        result = self.client.query(sql, parameters=parameters)
        self.server_ns += int(result.summary.get("elapsed_ns", 0))
        self.read_rows += int(result.summary.get("read_rows", 0))
        return QueryResult(columns=list(result.column_names), types=[t.name for t in result.column_types],
                           rows=[list(row) for row in result.result_rows])  # fmt: skip


def compare(calls: dict[str, Callable[[], Any]], runs: int, same: Callable[[Any, Any], bool],
            reader: Reader) -> dict[str, Any]:  # fmt: skip
    """Time each way (one untimed run each, then ``runs`` rounds alternating the ways); check results.

    Per way: the wall time of the call (what a caller waits: the server, the transfer, the rows into
    Python) and the server's own elapsed time and rows read, summed over the call's queries."""
    results = {name: call() for name, call in calls.items()}
    wall: dict[str, list[float]] = {name: [] for name in calls}
    server: dict[str, list[float]] = {name: [] for name in calls}
    read: dict[str, int] = {}
    names = list(calls)
    for i in range(runs):
        for name in names[i % len(names):] + names[: i % len(names)]:
            reader.reset()
            started = time.perf_counter()
            calls[name]()
            wall[name].append(time.perf_counter() - started)
            server[name].append(reader.server_ns / 1e9)
            read[name] = reader.read_rows
    first = results[names[0]]

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 1)

    return {
        "ways": {name: {"median_ms": ms(wall[name]), "min_ms": round(min(wall[name]) * 1000, 1),
                        "max_ms": round(max(wall[name]) * 1000, 1), "server_median_ms": ms(server[name]),
                        "server_read_rows": read[name]} for name in names},  # fmt: skip
        "identical_results": {name: same(first, results[name]) for name in names[1:]},
        "runs": runs,
    }


def _read_store(dsn: str, rows: int, customers: int, rebuild: bool) -> tuple[ClickHouseStore, dict[str, Any]]:
    """The read store on the private server, built once per spec and reused (marker in STATE_DIR)."""
    now = datetime.now(timezone.utc)
    as_of = now.replace(day=1, hour=23, minute=0, second=0, microsecond=0) - timedelta(days=1)
    database = f"sw_read_{rows}_{customers}"
    spec = {**spec_for(rows, customers), "period": f"{as_of:%Y-%m}", "resent_rows": 0}
    marker = STATE_DIR / f"{database}.json"
    settings = ClickHouseSettings(dsn=dsn, database=database)
    if not rebuild and marker.is_file():
        meta = json.loads(marker.read_text())
        if all(meta.get(k) == v for k, v in spec.items()):
            store = open_store(settings)
            if store.client.query("SELECT count() FROM usage_rated").result_rows[0][0] == rows:
                return store, {**meta, "reused": True}
            store.close()
    with clickhouse_connect.get_client(dsn=dsn) as admin:
        admin.command(f"DROP DATABASE IF EXISTS {database}")
    store = open_store(settings)
    period_start = as_of.replace(day=1, hour=0)
    started = time.perf_counter()
    with console.status(f"building the read store: {rows:,} rows through every view"):
        store.client.command(insert_sql(rows, customer_ids(customers), period_start,
                                        int((as_of - period_start).total_seconds())))  # fmt: skip
        load = time.perf_counter() - started
        merges = _merges_quiet(store.client, database, 300)
        settled = settle(store.client, as_of.date())
        _merges_quiet(store.client, database, 120)
    meta = {**spec, "as_of": as_of.isoformat(), "load_seconds": round(load, 1),
            "load_rows_per_second": round(rows / load), "merge_wait_seconds": round(merges, 1),
            "settle": settled.as_dict(), "built_at": now.isoformat()}  # fmt: skip
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(meta, indent=2, default=str))
    return store, {**meta, "reused": False}


def phase_read(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    store, meta = _read_store(dsn, args.rows, args.read_customers, args.rebuild)
    how = "reused" if meta["reused"] else f"built in {meta['load_seconds']:.0f} s"
    console.print(f"read store: {args.rows:,} rows, {args.read_customers:,} customers, period {meta['period']} ({how})")
    try:
        period = meta["period"]
        per_customer = store.client.query(
            "SELECT customer_id, count() AS n FROM usage_rated WHERE period = {p:String} GROUP BY customer_id "
            "ORDER BY n DESC, customer_id", parameters={"p": period}).result_rows  # fmt: skip
        heaviest, median = per_customer[0], per_customer[len(per_customer) // 2]
        catalog = load_catalog(None)
        q = Reader(store)

        def rows_equal(drop: Sequence[str] = ()) -> Callable[[Any, Any], bool]:
            return lambda a, b: _rows(a, drop) == _rows(b, drop)

        out: dict[str, Any] = {"store": meta, "heaviest_customer": {"id": heaviest[0], "rows": heaviest[1]},
                               "median_customer": {"id": median[0], "rows": median[1]}, "reads": {}}  # fmt: skip
        reads = out["reads"]
        no_recent = invoice_without_recent()
        for label, (customer, _) in (("heaviest", heaviest), ("median", median)):
            p = {"customer": customer, "period": period, "late_until": ""}
            reads[f"invoice_usage, {label} customer"] = {
                "serves": ["usage_recent_mv", "usage_day_counts_mv"],
                **compare({
                    "saved query (settled days + usage_recent + usage_day_counts)":
                        partial(q, saved_query("invoice_usage"), p),
                    "without usage_recent (unsettled days from usage_rated FINAL)": partial(q, no_recent, p),
                    "usage_rated FINAL only": partial(q, INVOICE_FINAL, p),
                }, args.runs, rows_equal(), q),
            }  # fmt: skip
        p_all = {"period": period, "customer": ""}
        reads["period_usage, every customer (the query of `meterstream usage`)"] = {
            "serves": ["usage_recent_mv", "usage_day_counts_mv"],
            **compare({"saved query": lambda: q(saved_query("period_usage"), p_all),
                       "usage_rated FINAL only": lambda: q(PERIOD_USAGE_FINAL, p_all)},
                      args.runs, rows_equal(), q),
        }  # fmt: skip

        def run_with(final: bool) -> Callable[..., Any]:
            def run(name: str, **params: str) -> Any:
                sql = PERIOD_USAGE_FINAL if final and name == "period_usage" else saved_query(name)
                return q(sql, params)
            return run

        reads[f"`meterstream usage` with spend, {len(per_customer):,} customers (reports.month_to_date)"] = {
            "serves": ["usage_recent_mv", "usage_day_counts_mv"],
            **compare({"saved queries": lambda: month_to_date(run_with(False), catalog, period),
                       "period_usage from usage_rated FINAL only": lambda: month_to_date(run_with(True), catalog, period)},
                      max(3, args.runs // 2), lambda a, b: a.rows == b.rows and a.problems == b.problems, q),
        }  # fmt: skip
        # `meterstream usage daily|hourly [--customer C] [--day D]`: the whole period for every
        # customer hourly returns ~0.9M rows here (~15 s either way): only with --all-hourly.
        one_day = (datetime.fromisoformat(meta["as_of"]) - timedelta(days=1)).date().isoformat()
        series = [("usage_daily_mv", "usage_daily", DAILY_FINAL, "heaviest customer", heaviest[0], ""),
                  ("usage_daily_mv", "usage_daily", DAILY_FINAL, "every customer", "", ""),
                  ("usage_hourly_mv", "usage_hourly", HOURLY_FINAL, "heaviest customer", heaviest[0], ""),
                  ("usage_hourly_mv", "usage_hourly", HOURLY_FINAL, f"every customer, --day {one_day}", "", one_day)]
        if args.all_hourly:
            series.append(("usage_hourly_mv", "usage_hourly", HOURLY_FINAL, "every customer, whole period", "", ""))
        for view, name, final, label, customer, day in series:
            p = {"period": period, "customer": customer, "day": day}
            sources = Counter(r[-1] for r in q(saved_query(name), p).rows)
            reads[f"{name}, {label}"] = {
                "serves": [view],
                "saved_query_row_sources": dict(sources),
                **compare({"saved query (rollup)": partial(q, saved_query(name), p),
                           "usage_rated FINAL only": partial(q, final, p)},
                          args.runs, rows_equal(("source",)), q),
            }  # fmt: skip
        p = {"customer": heaviest[0]}
        reads["customer_periods, heaviest customer"] = {
            "serves": ["usage_day_counts_mv"],
            **compare({"saved query (usage_day_counts)": lambda: q(saved_query("customer_periods"), p),
                       "usage_rated only": lambda: q(CUSTOMER_PERIODS_FINAL, p)}, args.runs, rows_equal(), q),
        }  # fmt: skip
        return out
    finally:
        store.close()


# -- the command -----------------------------------------------------------------------------------


def _print(results: dict[str, Any]) -> None:
    m = results["machine"]
    if "insert" in results:
        ins = results["insert"]
        w = ins["workload"]
        t = Table(title=f"Insert cost per stored event ({w['stored_events']:,} events, {w['batches']} batches of "
                        f"≤ {w['batch_size']:,}, {w['alerts']:,} alerts; median of {ins['rounds']} rounds)")  # fmt: skip
        for col in ("variant", "all inserts µs/event (query_log)", "range", "usage_rated insert",
                    "usage_rated, median batch", "full − this (median batch)", "process µs/event (+merges)",
                    "client: Arrow build", "client: insert_batch"):  # fmt: skip
            t.add_column(col, justify="left" if col == "variant" else "right")

        def f(value: float | None) -> str:
            return "" if value is None else f"{value:.1f}"

        for r in ins["summary"]:
            low, high = r["range_server_query_cpu_us_per_event"]
            t.add_row(r["variant"], f(r["server_query_cpu_us_per_event"]), f"{low:.1f}–{high:.1f}",
                      f(r["usage_rated_insert_cpu_us_per_event"]), f(r["usage_rated_median_batch_cpu_us_per_event"]),
                      f(r.get("saved_vs_full_median_batch_us_per_event")),
                      f(r["server_process_cpu_us_per_event_with_merges"]),
                      f(r["client_arrow_build_cpu_us_per_event"]), f(r["client_insert_batch_cpu_us_per_event"]))
        console.print(t)
    if "read" in results:
        rd = results["read"]
        t = Table(title=f"Reads each view serves: median ms ({rd['store']['rows']:,} rows, heaviest customer "
                        f"{rd['heaviest_customer']['rows']:,} rows, median {rd['median_customer']['rows']:,})")  # fmt: skip
        for col in ("read", "view(s)", "way", "median ms", "min–max", "server ms", "rows read", "same rows"):
            t.add_column(col)
        for name, r in rd["reads"].items():
            first = True
            for way, timing in r["ways"].items():
                same = "" if first else ("yes" if r["identical_results"][way] else "NO")
                t.add_row(name if first else "", ", ".join(r["serves"]) if first else "", way,
                          f"{timing['median_ms']:.1f}", f"{timing['min_ms']:.0f}–{timing['max_ms']:.0f}",
                          f"{timing['server_median_ms']:.1f}", f"{timing['server_read_rows']:,}", same)
                first = False
        console.print(t)
    console.print(f"load average {' '.join(m['load_average_at_start'])} at start, "
                  f"{' '.join(m['load_average_at_end'])} at end; {m['cores']} cores")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default="insert,read", help="insert,read (default both)")
    parser.add_argument("--events", type=int, default=50_000, help="insert: messages generated (resends included)")
    parser.add_argument("--customers", type=int, default=10_000, help="insert: customers of the workload")
    parser.add_argument("--batch-size", type=int, default=5_000, help="insert: the worker's default batch_size")
    parser.add_argument("--rounds", type=int, default=5, help="insert: rounds over every variant (rotated order)")
    parser.add_argument("--merge-timeout", type=float, default=20.0, help="insert: wait for merges, seconds")
    parser.add_argument("--rows", type=int, default=2_000_000, help="read: rated rows in the read store")
    parser.add_argument("--read-customers", type=int, default=1_000, help="read: customers of the read store")
    parser.add_argument("--runs", type=int, default=5, help="read: timed runs per way (after one untimed)")
    parser.add_argument("--rebuild", action="store_true", help="read: build the read store again")
    parser.add_argument("--all-hourly", action="store_true",
                        help="read: also usage_hourly for every customer over the whole period (~15 s a call)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not phases <= {"insert", "read"}:
        parser.error(f"unknown phases: {sorted(phases - {'insert', 'read'})}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks stop the server
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {"run": stamp, "command": " ".join(sys.argv), "machine": machine_info(),
                               "versions": versions(None), "source": source_fingerprint(),
                               "args": vars(args) | {"json_out": str(args.json_out)}}  # fmt: skip
    results["versions"]["pyarrow"] = pyarrow.__version__
    results["versions"].pop("kafka_broker", None)
    results["versions"].pop("java", None)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with private_server(STATE_DIR) as (dsn, pid):
        results["versions"]["clickhouse_server"] = _engine_version(dsn)
        console.print(f"private ClickHouse server pid {pid} ({results['versions']['clickhouse_server']}), "
                      f"load average {' '.join(results['machine']['load_average_at_start'])}")  # fmt: skip
        if "insert" in phases:
            results["insert"] = phase_insert(dsn, pid, args)
        if "read" in phases:
            results["read"] = phase_read(dsn, args)
    results["machine"]["load_average_at_end"] = loadavg()
    _print(results)
    out = args.json_out or RESULTS / f"store-writes-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"results: {out}")
    return 0


def _engine_version(dsn: str) -> str:
    with clickhouse_connect.get_client(dsn=dsn) as client:
        return str(client.query("SELECT version()").result_rows[0][0])


if __name__ == "__main__":
    sys.exit(main())
