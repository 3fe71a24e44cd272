"""Hard caps under load: P processes x T threads of guarded model calls against one customer's cap.

    .venv/bin/python -m bench.caps                      # 1x32, 4x8, 8x8, with and without the ledger
    .venv/bin/python -m bench.caps --shapes 4x8 --cap 3000 --no-compare

Each caller loops: ``guard.check`` (estimate: 2,000 input tokens + ``max_tokens``
output, gpt-4o: 2 credits), a simulated model call of 0-``--call-ms`` ms, the
usage event with a random output of 0..``max_tokens`` tokens (1-2 credits), and
``guard.settle``; blocked callers try again every 20 ms until the run ends. Each
process has its own guard (its own view of ``enforcement-state``) and SDK
client; with ``--ledger`` they share the Redis reservation ledger, which the
worker settles after each write. Reported per shape: credits stored by the worker
against the cap (overshoot in credits and % of the cap), calls allowed, and the
time from the first refusal (the crossing) to the last call allowed.

Uses the running broker (``METERSTREAM_KAFKA__BOOTSTRAP_SERVERS``), its own
topics, worker, embedded store and redis-server (``make redis``), all removed at
the end. ``run_trial`` is also what ``tests/system/test_ledger.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "gpt-4o"
INPUT_TOKENS = 2000


@dataclass
class TrialResult:
    shape: str
    ledger: bool
    cap: Decimal
    stored: Decimal
    allowed: int
    blocked_reasons: dict[str, int]
    first_block_after_s: float | None
    last_allowed_after_block_s: float
    #: From the moment the calls allowed so far reached the cap to the last call allowed (0: never passed).
    crossing_to_all_blocked_s: float
    #: Sum over allowed calls of (actual - estimate): <= 0 when max_tokens bounds the output.
    estimation_error: Decimal

    @property
    def overshoot(self) -> Decimal:
        return max(Decimal(0), self.stored - self.cap)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(overshoot=self.overshoot, overshoot_percent=self.overshoot * 100 / self.cap)
        return json.loads(json.dumps(data, default=str))


def _callers(kafka: dict[str, Any], redis_url: str | None, customer: str, threads: int, duration: float,
             max_tokens: int, call_ms: int, seed: int, out: Any) -> None:  # fmt: skip
    """One process: a guard, an SDK client and ``threads`` callers."""
    from meterstream.config import KafkaSettings
    from meterstream.pricing.plans import load_catalog
    from meterstream.producers import BudgetGuard, MeterClient, RedisLedger

    settings = KafkaSettings(**kafka)
    ledger = RedisLedger(redis_url) if redis_url else None
    guard = BudgetGuard(settings, catalog=load_catalog(), ledger=ledger, use_configured_ledger=False).start(30)
    deadline = time.monotonic() + 30
    while customer not in guard.view.states and time.monotonic() < deadline:
        time.sleep(0.05)
    meter = MeterClient(settings)
    lock = threading.Lock()
    allowed: list[float] = []
    blocks: dict[str, int] = {}
    first_block: list[float] = []
    error = [Decimal(0)]
    end = time.monotonic() + duration

    def caller(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < end:
            decision = guard.check(customer, MODEL, input_tokens=INPUT_TOKENS, output_tokens=max_tokens)
            if decision.blocked:
                with lock:
                    blocks[decision.code.value] = blocks.get(decision.code.value, 0) + 1
                    if not first_block:
                        first_block.append(time.time())
                time.sleep(0.02)
                continue
            time.sleep(rng.uniform(0, call_ms / 1000))
            event = meter.record_llm_call(customer, decision.model, input_tokens=INPUT_TOKENS,
                                          output_tokens=rng.randint(0, max_tokens))  # fmt: skip
            actual = guard.catalog.rate(event).credits
            guard.settle(decision, event)
            with lock:
                allowed.append((time.time(), str(actual)))
                error[0] += actual - decision.estimated_credits

    workers = [threading.Thread(target=caller, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration + 60)
    meter.close()
    guard.stop()
    out.put({"allowed": allowed, "blocks": blocks, "first_block": first_block[0] if first_block else None,
             "error": str(error[0]), "sent": meter.sent, "failed": meter.failed})  # fmt: skip


def run_trial(
    kafka: Any, customer: str, cap: Decimal, processes: int, threads: int, *, redis_url: str | None,
    duration: float, wait_processed: Any, stored_credits: Any, max_tokens: int = 500, call_ms: int = 50,
) -> TrialResult:  # fmt: skip
    """Run P x T callers for ``duration`` seconds; ``wait_processed(n)`` waits for the worker, ``stored_credits()`` reads it."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    kafka_fields = json.loads(kafka.model_dump_json())
    if kafka.sasl_password is not None:
        kafka_fields["sasl_password"] = kafka.sasl_password.get_secret_value()
    procs = [
        context.Process(target=_callers, args=(kafka_fields, redis_url, customer, threads, duration, max_tokens,
                                               call_ms, seed, out))  # fmt: skip
        for seed in range(processes)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration + 180) for _ in procs]
    for p in procs:
        p.join(60)
    sent = sum(r["sent"] for r in results)
    assert all(r["failed"] == 0 for r in results), "events were lost on the way to the broker"
    wait_processed(sent)
    stored = stored_credits()
    calls = sorted((t, Decimal(c)) for r in results for t, c in r["allowed"])
    allowed = [t for t, _ in calls]
    running, crossing = Decimal(0), None
    for t, credits in calls:
        running += credits
        if crossing is None and running > cap:
            crossing = t
    blocks: dict[str, int] = {}
    for r in results:
        for code, n in r["blocks"].items():
            blocks[code] = blocks.get(code, 0) + n
    firsts = [r["first_block"] for r in results if r["first_block"] is not None]
    first_block = min(firsts) if firsts else None
    start = min(allowed) if allowed else None
    return TrialResult(
        shape=f"{processes}x{threads}", ledger=redis_url is not None, cap=cap, stored=stored, allowed=len(allowed),
        blocked_reasons=blocks,
        first_block_after_s=None if first_block is None or start is None else round(first_block - start, 2),
        last_allowed_after_block_s=0.0 if first_block is None or not allowed else round(max(0.0, allowed[-1] - first_block), 2),
        estimation_error=sum((Decimal(r["error"]) for r in results), Decimal(0)),
        crossing_to_all_blocked_s=0.0 if crossing is None else round(allowed[-1] - crossing, 2),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1x32,4x8,8x8", help="processes x threads, comma-separated")
    parser.add_argument("--cap", type=Decimal, default=Decimal(3000), help="the hard cap in credits")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds each trial's callers run")
    parser.add_argument("--no-compare", action="store_true", help="skip the runs without the ledger")
    args = parser.parse_args()

    from meterstream.config import ClickHouseSettings, Settings
    from meterstream.services.redis import RedisServer, free_port
    from meterstream.storage.queries import run_saved_query
    from meterstream.stream_processors.runner import WorkerProcess
    from meterstream.topics import ensure_topics

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    modes = [True] if args.no_compare else [True, False]
    root = Path(tempfile.mkdtemp(prefix="bench-caps-"))
    name = f"caps{uuid.uuid4().hex[:8]}"
    kafka = Settings().kafka.model_copy(update={"topic_prefix": f"{name}."})
    ensure_topics(kafka)
    redis = RedisServer(root / "redis").start()
    customers = {f"c{p}x{t}-{'ledger' if m else 'local'}": (p, t, m) for p, t in shapes for m in modes}
    budgets = root / "budgets.yaml"
    budgets.write_text("customers:\n" + "".join(
        f"  {c}: {{monthly_credits: '{args.cap}', thresholds: [100], action: block}}\n" for c in customers))  # fmt: skip
    clickhouse = ClickHouseSettings(dsn=f"chdb://{root / 'clickhouse'}")
    port = free_port()
    env = {
        "METERSTREAM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "METERSTREAM_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "METERSTREAM_CLICKHOUSE__DSN": clickhouse.dsn.get_secret_value(), "METERSTREAM_WORKER__APP_ID": name,
        "METERSTREAM_WORKER__WEB_PORT": str(port), "METERSTREAM_WORKER__DATA_DIR": str(root / "worker"),
        "METERSTREAM_WORKER__BUDGETS_FILE": str(budgets), "METERSTREAM_WORKER__BATCH_TIMEOUT": "0.2",
        "METERSTREAM_LEDGER__REDIS_URL": redis.url,
    }  # fmt: skip
    worker = WorkerProcess(env, port, root / "worker.log").start(ready_timeout=120)
    processed = [0]

    def wait_processed(n: int) -> None:
        processed[0] += n
        worker.wait_for(processed[0], timeout=300)

    results = []
    try:
        for customer, (p, t, with_ledger) in customers.items():
            period = datetime.now(timezone.utc).strftime("%Y-%m")

            def stored(customer: str = customer, period: str = period) -> Decimal:
                rows = run_saved_query(clickhouse, "month_to_date", period=period, customer=customer).dicts()
                return rows[0]["usage_credits"] + rows[0]["outcome_credits"] if rows else Decimal(0)  # budget credits

            result = run_trial(kafka, customer, args.cap, p, t, redis_url=redis.url if with_ledger else None,
                               duration=args.duration, wait_processed=wait_processed, stored_credits=stored)  # fmt: skip
            results.append(result.as_dict())
            print(json.dumps(result.as_dict()), flush=True)
    finally:
        worker.stop()
        redis.stop()
    out = Path(__file__).parent / "results" / f"caps-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
