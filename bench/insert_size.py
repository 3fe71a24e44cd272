"""What one store write costs against its size: why the worker's writes linger and go together.

    .venv/bin/python -m bench.insert_size                        # batches of 50, 200, 1,000, 5,000 events
    .venv/bin/python -m bench.insert_size --sizes 100,2000 --events 20000

The worker's batches (``bench.store_writes.rated_workload``: the benchmark's workload rated by
``BatchProcessor``, budgets every customer with 20 events or more crosses) are written with
:meth:`ClickHouseStore.insert_batch` (events_raw, usage_rated and its views, budget_alerts) to a
fresh database of a **private ClickHouse server** (``bench.store_writes.private_server``), once
per batch size. Per size: the server process's CPU (``/proc/<pid>/stat``) per write and per event
over the writes and until merges are quiet, the client's CPU and the wall time per write.
A write's fixed cost is what ``WorkerSettings.insert_linger_seconds`` and the coalescing of the
writes in hand (``stream_processors/app.py``) save. No figure here is asserted by a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.run import machine_info, source_fingerprint
from bench.store_writes import _merges_quiet, loadavg, private_server, process_cpu_seconds, rated_workload
from meterstream.config import ClickHouseSettings
from meterstream.storage.clickhouse import open_store

RESULTS = Path(__file__).parent / "results"


def measure(dsn: str, pid: int, events: int, customers: int, size: int, merge_timeout: float) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    work = rated_workload(events, customers, now, size)
    database = f"isz_{uuid.uuid4().hex[:10]}"
    store = open_store(ClickHouseSettings(dsn=dsn, database=database))
    walls, cpus = [], []
    server_before = process_cpu_seconds(pid)
    for batch in work.batches:
        wall, cpu = time.perf_counter(), time.thread_time()
        store.insert_batch(batch.raw, batch.rated, batch.alerts)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    server_inserts = process_cpu_seconds(pid) - server_before
    quiet_after = _merges_quiet(store.client, database, merge_timeout)
    server_all = process_cpu_seconds(pid) - server_before
    store.client.command(f"DROP DATABASE {database}")
    writes, stored = len(walls), work.events
    return {
        "batch_size": size,
        "writes": writes,
        "events": stored,
        "server_cpu_ms_per_write": round(server_inserts / writes * 1000, 1),
        "server_cpu_ms_per_write_with_merges": round(server_all / writes * 1000, 1),
        "server_cpu_us_per_event_with_merges": round(server_all / stored * 1e6, 1),
        "client_cpu_ms_per_write_median": round(statistics.median(cpus) * 1000, 1),
        "wall_ms_per_write_median": round(statistics.median(walls) * 1000, 1),
        "merges_quiet_after_s": quiet_after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50,200,1000,5000", help="batch sizes (events per write)")
    parser.add_argument("--events", type=int, default=30_000, help="messages generated per size")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--merge-timeout", type=float, default=30.0)
    parser.add_argument("--state-dir", type=Path, default=Path(".local/bench/insert-size"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = datetime.now(timezone.utc)
    out: dict[str, Any] = {"machine": machine_info(), "source": source_fingerprint(), "load_average_start": loadavg(),
                           "events": args.events, "customers": args.customers, "sizes": []}  # fmt: skip
    with private_server(args.state_dir) as (dsn, pid):
        for size in sizes:
            result = measure(dsn, pid, args.events, args.customers, size, args.merge_timeout)
            out["sizes"].append(result)
            print(f"batch {size:>6,}: {result['writes']:>4} writes; server {result['server_cpu_ms_per_write']} ms CPU "
                  f"per write ({result['server_cpu_ms_per_write_with_merges']} with merges, "
                  f"{result['server_cpu_us_per_event_with_merges']} µs per event); client "
                  f"{result['client_cpu_ms_per_write_median']} ms CPU, wall {result['wall_ms_per_write_median']} ms",
                  flush=True)  # fmt: skip
    out["load_average_end"] = loadavg()
    path = args.output or RESULTS / f"insert-size-{started:%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
