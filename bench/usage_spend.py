"""`meterstream usage` with spend for 1,000 customers: one query for the period, then the pricing engine.

Builds (or reuses) a store with :func:`bench.invoice.build` — the same synthetic,
power-law month as the invoice benchmark — for ``--customers`` customers (default
1,000). The month is the previous calendar month, built as of its last day at 23:00
UTC and settled up to that day: every day is read from ``usage_settled`` but the last,
which is read live from ``usage_recent FINAL``, the shape of a mid-month store whose
worker settles closed days (built in the current month, on the 1st the whole month
would be one live day). ``--current-month`` builds the current month up to now instead
(the worst case: nothing settled yet). It times the work of ``meterstream usage``
with spend: :func:`meterstream.cs.reports.month_to_date` with the plan catalog (the
``period_usage`` query, the ``late_billed_customers`` query, and one invoice per customer
computed in Python). CLI start-up (imports, settings) is not part of the figure.

Beside it, for diagnosis: the same report the old way (an ``invoice_from_store`` per
customer: four saved queries each) on a sample of customers, extrapolated to all of
them, and a check that both ways give every sampled customer the same invoice total.
Beside the wall time: the process CPU time of each run (the engine's threads included:
chDB runs in this process), the part of it spent in the queries, the load average before
and after, and a cProfile summary of one extra run (the 15 functions with the most own
time), so a loaded run says where its time went. Standalone (run it alone, on a quiet machine)::

    .venv/bin/python -m bench.usage_spend --rows 2000000 --customers 1000 --json-out /tmp/usage.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.invoice import DEFAULT_STORE_ROOT, build, spec_for
from meterstream.billing import invoice_from_store
from meterstream.config import ClickHouseSettings
from meterstream.cs.reports import month_to_date
from meterstream.pricing.plans import load_catalog
from meterstream.storage.clickhouse import open_store
from meterstream.storage.queries import saved_query

TARGET_SECONDS = 1.0
PROFILE_LINES = 15


def _profile_summary(profile: cProfile.Profile) -> list[str]:
    """The functions with the most own time, one line each (calls, own s, cumulative s, where)."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:PROFILE_LINES]  # type: ignore[attr-defined]
    out = []
    for (filename, line, name), (_, calls, own, cumulative, _) in rows:
        where = f"{Path(filename).name}:{line}({name})" if line else name
        out.append(f"{calls:>7} calls  own {own:7.3f} s  cum {cumulative:7.3f} s  {where}")
    return out


def measure(store_dir: Path, runs: int, sample: int) -> dict[str, Any]:
    meta = json.loads((store_dir / "bench-spec.json").read_text())
    period = meta["period"]
    store = open_store(ClickHouseSettings(dsn=f"chdb://{store_dir / 'clickhouse'}"))
    catalog = load_catalog(None)
    calls: list[str] = []
    in_queries = [0.0, 0.0]  # wall, CPU seconds inside store.query (this run)

    def run(name: str, **params: str) -> Any:
        calls.append(name)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return store.query(saved_query(name), params)
        finally:
            in_queries[0] += time.perf_counter() - wall
            in_queries[1] += time.process_time() - cpu

    load_before = os.getloadavg()
    try:
        result = month_to_date(run, catalog, period)  # first run: caches warm, not timed
        customers = len(result.rows)
        timings, cpu_times, query_walls, query_cpus = [], [], [], []
        for _ in range(runs):
            calls.clear()
            in_queries[:] = [0.0, 0.0]
            started, cpu = time.perf_counter(), time.process_time()
            result = month_to_date(run, catalog, period)
            timings.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu)
            query_walls.append(in_queries[0])
            query_cpus.append(in_queries[1])
        queries = list(calls)
        profile = cProfile.Profile()
        profile.enable()
        month_to_date(run, catalog, period)
        profile.disable()
        totals = {r["customer_id"]: r["spend"] for r in result.rows}

        # The old way on a sample (every k-th customer by usage), extrapolated.
        step = max(1, customers // sample)
        sampled = [r["customer_id"] for r in result.rows[::step]][:sample]
        started = time.perf_counter()
        old = {c: invoice_from_store(run, catalog, c, period).total for c in sampled}
        old_seconds = time.perf_counter() - started
        same = all(old[c] == totals[c] for c in sampled)
    finally:
        store.close()
    load_after = os.getloadavg()
    median = statistics.median(timings)

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 1)
    return {
        "store": str(store_dir),
        "build": meta,
        "period": period,
        "customers": customers,
        "problems": result.problems,
        "figure": "reports.month_to_date with spend (what `meterstream usage` runs), all customers",
        "usage_with_spend": {
            "median_ms": round(median * 1000, 1),
            "min_ms": round(min(timings) * 1000, 1),
            "max_ms": round(max(timings) * 1000, 1),
            "runs": runs,
            "queries": queries,
            "median_cpu_ms": ms(cpu_times),
            "median_query_wall_ms": ms(query_walls),
            "median_query_cpu_ms": ms(query_cpus),
            "median_python_wall_ms": ms([t - q for t, q in zip(timings, query_walls, strict=True)]),
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "profile_top_own_time": _profile_summary(profile),
        "target_seconds": TARGET_SECONDS,
        "meets_target": median <= TARGET_SECONDS,
        "diagnostic_invoice_per_customer": {
            "sampled_customers": len(sampled),
            "seconds": round(old_seconds, 2),
            "extrapolated_seconds_for_all": round(old_seconds / len(sampled) * customers, 1) if sampled else None,
            "same_totals_as_one_query": same,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=5, help="timed runs (after one untimed first run)")
    parser.add_argument("--sample", type=int, default=20, help="customers timed the old way (diagnostic)")
    parser.add_argument("--store", type=Path, default=None, help="default .local/bench/usage-<rows>-<customers>")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--current-month", action="store_true",
                        help="build the current month up to now (nothing settled on its first day)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    mode = "current" if args.current_month else "last-month"
    store_dir = args.store or DEFAULT_STORE_ROOT / f"usage-{args.rows}-{args.customers}-{mode}"
    now = datetime.now(timezone.utc)
    as_of = None if args.current_month else (now.replace(day=1, hour=23, minute=0, second=0, microsecond=0)
                                             - timedelta(days=1))  # fmt: skip
    marker = store_dir / "bench-spec.json"
    reused = False
    if not args.rebuild and marker.is_file():
        meta = json.loads(marker.read_text())
        reused = all(meta.get(k) == v for k, v in spec_for(args.rows, args.customers).items())
        reused = reused and (as_of is None or meta.get("period") == f"{as_of:%Y-%m}")
    if not reused:
        build(store_dir, args.rows, args.customers, now=as_of)
    result = measure(store_dir, args.runs, args.sample)
    result["store_reused"] = reused
    text = json.dumps(result, indent=2, default=str)
    if args.json_out:
        args.json_out.write_text(text)
    print(text)
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
