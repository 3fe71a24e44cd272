"""Ingestion benchmark: the SDK (single and batch) and ``meterstream import``, each beside bare confluent-kafka.

    .venv/bin/python -m bench.ingest                          # all phases (~1-2 min on a quiet 2-core machine)
    .venv/bin/python -m bench.ingest --phases sdk-single      # one phase alone
    .venv/bin/python -m bench.ingest --phases sdk-many --profile   # + a py-spy profile of an extra run

Phases (issues 16 and 19):

- ``sdk-single``: validated events/s through ``MeterClient.record(UsageEvent(**fields))``
  (build the pydantic event from its fields, as an application does, then record), flush
  and every delivery confirmed (``delivered == n``, ``failed == 0``);
- ``sdk-many``: the same events through ``MeterClient.record_many(batch of field dicts)``
  (validation included), batches of ``--batch`` events, every delivery confirmed;
- ``import``: ``meterstream import`` end to end (scan, stored ids, send, broker
  confirmations) for JSON Lines, CSV and Parquet (``bench/backfill.py``'s run), with the
  CPU µs per event of the import (its scan processes and librdkafka's threads included)
  and of the bare producer, and a cProfile of one extra import per format in one process
  (not counted: the top functions by self time, kept in the results file).

Each SDK repetition is paired with the **reference** measured right after it in the same run:
a bare confluent-kafka ``Producer`` with the SDK's settings producing the same bytes (already
serialized, in memory, keyed by customer). ``import`` has the backfill bench's reference (same
lines, the importer's producer settings). Medians over ``--reps``; the machine (cores, load
average at start and end) is printed and saved with the figures in
``bench/results/ingest-<timestamp>.json``. ``--profile`` runs each SDK phase once more under
py-spy (not counted) and prints where the time goes. Uses the broker of the settings
(``METERSTREAM_KAFKA__BOOTSTRAP_SERVERS``, 127.0.0.1:9092 by default), on topics of its
own that are deleted afterwards. No figure here is asserted by a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from bench import backfill as backfill_bench
from bench import pyspy
from bench.run import machine_info, quiet_heap, versions
from bench.workload import generate, serialize
from meterstream.config import KafkaSettings, Settings
from meterstream.producers.client import DeliveryFailure, MeterClient
from meterstream.topics import ensure_topics

RESULTS = Path(__file__).parent / "results"
TARGETS = {"sdk-single": 100_000, "sdk-many": 300_000, "import": 100_000}
console = Console()


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def reference(kafka: KafkaSettings, payloads: list[tuple[str, bytes, bytes]]) -> float:
    """Bare confluent-kafka with the SDK's producer settings, the same bytes: events/s incl. flush."""
    config = {**kafka.confluent_config(), "linger.ms": 5, "compression.type": "lz4", "message.timeout.ms": 120_000,
              **MeterClient.REQUIRED}  # fmt: skip
    topics = ensure_topics(kafka)
    usage, outcomes = topics.usage.name, topics.outcomes.name
    producer = Producer(config)
    producer.produce(usage, payloads[0][2], payloads[0][1])  # warm up: connection and producer id
    if producer.flush(30):
        raise RuntimeError("reference warm-up not confirmed within 30 s")
    produce, poll = producer.produce, producer.poll
    started = time.perf_counter()
    for kind, key, value in payloads:
        topic = outcomes if kind == "outcome" else usage
        while True:
            try:
                produce(topic, value, key)
                break
            except BufferError:
                poll(0.05)
    if producer.flush(120):
        raise RuntimeError("reference: messages unconfirmed after 120 s")
    return len(payloads) / (time.perf_counter() - started)


def timed_sdk(kafka: KafkaSettings, send: Callable[[MeterClient], None], n: int, warmup: Any) -> float:
    """events/s of ``send`` through a warmed-up MeterClient, flush included, every delivery checked."""
    failures: list[DeliveryFailure] = []
    meter = MeterClient(kafka, on_delivery_error=failures.append)
    try:
        meter.record(warmup)
        if meter.flush(30):
            raise RuntimeError("SDK warm-up not confirmed within 30 s")
        started = time.perf_counter()
        send(meter)
        remaining = meter.flush(120)
        elapsed = time.perf_counter() - started
    finally:
        meter.close(30)
    if remaining or failures or meter.delivered != n + 1 or meter.failed:
        raise RuntimeError(f"{meter.delivered - 1} of {n} confirmed, {len(failures)} failed, {remaining} pending")
    return n / elapsed


def phase_sdk(settings: Settings, which: str, events: int, reps: int, batch: int, profile: bool,
              run_dir: Path) -> dict[str, Any]:  # fmt: skip
    with quiet_heap():
        workload = generate(events, 1_000, seed=1)
        payloads = serialize(workload)
        specs = workload.messages
        dicts = [spec.fields if spec.kind == "usage" else {**spec.fields, "type": "outcome"} for spec in specs]
    n = len(specs)
    kafka = settings.kafka.model_copy(update={"topic_prefix": f"bing{uuid.uuid4().hex[:8]}."})
    ensure_topics(kafka)
    warmup = specs[0].build()

    def single(meter: MeterClient) -> None:
        record = meter.record
        for spec in specs:
            record(spec.build())

    def many(meter: MeterClient) -> None:
        record_many = meter.record_many
        for i in range(0, n, batch):
            record_many(dicts[i : i + batch])

    send = single if which == "sdk-single" else many
    breakdown = cpu_breakdown(specs, dicts, batch)
    console.print("  CPU µs/event without Kafka (this process, same run): "
                  + ", ".join(f"{k} {v}" for k, v in breakdown.items()))  # fmt: skip
    rates, refs = [], []
    try:
        for rep in range(reps):
            gc.collect()
            rates.append(timed_sdk(kafka, send, n, warmup))
            refs.append(reference(kafka, payloads))
            console.print(f"  {which} rep {rep + 1}/{reps}: {rates[-1]:,.0f} ev/s; bare confluent-kafka "
                          f"{refs[-1]:,.0f} ev/s (load {' '.join(loadavg())})")  # fmt: skip
        prof = None
        if profile:
            prof = profile_run(run_dir / f"{which}.pyspy.txt", lambda: timed_sdk(kafka, send, n, warmup))
    finally:
        backfill_bench._delete_topics(settings, kafka.topic_prefix)
    median, ref = statistics.median(rates), statistics.median(refs)
    return {"phase": which, "events": n, "reps": reps, "batch": batch if which == "sdk-many" else 1,
            "events_per_s": {"median": round(median), "all": [round(r) for r in rates]},
            "reference_events_per_s": {"median": round(ref), "all": [round(r) for r in refs]},
            "share_of_reference": round(median / ref, 3), "target": TARGETS[which],
            "cpu_us_per_event_without_kafka": breakdown, "profile": prof}  # fmt: skip


def cpu_breakdown(specs: list[Any], dicts: list[dict[str, Any]], batch: int) -> dict[str, float]:
    """CPU µs per event of each step without Kafka: the model, both serializers, the batch path (as columns,
    and with every item through the models, as before the column path: ``_MIN_GROUP`` out of reach)."""
    from meterstream.producers import client
    from meterstream.producers.client import _wire_many

    def models_only() -> None:
        saved, client._MIN_GROUP = client._MIN_GROUP, len(dicts) + 1
        try:
            [_wire_many(dicts[i : i + batch]) for i in range(0, len(dicts), batch)]
        finally:
            client._MIN_GROUP = saved

    def per_event(fn: Callable[[], object]) -> float:
        gc.disable()
        try:
            started = time.process_time()
            fn()
            return round((time.process_time() - started) / len(specs) * 1e6, 2)
        finally:
            gc.enable()

    built = [spec.build() for spec in specs]
    bare_usage, bare_outcome = models_without_python_validators()
    return {
        "build_model": per_event(lambda: [spec.build() for spec in specs]),
        "build_model without its Python validators": per_event(
            lambda: [(bare_outcome if spec.kind == "outcome" else bare_usage)(**spec.fields) for spec in specs]),
        "pydantic_dump (before)": per_event(lambda: [e.__pydantic_serializer__.to_json(e, exclude_none=True)
                                                     for e in built]),
        "wire_bytes": per_event(lambda: [e.wire_bytes() for e in built]),
        "record_many validate+bytes": per_event(lambda: [_wire_many(dicts[i : i + batch])
                                                         for i in range(0, len(dicts), batch)]),
        "record_many validate+bytes, models only": per_event(models_only),
    }


def models_without_python_validators() -> tuple[type[BaseModel], type[BaseModel]]:
    """The event models' fields and pydantic-core constraints without their Python validators (``occurred_at``'s
    wrap validator, the attributes check, the meter-shape rule, quantity's before-validator): what building a
    model per event would cost at best if every validator were native. A measuring device, not a model."""
    from meterstream.schemas.events import (
        SCHEMA_VERSION,
        AttributeValue,
        Attribution,
        Identifier,
        Meter,
        OptionalIdentifier,  # fmt: skip
        TokenCount,
    )

    class Event(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        schema_version: Literal[1] = SCHEMA_VERSION
        event_id: Identifier
        customer_id: Identifier
        occurred_at: AwareDatetime
        workflow_id: OptionalIdentifier = None
        run_id: OptionalIdentifier = None
        attributes: dict[str, AttributeValue] = Field(default_factory=dict)

    class Usage(Event):
        type: Literal["usage"] = "usage"
        meter: Meter = Meter.TOKENS
        model: OptionalIdentifier = None
        provider: OptionalIdentifier = None
        input_tokens: TokenCount = 0
        output_tokens: TokenCount = 0
        cached_input_tokens: TokenCount = 0
        quantity: Annotated[Decimal, Field(ge=0, le=Decimal("1e12"), max_digits=24, decimal_places=9)] = Decimal(0)
        unit: Annotated[str, Field(max_length=32)] | None = None

    class Outcome(Event):
        type: Literal["outcome"] = "outcome"
        outcome_type: Identifier
        attribution: Attribution
        reversal_of: OptionalIdentifier = None

    return Usage, Outcome


def profile_run(out: Path, run: Callable[[], float]) -> dict[str, Any] | None:
    """py-spy on this process during one extra run (not counted); the top functions."""
    if not pyspy.available():
        console.print("  [yellow]py-spy not installed: no profile (pip install py-spy)[/]")
        return None
    recorder = pyspy.Recorder(os.getpid(), out, rate=200)
    time.sleep(1.0)  # py-spy attaches
    try:
        rate = run()
    finally:
        recorder.stop()
    summary = pyspy.summarise(out, top=12)
    console.print(f"  profiled run (not counted): {rate:,.0f} ev/s; top self time:")
    for row in summary["top_self"][:12]:
        console.print(f"    {row['percent']:5.1f}%  {row['function']}")
    return {"raw_file": str(out), "events_per_s_under_profiler": round(rate),
            "top_self": summary["top_self"], "top_inclusive_meterstream": summary["top_inclusive_meterstream"]}


def phase_import(settings: Settings, events: int, formats: list[str], reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"phase": "import", "events": events, "target": TARGETS["import"], "formats": {}}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        directory = Path(tmp)
        paths = backfill_bench.write_events(directory, events, sorted(set(formats) | {"jsonl"}))
        lines = paths["jsonl"].read_bytes().splitlines()
        workers = min(os.cpu_count() or 1, 4)
        for fmt in formats:
            rates, refs, runs, ref_cpus = [], [], [], []
            for rep in range(reps):
                run = backfill_bench.run_import(settings, paths[fmt], fmt, directory / f"store-{fmt}-{rep}", workers)
                ref = backfill_bench.reference(settings, lines)
                rates.append(run["events_per_second"])
                refs.append(ref["events_per_second"])
                ref_cpus.append(ref["events_per_cpu_second"])
                runs.append(run)
                console.print(f"  import {fmt} rep {rep + 1}/{reps}: {rates[-1]:,} ev/s (scan {run['scan_seconds']} s, "
                              f"send {run['send_seconds']} s); bare confluent-kafka {refs[-1]:,} ev/s "
                              f"(load {' '.join(loadavg())})")  # fmt: skip
            median, ref_median = statistics.median(rates), statistics.median(refs)
            cpu = statistics.median(r["cpu_seconds"] / r["events"] * 1e6 for r in runs)
            ref_cpu = statistics.median(1e6 / r for r in ref_cpus)
            console.print(f"  import {fmt}: CPU {cpu:.1f} µs/event (scan processes and librdkafka included); "
                          f"bare confluent-kafka {ref_cpu:.1f} µs/event")  # fmt: skip
            scan_cpu = scan_cpu_us(paths[fmt], fmt)
            console.print(f"  scan {fmt}, one process, CPU µs/event: per event (every record through the model) "
                          f"{scan_cpu['per_event']}, as columns {scan_cpu['columns']}")  # fmt: skip
            prof = profile_import(settings, paths[fmt], fmt, directory / f"store-{fmt}-profile")
            out["formats"][fmt] = {"events_per_s": {"median": round(median), "all": rates},
                                   "reference_events_per_s": {"median": round(ref_median), "all": refs},
                                   "share_of_reference": round(median / ref_median, 3),
                                   "cpu_us_per_event": round(cpu, 2), "reference_cpu_us_per_event": round(ref_cpu, 2),
                                   "scan_cpu_us_per_event_one_process": scan_cpu, "runs": runs, "profile": prof}  # fmt: skip
    return out


def scan_cpu_us(path: Path, fmt: str) -> dict[str, float]:
    """CPU µs per record of the scan in this thread: the per-event path (``columns=False``) and the column-wise one.

    Thread CPU (``time.thread_time``): the scan runs in this thread alone (``workers=1``), and the
    process's other threads (the embedded store's, librdkafka's of earlier runs) are not counted.
    Best of three each, alternating.
    """
    from meterstream.producers import backfill

    out: dict[str, list[float]] = {"per_event": [], "columns": []}
    for _ in range(3):
        for name, columns in (("per_event", False), ("columns", True)):
            started = time.thread_time()
            scanned = backfill.scan(path, fmt, workers=1, columns=columns)  # type: ignore[arg-type]
            out[name].append((time.thread_time() - started) / scanned.records * 1e6)
            scanned.discard_spool()
    return {name: round(min(values), 2) for name, values in out.items()}


def profile_import(settings: Settings, path: Path, fmt: str, store_dir: Path, top: int = 12) -> dict[str, Any]:
    """cProfile of one extra import (not counted) in one process (scan included): where the time goes."""
    import cProfile
    import pstats

    from meterstream.config import ClickHouseSettings
    from meterstream.producers import backfill
    from meterstream.storage.clickhouse import open_store
    from meterstream.storage.queries import saved_query

    kafka = settings.kafka.model_copy(update={"topic_prefix": f"bfprof{uuid.uuid4().hex[:8]}."})
    ensure_topics(kafka)
    store = open_store(ClickHouseSettings(dsn=f"chdb://{store_dir}", database=f"bf_{uuid.uuid4().hex[:8]}"))
    profiler = cProfile.Profile()

    def run_import() -> int:  # what run_import times: scan, stored ids, send (one scan process here)
        scanned = backfill.scan(path, fmt, workers=1)  # type: ignore[arg-type]
        stored = backfill.stored_keys(lambda name, **p: store.query(saved_query(name), p), scanned)
        sent = backfill.send(scanned, stored, kafka)
        scanned.discard_spool()
        assert sent.delivered == scanned.valid and not sent.failed
        return sent.delivered

    try:
        started = time.perf_counter()
        events = profiler.runcall(run_import)
        run = {"events_per_second": round(events / (time.perf_counter() - started))}
    finally:
        store.close()
        backfill_bench._delete_topics(settings, kafka.topic_prefix)
    stats = pstats.Stats(profiler)
    total = sum(row[2] for row in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    top_self = [{"percent": round(100 * tt / total, 1), "seconds": round(tt, 3),
                 "function": f"{name} ({Path(file).name}:{line})" if file != "~" else name}
                for (file, line, name), (_, _, tt, _, _) in rows]  # fmt: skip
    console.print(f"  profiled import {fmt} (one process, not counted): {run['events_per_second']:,} ev/s; top self time:")
    for row in top_self:
        console.print(f"    {row['percent']:5.1f}%  {row['function']}")
    return {"events_per_s_under_profiler": run["events_per_second"], "top_self": top_self}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="sdk-single,sdk-many,import", help="comma-separated subset")
    parser.add_argument("--events", type=int, default=100_000, help="events per SDK repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each SDK phase")
    parser.add_argument("--batch", type=int, default=1_000, help="events per record_many call")
    parser.add_argument("--import-events", type=int, default=100_000)
    parser.add_argument("--import-formats", default="jsonl,csv,parquet")
    parser.add_argument("--import-reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="py-spy an extra run of each SDK phase")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(TARGETS)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))} (known: {', '.join(TARGETS)})")
    settings = Settings()
    machine = machine_info()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{stamp}-"))  # py-spy's raw stacks
    console.print(f"{machine['cores']} cores ({machine['cpu_model']}), load average {' '.join(loadavg())}")
    results: dict[str, Any] = {"at": datetime.now(timezone.utc).isoformat(), "machine": machine,
                               "versions": versions(None), "broker": settings.kafka.bootstrap_servers, "phases": {}}  # fmt: skip
    for phase in phases:
        console.print(f"[bold]{phase}[/]")
        if phase == "import":
            results["phases"][phase] = phase_import(settings, args.import_events,
                                                    [f for f in args.import_formats.split(",") if f], args.import_reps)  # fmt: skip
        else:
            results["phases"][phase] = phase_sdk(settings, phase, args.events, args.reps, args.batch, args.profile,
                                                 run_dir)  # fmt: skip
    machine["load_average_at_end"] = loadavg()
    table = Table(title=f"Ingestion ({machine['cores']} cores, load {' '.join(machine['load_average_at_start'])} "
                        f"at start, {' '.join(machine['load_average_at_end'])} at end)")  # fmt: skip
    for column in ("what", "median ev/s", "bare confluent-kafka ev/s (same run)", "share", "CPU µs/ev (bare)", "target"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for phase, r in results["phases"].items():
        if phase == "import":
            for fmt, f in r["formats"].items():
                table.add_row(f"import {fmt}", f"{f['events_per_s']['median']:,}",
                              f"{f['reference_events_per_s']['median']:,}", f"{f['share_of_reference']:.2f}",
                              f"{f['cpu_us_per_event']} ({f['reference_cpu_us_per_event']})", f"≥ {r['target']:,}")  # fmt: skip
        else:
            what = "SDK record()" if phase == "sdk-single" else f"SDK record_many (batches of {r['batch']:,})"
            table.add_row(what, f"{r['events_per_s']['median']:,}", f"{r['reference_events_per_s']['median']:,}",
                          f"{r['share_of_reference']:.2f}", "", f"≥ {r['target']:,}")  # fmt: skip
    console.print(table)
    out = RESULTS / f"ingest-{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
