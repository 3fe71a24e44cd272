"""Backfill benchmark: ``meterstream import``'s events/s beside bare confluent-kafka, in one run.

    .venv/bin/python -m bench.backfill                     # 300,000 events, JSON Lines
    .venv/bin/python -m bench.backfill --events 1000000 --formats jsonl,csv,parquet

For each format, the whole import as the command runs it — scan (validate every
record), read the stored ids of the file's customers and periods from a fresh store
(the ``stored_event_ids`` saved query), send every event and wait for the broker to
confirm each one — timed end to end, beside the **reference**: a bare
confluent-kafka ``Producer`` with the same settings producing the same lines,
already in memory, keyed by customer. Both go to the broker in the settings
(``METERSTREAM_KAFKA__BOOTSTRAP_SERVERS``, 127.0.0.1:9092 by default) on topics of
their own, deleted afterwards. Prints the machine, load and versions; writes
``bench/results/backfill-<timestamp>.json``. No figure here is asserted by a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from bench.run import machine_info, versions
from meterstream.config import ClickHouseSettings, Settings
from meterstream.producers import backfill
from meterstream.storage.clickhouse import open_store
from meterstream.storage.queries import saved_query
from meterstream.topics import ensure_topics

RESULTS = Path(__file__).parent / "results"
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "claude-haiku-4-5", "gpt-5-mini"]


def write_events(directory: Path, n: int, formats: list[str]) -> dict[str, Path]:
    """``n`` token events over the 30 days before 2026-10-01 for 500 customers, in each format."""
    rng = random.Random(7)
    start = datetime(2026, 9, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(n):
        prompt = rng.randrange(100, 30_000)
        rows.append({"event_id": f"bf-{i:09d}", "customer_id": f"cust-{rng.randrange(500):04d}",
                     "occurred_at": (start + timedelta(seconds=rng.randrange(30 * 86_400))).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "model": rng.choice(MODELS), "input_tokens": prompt, "cached_input_tokens": prompt // 5,
                     "output_tokens": rng.randrange(10, 3_000), "workflow_id": "agent", "run_id": f"run-{i // 4}"})  # fmt: skip
    paths: dict[str, Path] = {}
    if "jsonl" in formats:
        paths["jsonl"] = directory / "events.jsonl"
        paths["jsonl"].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    if "csv" in formats:
        import csv

        paths["csv"] = directory / "events.csv"
        with paths["csv"].open("w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if "parquet" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths["parquet"] = directory / "events.parquet"
        pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


def cpu_seconds() -> float:
    """CPU time of this process (librdkafka's threads included) and of its reaped children (scan workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def reference(settings: Settings, lines: list[bytes]) -> dict[str, Any]:
    """Bare confluent-kafka: the same bytes, already in memory, same producer settings."""
    kafka = settings.kafka.model_copy(update={"topic_prefix": f"bfref{uuid.uuid4().hex[:8]}."})
    topic = ensure_topics(kafka).usage.name
    producer = Producer(backfill._producer_config(kafka))
    keys = [orjson.loads(line)["customer_id"].encode() for line in lines]
    started, cpu = time.perf_counter(), cpu_seconds()
    produce, poll = producer.produce, producer.poll
    for i, (line, key) in enumerate(zip(lines, keys, strict=True)):
        while True:
            try:
                produce(topic, line, key)
                break
            except BufferError:
                poll(0.05)
        if i % 10_000 == 0:
            poll(0)
    assert producer.flush(120) == 0
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    _delete_topics(settings, kafka.topic_prefix)
    return {"events": len(lines), "seconds": round(seconds, 3), "events_per_second": round(len(lines) / seconds),
            "cpu_seconds": round(cpu, 3), "events_per_cpu_second": round(len(lines) / cpu)}


def run_import(settings: Settings, path: Path, fmt: str, store_dir: Path, workers: int) -> dict[str, Any]:
    kafka = settings.kafka.model_copy(update={"topic_prefix": f"bfimp{uuid.uuid4().hex[:8]}."})
    ensure_topics(kafka)
    store = open_store(ClickHouseSettings(dsn=f"chdb://{store_dir}", database=f"bf_{uuid.uuid4().hex[:8]}"))
    try:
        started, cpu = time.perf_counter(), cpu_seconds()
        scanned = backfill.scan(path, fmt, workers=workers)  # type: ignore[arg-type]
        t_scan = time.perf_counter()
        stored = backfill.stored_keys(lambda name, **p: store.query(saved_query(name), p), scanned)
        t_stored = time.perf_counter()
        sent = backfill.send(scanned, stored, kafka)
        done, cpu = time.perf_counter(), cpu_seconds() - cpu
    finally:
        store.close()
        _delete_topics(settings, kafka.topic_prefix)
    assert sent.delivered == scanned.valid and not sent.failed, (sent.delivered, scanned.valid, sent.failed[:3])
    total = done - started
    return {"format": fmt, "events": scanned.valid, "seconds": round(total, 3),
            "events_per_second": round(scanned.valid / total),
            "scan_seconds": round(t_scan - started, 3), "stored_ids_seconds": round(t_stored - t_scan, 3),
            "send_seconds": round(done - t_stored, 3), "scan_workers": workers, "cpu_seconds": round(cpu, 3),
            "events_per_cpu_second": round(scanned.valid / cpu)}  # fmt: skip


def _delete_topics(settings: Settings, prefix: str) -> None:
    admin = AdminClient(settings.kafka.confluent_config())
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if names:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            future.exception(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--formats", default="jsonl", help="comma-separated: jsonl,csv,parquet")
    parser.add_argument("--scan-workers", type=int, default=None, help="default: one per core, at most 4")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    settings = Settings()
    console = Console()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-backfill-") as tmp:
        directory = Path(tmp)
        console.print(f"writing {args.events:,} events ({', '.join(formats)}) ...")
        paths = write_events(directory, args.events, formats)
        lines = (paths["jsonl"].read_bytes().splitlines() if "jsonl" in paths
                 else [orjson.dumps(r) for r in []])  # fmt: skip
        if not lines:
            lines = write_events(directory, args.events, ["jsonl"])["jsonl"].read_bytes().splitlines()
        console.print("reference: bare confluent-kafka ...")
        ref = reference(settings, lines)
        imports = []
        for fmt, path in paths.items():
            console.print(f"meterstream import ({fmt}) ...")
            workers = args.scan_workers if args.scan_workers is not None else min(os.cpu_count() or 1, 4)
            imports.append(run_import(settings, path, fmt, directory / f"store-{fmt}", workers))
        machine["load_average_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results = {"at": datetime.now(timezone.utc).isoformat(), "machine": machine, "versions": versions(None),
               "broker": settings.kafka.bootstrap_servers, "reference": ref, "imports": imports}  # fmt: skip
    table = Table(title=f"Backfill, {args.events:,} events ({machine['cores']} cores, {machine['cpu_model']}, "
                        f"load {' '.join(machine['load_average_at_start'])})")  # fmt: skip
    for column in ("what", "events/s", "s", "scan s", "ids s", "send s", "vs ref", "events/cpu-s"):
        table.add_column(column, justify="left" if column == "what" else "right")
    table.add_row("bare confluent-kafka", f"{ref['events_per_second']:,}", f"{ref['seconds']}", "", "", "", "1.00",
                  f"{ref['events_per_cpu_second']:,}")  # fmt: skip
    for r in imports:
        table.add_row(f"import {r['format']} ({r['scan_workers']} scan proc)", f"{r['events_per_second']:,}",
                      f"{r['seconds']}", f"{r['scan_seconds']}", f"{r['stored_ids_seconds']}", f"{r['send_seconds']}",
                      f"{r['events_per_second'] / ref['events_per_second']:.2f}", f"{r['events_per_cpu_second']:,}")  # fmt: skip
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"backfill-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
