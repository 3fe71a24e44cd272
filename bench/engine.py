"""The worker's engine alone: CPU per stored event, batch engine against the per-event path, one run.

``python -m bench.engine`` feeds the benchmark's workload (bench/workload.py: the bytes the SDK
writes, 10,000 customers by default) through what the worker does to a batch between the
consumer and the store, without Kafka or ClickHouse, and times it with the process's CPU clock:

- **engine**: ``BatchProcessor.process`` (decode as columns, dedupe, rate with the batch
  engine, aggregate, thresholds) then the two Arrow tables the insert sends
  (``raw_table``, ``ordered_rated_table``) and the batch id, batches of 5,000;
- **per event** (the reference, same run, same messages): what the worker did before the
  engine, one event at a time: ``decode_event`` (pydantic), dedupe, ``rate_event`` (the
  oracle, ``Decimal``), a ``RatedUsage`` and a ``RawEvent`` per event, the same Arrow tables
  built from those objects.

Both must store the same credits (checked). Python's automatic garbage collector is off, as in the
worker process (``--python-gc`` keeps it on: ~30% more CPU per event for the engine). The output gives µs of CPU per event for each
stage, the ratio, the machine and its load average, and (``--profile``) the top functions of
the engine from cProfile; ``--output`` writes it as JSON (default
``bench/results/engine-<timestamp>.json``). Timing is CPU time of this process (a busy
machine slows it less than wall time, but not at all is not promised: state the load).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.workload import generate, serialize
from meterstream.budgets import Budget, BudgetBook
from meterstream.pricing.engine import RatedBatch, units
from meterstream.pricing.plans import load_catalog
from meterstream.pricing.rating import rate_event
from meterstream.schemas.records import RatedUsage, RawBatch, RawEvent
from meterstream.storage.batches import batch_id, ordered_rated_table, sources_of
from meterstream.storage.columns import raw_table
from meterstream.stream_processors.app import take_over_garbage_collection
from meterstream.stream_processors.decode import Rejection, decode_event, received_at
from meterstream.stream_processors.processing import BatchProcessor, InboundMessage, MonthToDate, RecentIds


def _messages(n: int, customers: int, seed: int) -> tuple[list[InboundMessage], datetime]:
    workload = generate(n, customers, seed=seed, backlog_seconds=1800)
    now = datetime.now(timezone.utc)
    stamp = int(now.timestamp() * 1000)
    messages = [
        InboundMessage(kind, value, f"{kind}.events", i % 3, i, stamp)  # type: ignore[arg-type]
        for i, (kind, _, value) in enumerate(serialize(workload))
    ]
    return messages, now


def _engine(messages: list[InboundMessage], now: datetime, batch: int, budgets: BudgetBook) -> int:
    """The batch engine: returns the credits stored, in 10**-18."""
    processor = BatchProcessor(load_catalog(), budgets, seen=RecentIds(), clock=lambda: now)
    totals: dict[str, MonthToDate] = {}
    credits = 0
    for start in range(0, len(messages), batch):
        result = processor.process(messages[start : start + batch], lambda key: totals.get(key, MonthToDate()), now)
        raw_table(result.raw, now)
        ordered_rated_table(result.rated, sources_of(result.raw, result.rated), now,
                            batch_id(result.raw, result.rated, [a.alert_id for a in result.alerts]))  # fmt: skip
        totals.update(result.month_to_date)
        processor.commit(result)
        credits += sum(result.rated.credits)
    return credits


def _per_event(messages: list[InboundMessage], now: datetime, batch: int) -> int:
    """The per-event path (the oracle): a model, a rated row and a raw record per event."""
    catalog = load_catalog()
    seen: set[str] = set()
    credits = 0
    for start in range(0, len(messages), batch):
        raw: list[RawEvent] = []
        rated: list[RatedUsage] = []
        for m in messages[start : start + batch]:
            event = decode_event(m.value, m.kind, received_at(m.timestamp_ms, now))
            if isinstance(event, Rejection):
                continue
            key = f"{event.customer_id}|{event.event_id}"
            if key in seen:
                continue
            seen.add(key)
            book, period = catalog.book_of(event.customer_id, event.occurred_at)
            row = rate_event(event, book).model_copy(update={"period": period})
            rated.append(row)
            raw.append(RawEvent(event.event_id, event.customer_id, m.kind, row.occurred_at, period, m.value or b"",
                                m.topic, m.partition, m.offset))  # fmt: skip
        raw_batch, rated_batch = RawBatch.of(raw), RatedBatch.of(rated)
        raw_table(raw_batch, now)
        ordered_rated_table(rated_batch, sources_of(raw_batch, rated_batch), now, batch_id(raw_batch, rated_batch, []))
        credits += sum(units(r.credits) for r in rated)
    return credits


def _cpu(run: Callable[[], int]) -> tuple[float, int]:
    started = time.process_time()
    credits = run()
    return time.process_time() - started, credits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=150_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budgets", action="store_true", help="every customer has a budget (thresholds checked per event)")
    parser.add_argument("--profile", action="store_true", help="cProfile one extra engine run")
    parser.add_argument("--python-gc", action="store_true",
                        help="keep Python's automatic garbage collector on (the worker turns it off and collects "
                             "every WORKER__GC_COLLECT_SECONDS; by default this benchmark does as the worker does)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    messages, now = _messages(args.events, args.customers, seed=2)
    if not args.python_gc:
        take_over_garbage_collection()  # as `meterstream worker` does: the figures are the worker's
    budgets = BudgetBook(default=Budget(monthly_credits=1000)) if args.budgets else BudgetBook()
    load = os.getloadavg()
    engine_s, per_event_s = [], []
    for rep in range(args.reps):
        seconds, engine_credits = _cpu(lambda: _engine(messages, now, args.batch, budgets))
        engine_s.append(seconds)
        seconds, oracle_credits = _cpu(lambda: _per_event(messages, now, args.batch))
        per_event_s.append(seconds)
        if engine_credits != oracle_credits:
            raise SystemExit(f"the engine stored {engine_credits}e-18 credits, the per-event path {oracle_credits}e-18")
        print(f"rep {rep + 1}/{args.reps}: engine {engine_s[-1] / len(messages) * 1e6:.1f} µs/event, "
              f"per event {per_event_s[-1] / len(messages) * 1e6:.1f} µs/event (CPU)")  # fmt: skip
    result: dict[str, Any] = {
        "run_id": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "machine": {"cpu_count": os.cpu_count(), "load_average_start": load, "load_average_end": os.getloadavg()},
        "events": len(messages), "customers": args.customers, "batch": args.batch, "budgets": args.budgets,
        "automatic_gc": args.python_gc,
        "engine_cpu_us_per_event": round(statistics.median(engine_s) / len(messages) * 1e6, 2),
        "per_event_cpu_us_per_event": round(statistics.median(per_event_s) / len(messages) * 1e6, 2),
        "engine_events_per_cpu_second": round(len(messages) / statistics.median(engine_s)),
        "per_event_events_per_cpu_second": round(len(messages) / statistics.median(per_event_s)),
        "reps": {"engine_s": engine_s, "per_event_s": per_event_s},
    }  # fmt: skip
    result["speedup"] = round(result["per_event_cpu_us_per_event"] / result["engine_cpu_us_per_event"], 2)
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(_engine, messages, now, args.batch, budgets)
        stats = pstats.Stats(profile)
        total = sum(row[2] for row in stats.stats.values())  # type: ignore[attr-defined]
        top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:25]  # type: ignore[attr-defined]
        result["engine_profile_self"] = [
            {"function": f"{func[2]} ({Path(func[0]).name}:{func[1]})", "self_percent": round(100 * row[2] / total, 1)}
            for func, row in top
        ]
        for line in result["engine_profile_self"]:
            print(f"  {line['self_percent']:5.1f}%  {line['function']}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("reps", "engine_profile_self")}, indent=1))
    output = args.output or Path("bench/results") / f"engine-{result['run_id']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
