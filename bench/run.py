"""meterstream benchmark: the five figures of BENCHMARKS.md, measured in one run.

    .venv/bin/python -m bench.run            # full run (~10-15 min on 2 cores)
    .venv/bin/python -m bench.run --quick    # smoke run (~3 min)
    .venv/bin/python -m bench.run --workers 2

1. SDK produce rate: validated events/s through ``MeterClient`` (build the
   pydantic event + ``record``, then ``flush``), beside a bare confluent-kafka
   ``Producer`` producing the same pre-serialized bytes with the same settings.
2. Worker end-to-end throughput: a pre-filled topic pair -> rated rows in
   ClickHouse, timed from the worker's first processed message to ``/stats/``
   messages == N, rows checked with the ``store_totals`` saved query; beside a
   bare aiokafka consumer and a bare confluent-kafka consumer of the same topics.
3. produce -> budget-alert latency (p50/p99) at a steady offered load.
3b. produce -> enforcement-state latency (p50/p99) at 500 and 5,000 events/s
   offered (``--phases state``; ``--state-rates``): states are published as
   soon as a batch is rated, before its ClickHouse insert.
4. ``invoice_usage`` invoice query for one customer-month over 10M stored rows
   (``bench/invoice.py``, in a child process; the store is cached).
5. Worker peak memory (VmHWM) with every customer of the workload active.

Uses its own Kafka broker (state in /tmp/bench-state, 127.0.0.1:19192 unless
told otherwise), started if needed and stopped at the end if it started it;
unique topic prefixes and consumer groups per run; the workers of a run share one
database on the ClickHouse server of METERSTREAM_CLICKHOUSE__DSN (the local one of
`meterstream services up` by default: started if needed, stopped if started here). Prints the
machine, the versions and a table; writes ``bench/results/<timestamp>.json``.
Every wait is bounded; every process started here is stopped on exit.

The store's write amplification (what each insert feeds: events_raw, usage_rated and its
materialized views, budget_alerts; the insert CPU of each view and the reads it buys) is
measured apart, on a private ClickHouse server: ``python -m bench.store_writes``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from bench import pyspy
from bench.workload import Workload, generate, serialize
from meterstream.config import (
    ClickHouseSettings,
    KafkaSettings,
    LocalServicesSettings,
    WorkerSettings,
    get_settings,
)
from meterstream.pricing.pricebook import load_price_book
from meterstream.pricing.rating import rate_event
from meterstream.producers.client import DeliveryFailure, MeterClient
from meterstream.storage.clickhouse import connect
from meterstream.storage.queries import run_saved_query
from meterstream.stream_processors.runner import WorkerProcess, WorkerProcessError
from meterstream.topics import Topics, ensure_topics

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
GIB = 1024**3
#: The profiled (extra, uncounted) worker run records this long, then stops.
PROFILE_SECONDS = 30.0
#: Messages the no-op Faust agent reference reads (a rate, measured on the same topics as the worker).
FAUST_AGENT_SAMPLE = 30_000

TARGETS = {
    "sdk_events_per_s": 150_000,
    "worker_events_per_s": 30_000,
    "worker_share_of_aiokafka": 0.25,
    "alert_p99_s": 1.0,
    "alert_offered_events_per_s": 5_000,
    "invoice_query_ms": 200,
    "invoice_rows": 10_000_000,
    "worker_vmhwm_bytes": GIB,
    "active_customers": 10_000,
}

console = Console(width=None if sys.stdout.isatty() else 130)


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Plan:
    customers: int
    sdk_events: int
    sdk_reps: int
    worker_events: int
    worker_reps: int
    ref_reps: int
    latency_rate: int
    latency_seconds: float
    latency_reps: int
    latency_drain_seconds: float
    invoice_rows: int
    invoice_runs: int
    profile: bool


FULL = Plan(
    customers=10_000,
    sdk_events=100_000,
    sdk_reps=5,
    worker_events=150_000,
    worker_reps=3,
    ref_reps=3,
    latency_rate=5_000,
    latency_seconds=30,
    latency_reps=1,
    latency_drain_seconds=60,
    invoice_rows=10_000_000,
    invoice_runs=9,
    profile=True,
)
QUICK = Plan(
    customers=2_000,
    sdk_events=20_000,
    sdk_reps=3,
    worker_events=20_000,
    worker_reps=2,
    ref_reps=2,
    latency_rate=5_000,
    latency_seconds=15,
    latency_reps=1,
    latency_drain_seconds=30,
    invoice_rows=1_000_000,
    invoice_runs=5,
    profile=False,
)


# -- small helpers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summary(values: list[float], digits: int = 0) -> dict[str, Any]:
    """Median with min/max over repetitions."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}

    def r(v: float) -> float:
        return round(v, digits) if digits else round(v)

    return {
        "median": r(statistics.median(values)),
        "min": r(min(values)),
        "max": r(max(values)),
        "n": len(values),
        "values": [r(v) for v in values],
    }


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@contextlib.contextmanager
def quiet_heap():
    """Generate a workload without the cyclic GC rescanning it, then freeze it out of later collections.

    The benchmark holds hundreds of thousands of event dicts; without this, every
    full collection during a timed loop would walk them and bill the SDK for it.
    """
    gc.unfreeze()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()
        gc.freeze()


def vm_status(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS of a live process, in bytes."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


_CLK = os.sysconf("SC_CLK_TCK")


def _pid_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _machine_ticks() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuWindow:
    """CPU used during a timed window, in cores: ours per process, the machine's, and everyone else's.

    This machine is shared (other engineers run tests on it); "other_processes_cores"
    says how much of the 2 cores was not ours while a figure was measured.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {"bench": os.getpid(), **{k: v for k, v in pids.items() if v}}
        self.start_wall = time.monotonic()
        self.start = {k: _pid_ticks(p) for k, p in self.pids.items()}
        self.start_machine = _machine_ticks()

    def finish(self) -> dict[str, Any]:
        wall = max(time.monotonic() - self.start_wall, 1e-6)
        ours = {k: (_pid_ticks(p) - self.start[k]) / _CLK / wall for k, p in self.pids.items()}
        busy0, total0 = self.start_machine
        busy1, total1 = _machine_ticks()
        ncpu = os.cpu_count() or 1
        machine = (busy1 - busy0) / max(total1 - total0, 1) * ncpu
        return {
            "wall_seconds": round(wall, 2),
            "cores": {k: round(v, 2) for k, v in ours.items()},
            "machine_busy_cores": round(machine, 2),
            "other_processes_cores": round(max(machine - sum(ours.values()), 0.0), 2),
        }


# -- machine and versions -------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": mem,
        "ram_gib": round(mem / GIB, 1),
        "kernel": platform.release(),
        "load_average_at_start": load,
    }


def _first(version: Any) -> str:
    """confluent-kafka's version()/libversion() give (text, int) tuples in some releases, text in others."""
    return str(version[0] if isinstance(version, tuple) else version)


def versions(broker_version: str | None) -> dict[str, Any]:
    import aiokafka
    import chdb
    import clickhouse_connect
    import confluent_kafka
    import faust
    import pydantic
    import pydantic_core

    java = None
    with contextlib.suppress(Exception):
        done = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=20)
        java = (done.stderr or done.stdout).splitlines()[0]
    return {
        "python": platform.python_version(),
        "confluent_kafka": _first(confluent_kafka.version()),
        "librdkafka": _first(confluent_kafka.libversion()),
        "aiokafka": aiokafka.__version__,
        "faust_streaming": faust.__version__,
        "pydantic": pydantic.__version__,
        "pydantic_core": pydantic_core.__version__,
        "chdb": chdb.__version__,
        "clickhouse_connect": clickhouse_connect.__version__,
        "kafka_broker": broker_version or "unknown (external broker)",
        "java": java,
    }


def source_fingerprint() -> dict[str, Any]:
    """What code was measured: a hash of the library and DDL (the tree changes between commits)."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted([*(REPO / "meterstream").rglob("*.py"), *(REPO / "meterstream").rglob("*.yaml"),
                    *(REPO / "sql").rglob("*.sql"), REPO / "pyproject.toml"])  # fmt: skip
    newest = 0.0
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    return {
        "sha256": digest.hexdigest()[:16],
        "files": len(files),
        "newest_change": datetime.fromtimestamp(newest, timezone.utc).isoformat(timespec="seconds"),
    }


# -- the run's resources ---------------------------------------------------------------------------


class GroupLag:
    """Messages of the event topics not yet committed by a consumer group (reads offsets; never joins)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        topics = Topics.from_settings(kafka)
        self.topics = [topics.usage.name, topics.outcomes.name]
        self._consumers: dict[str, Consumer] = {}

    def lag(self, group: str) -> int | None:
        try:
            consumer = self._consumers.get(group)
            if consumer is None:
                consumer = Consumer({**self.kafka.confluent_config(), "group.id": group, "enable.auto.commit": False})
                self._consumers[group] = consumer
            partitions = [TopicPartition(t, p) for t in self.topics for p in range(self.kafka.partitions)]
            committed = consumer.committed(partitions, timeout=5)
            lag = 0
            for tp in committed:
                _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=5)
                lag += high - max(tp.offset, 0)
            return lag
        except Exception:
            return None

    def close(self) -> None:
        for consumer in self._consumers.values():
            with contextlib.suppress(Exception):
                consumer.close()


class BenchWorker(WorkerProcess):
    """The real worker (``meterstream worker``) as a child process, with its own store."""

    def __init__(self, env: dict[str, str], web_port: int, log_path: Path, clickhouse: ClickHouseSettings) -> None:
        super().__init__(env, web_port, log_path)
        self.clickhouse = clickhouse
        self._skip_ready = False

    def launch(self) -> BenchWorker:
        """Start without waiting for readiness (the throughput clock starts at the first message)."""
        self._skip_ready = True
        try:
            self.start()
        finally:
            self._skip_ready = False
        return self

    def wait_ready(self, timeout: float) -> None:
        if not self._skip_ready:
            super().wait_ready(timeout)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.tag = f"bench-{self.run_id.lower()}-{uuid.uuid4().hex[:4]}"
        self.run_dir = Path(args.work_dir) / self.tag
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[BenchWorker] = []
        self.recorders: list[pyspy.Recorder] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.broker: Any = None
        self.broker_started = False
        self.broker_pid: int | None = None
        self.broker_version: str | None = None
        self.clickhouse = get_settings().clickhouse
        self.clickhouse_server: Any = None
        self.clickhouse_pid: int | None = None
        self.bootstrap = args.bootstrap
        self.partitions = args.partitions or (3 if args.workers == 1 else 2 * args.workers)
        self.price_book = load_price_book(None)
        self.measured_worker_rate: float | None = None
        self.worker_env_overrides = {k: v for k, v in os.environ.items() if k.startswith("METERSTREAM_WORKER__")}

    # broker ------------------------------------------------------------------------------------

    def broker_up(self) -> None:
        if self.bootstrap:
            console.print(f"using the Kafka broker at [bold]{self.bootstrap}[/] (not managed by the benchmark)")
            return
        from meterstream.services.kafka import KafkaBroker

        services = LocalServicesSettings(
            state_dir=Path(self.args.state_dir),
            kafka_port=self.args.kafka_port,
            kafka_controller_port=self.args.controller_port,
        )
        self.broker = KafkaBroker(services)
        status = self.broker.status()
        if status.running:
            console.print(f"reusing the benchmark broker (pid {status.pid}) at {status.bootstrap}; it stays up")
            if not self.broker.is_ready(timeout=10):
                self.broker.up()
        else:
            with console.status(f"starting Kafka on 127.0.0.1:{services.kafka_port}"):
                status = self.broker.up()
            self.broker_started = True
            console.print(f"started Kafka (pid {status.pid}) at {status.bootstrap}; stopped at the end")
        self.broker_pid = status.pid
        self.broker_version = status.version
        self.bootstrap = status.bootstrap

    def broker_down(self) -> None:
        if self.broker is not None and self.broker_started and not self.args.keep_broker:
            self.broker.down()
            console.print("stopped the benchmark's Kafka broker")
        if self.clickhouse_server is not None:
            self.clickhouse_server.down()
            console.print("stopped the benchmark's ClickHouse server")

    def clickhouse_up(self) -> None:
        """The one store every worker of a run shares; the local server is started if it is down."""
        from meterstream.services.clickhouse import ClickHouseServer, is_local_dsn

        services = get_settings().services
        if not is_local_dsn(self.clickhouse, services):
            console.print("using the ClickHouse server of METERSTREAM_CLICKHOUSE__DSN (not managed by the benchmark)")
            return
        server = ClickHouseServer(services)
        if server.is_ready():
            self.clickhouse_pid = server.status().pid
            console.print(f"using the running ClickHouse server at {server.http_url}")
            return
        with console.status("starting ClickHouse"):
            status = server.up()
        self.clickhouse_server = server
        self.clickhouse_pid = status.pid
        console.print(f"started ClickHouse (pid {status.pid}) at {status.http_url}; stopped at the end")

    # topics, workers -------------------------------------------------------------------------------

    def kafka(self, phase: str) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=self.bootstrap,
            topic_prefix=f"{self.tag}-{phase}.",
            partitions=self.partitions,
        )

    def start_workers(
        self, kafka: KafkaSettings, app_id: str, *, budgets_file: Path | None = None, wait_ready: bool = True,
        count: int | None = None,
    ) -> list[BenchWorker]:
        started = []
        for i in range(count or self.args.workers):
            root = self.run_dir / app_id / f"worker{i}"
            root.mkdir(parents=True, exist_ok=True)
            port = free_port()
            # One database per run phase, shared by every worker of it (as in production).
            clickhouse = self.clickhouse.model_copy(update={"database": re.sub(r"\W", "_", f"bench_{app_id}")})
            env = {
                "METERSTREAM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "METERSTREAM_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
                "METERSTREAM_KAFKA__PARTITIONS": str(kafka.partitions),
                "METERSTREAM_CLICKHOUSE__DSN": clickhouse.dsn.get_secret_value(),
                "METERSTREAM_CLICKHOUSE__DATABASE": clickhouse.database,
                "METERSTREAM_WORKER__APP_ID": app_id,
                "METERSTREAM_WORKER__WEB_PORT": str(port),
                "METERSTREAM_WORKER__DATA_DIR": str(root / "data"),
            }
            if budgets_file is not None:
                env["METERSTREAM_WORKER__BUDGETS_FILE"] = str(budgets_file)
            worker = BenchWorker(env, port, root / "worker.log", clickhouse)
            self.workers.append(worker)
            started.append(worker)
        for worker in started:
            if wait_ready:
                worker.start(ready_timeout=180)
            else:
                worker.launch()
        if not wait_ready:
            return started
        return started

    def stop_workers(self, workers: list[BenchWorker]) -> None:
        for worker in workers:
            worker.stop(timeout=30)
        for database in {worker.clickhouse.database for worker in workers}:  # keep the logs, drop the store
            try:
                # Connected to the run's own database: the configured one may not exist on this server
                # (it did not, and every run's database was left behind, the error swallowed).
                client = connect(self.clickhouse.model_copy(update={"database": database}), create_database=False)
                client.command(f"DROP DATABASE IF EXISTS {database}")
                client.close()
            except Exception as exc:  # a leftover database is harmless, but say so
                console.print(f"[yellow]could not drop the run's database {database}: {exc}[/]")

    def cleanup(self) -> None:
        for recorder in self.recorders:
            with contextlib.suppress(Exception):
                recorder.stop(timeout=20)
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop(timeout=30)
        for child in self.children:
            if child.poll() is None:
                child.kill()
                with contextlib.suppress(Exception):
                    child.wait(10)
        if self.bootstrap:
            self.delete_topics()
        self.broker_down()

    def delete_topics(self) -> None:
        try:
            admin = AdminClient({"bootstrap.servers": self.bootstrap})
            names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(self.tag)]
            if names:
                for future in admin.delete_topics(names, operation_timeout=30).values():
                    with contextlib.suppress(Exception):
                        future.result(timeout=30)
        except Exception as exc:  # leftover benchmark topics are harmless
            console.print(f"[yellow]could not delete the run's topics: {exc}[/]")

    def producer_config(self, kafka: KafkaSettings) -> dict[str, Any]:
        """Exactly the SDK's producer settings (MeterClient's defaults + REQUIRED), without the SDK."""
        return {
            **kafka.confluent_config(),
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": 120_000,
            **MeterClient.REQUIRED,
        }

    def produce_raw(
        self, kafka: KafkaSettings, topics: Topics, payloads: list[tuple[str, bytes, bytes]], *, warm_up: bool = True
    ) -> float:
        """Bare confluent-kafka produce of pre-serialized bytes; returns seconds including flush."""
        producer = Producer(self.producer_config(kafka))
        usage, outcomes = topics.usage.name, topics.outcomes.name
        kind, key, value = payloads[0]  # warm up like the SDK run: connection and producer id first
        if warm_up:
            producer.produce(outcomes if kind == "outcome" else usage, value, key)
        if producer.flush(30):
            raise BenchError("raw producer warm-up message not confirmed within 30 s")
        deadline = time.monotonic() + 300
        started = time.perf_counter()
        for kind, key, value in payloads:
            topic = outcomes if kind == "outcome" else usage
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:
                    if time.monotonic() > deadline:
                        raise BenchError("raw producer: local queue stayed full") from None
                    producer.poll(0.05)
        remaining = producer.flush(120)
        elapsed = time.perf_counter() - started
        if remaining:
            raise BenchError(f"raw producer: {remaining} messages unconfirmed after flush")
        return elapsed

    # 1. SDK ----------------------------------------------------------------------------------------

    def phase_sdk(self) -> dict[str, Any]:
        plan = self.plan
        with quiet_heap():
            workload = generate(plan.sdk_events, plan.customers, seed=1)
            payloads = serialize(workload)
        kafka = self.kafka("sdk")
        topics = ensure_topics(kafka)
        n = workload.total

        # Where the SDK's time goes, without Kafka (one pass each; diagnostic).
        sample = workload.messages[: min(n, 100_000)]
        started = time.perf_counter()
        built = [spec.build() for spec in sample]
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        for event in built:
            event.model_dump_json(exclude_none=True).encode()
        dump_s = time.perf_counter() - started
        del built

        warmup = workload.messages[0].build()
        sdk_rates, raw_rates, windows = [], [], []
        for rep in range(plan.sdk_reps):
            failures: list[DeliveryFailure] = []
            meter = MeterClient(kafka, on_delivery_error=failures.append)
            try:
                # Warm up (connection, idempotent producer id) as a long-running service would be.
                meter.record(warmup)
                if meter.flush(30):
                    raise BenchError("SDK warm-up event not confirmed within 30 s")
                window = CpuWindow({"broker": self.broker_pid})
                started = time.perf_counter()
                for spec in workload.messages:
                    meter.record(spec.build())
                remaining = meter.flush(120)
                elapsed = time.perf_counter() - started
                windows.append(window.finish())
            finally:
                meter.close(30)
            if remaining or failures or meter.delivered != n + 1:
                raise BenchError(
                    f"SDK rep {rep}: {meter.delivered} of {n} confirmed, {len(failures)} failed, {remaining} pending"
                )
            sdk_rates.append(n / elapsed)
            raw_rates.append(n / self.produce_raw(kafka, topics, payloads))
            console.print(
                f"  SDK rep {rep + 1}/{plan.sdk_reps}: MeterClient {sdk_rates[-1]:,.0f} ev/s, "
                f"raw confluent-kafka {raw_rates[-1]:,.0f} msg/s"
            )
        return {
            "events_per_rep": n,
            "workload": workload.counts(),
            "mean_value_bytes": round(sum(len(v) for _, _, v in payloads) / n),
            "sdk_events_per_s": summary(sdk_rates),
            "raw_confluent_msgs_per_s": summary(raw_rates),
            "sdk_share_of_raw": round(statistics.median(sdk_rates) / statistics.median(raw_rates), 3),
            "breakdown_without_kafka": {
                "events": len(sample),
                "build_validate_events_per_s": round(len(sample) / build_s),
                "model_dump_json_events_per_s": round(len(sample) / dump_s),
                "build_plus_dump_events_per_s": round(len(sample) / (build_s + dump_s)),
                "us_per_event_build": round(build_s / len(sample) * 1e6, 2),
                "us_per_event_dump": round(dump_s / len(sample) * 1e6, 2),
                "us_per_event_sdk_total_median": round(1e6 / statistics.median(sdk_rates), 2),
            },
            "cpu": windows,
        }

    # 2 + 5. worker throughput, references, memory, profile -----------------------------------------

    def phase_worker(self) -> dict[str, Any]:
        plan = self.plan
        with quiet_heap():
            workload = generate(plan.worker_events, plan.customers, seed=2, backlog_seconds=self.args.backlog_seconds)
            payloads = serialize(workload)
            counts = workload.counts()
            period = workload.messages[0].fields["occurred_at"].strftime("%Y-%m")
            del workload
        kafka = self.kafka("wrk")
        topics = ensure_topics(kafka)
        fill_s = self.produce_raw(kafka, topics, payloads, warm_up=False)
        del payloads
        console.print(
            f"  pre-filled {counts['messages']:,} messages ({counts['distinct_events']:,} distinct events, "
            f"{counts['active_customers']:,} customers) in {fill_s:.1f} s"
        )
        topic_names = [topics.usage.name, topics.outcomes.name]
        runs, aio, conf, agent = [], [], [], []
        for rep in range(plan.worker_reps):
            runs.append(self.worker_throughput(kafka, counts, period, f"{self.tag}-wrk{rep}", profile=False))
            console.print(
                f"  worker rep {rep + 1}/{plan.worker_reps}: {runs[-1]['events_per_s']:,.0f} ev/s "
                f"({runs[-1]['seconds']:.1f} s; startup {runs[-1]['startup_seconds']:.1f} s; "
                f"rows ok: {runs[-1]['rows_ok']}; VmHWM {runs[-1]['vmhwm_bytes_max'] / 2**20:,.0f} MiB)"
            )
            if rep < plan.ref_reps:
                aio.append(self.reference("aiokafka", topic_names, counts["messages"]))
                conf.append(self.reference("confluent", topic_names, counts["messages"]))
                console.print(
                    f"  bare consumers rep {rep + 1}: aiokafka {aio[-1]['rate']:,} msg/s, "
                    f"confluent-kafka {conf[-1]['rate']:,} msg/s"
                )
            if rep == 0:
                # A no-op Faust agent reads a sample: at its rate the whole topic would take minutes.
                agent.append(self.reference("faust", topic_names, min(counts["messages"], FAUST_AGENT_SAMPLE)))
                console.print(f"  no-op Faust agent: {agent[-1]['rate']:,} msg/s ({agent[-1]['messages']:,} messages)")
        single: dict[str, Any] | None = None
        if self.args.workers > 1:
            # One worker on the same topics and the same server, in the same run: the baseline the
            # group's throughput is read against.
            single = self.worker_throughput(kafka, counts, period, f"{self.tag}-wrk1w", profile=False, count=1)
            console.print(f"  one worker beside it: {single['events_per_s']:,.0f} ev/s ({single['seconds']:.1f} s; "
                          f"rows ok: {single['rows_ok']})")
        profile = None
        if plan.profile:
            if pyspy.available():
                prof_run = self.worker_throughput(kafka, counts, period, f"{self.tag}-wrkprof", profile=True)
                profile = prof_run.pop("profile", None)
                if profile is not None:
                    profile["run"] = prof_run
                console.print(f"  profiled run: {prof_run['events_per_s']:,.0f} ev/s under py-spy (not counted)")
            else:
                console.print("  [yellow]py-spy not installed: no profile (pip install py-spy)[/]")
        rates = [r["events_per_s"] for r in runs]
        aio_rates = [r["rate"] for r in aio]
        self.measured_worker_rate = statistics.median(rates)
        return {
            "messages": counts["messages"],
            "workload": counts,
            "period": period,
            "prefill_seconds": round(fill_s, 2),
            "worker_events_per_s": summary(rates),
            "single_worker_events_per_s": None if single is None else single["events_per_s"],
            "single_worker_run": single,
            "aiokafka_bare_msgs_per_s": summary(aio_rates),
            "confluent_bare_msgs_per_s": summary([r["rate"] for r in conf]),
            "faust_agent_msgs_per_s": summary([r["rate"] for r in agent]),
            "worker_share_of_aiokafka": round(statistics.median(rates) / statistics.median(aio_rates), 3),
            "vmhwm_bytes": summary([r["vmhwm_bytes_max"] for r in runs]),
            "all_rows_ok": all(r["rows_ok"] for r in runs) and (single is None or bool(single["rows_ok"])),
            "runs": runs,
            "aiokafka_runs": aio,
            "confluent_runs": conf,
            "faust_agent_runs": agent,
            "profile": profile,
        }

    def worker_throughput(
        self, kafka: KafkaSettings, counts: dict[str, int], period: str, app_id: str, *, profile: bool,
        count: int | None = None,
    ) -> dict[str, Any]:
        expected = counts["messages"]
        lag_checker = GroupLag(kafka)
        workers = self.start_workers(kafka, app_id, wait_ready=False, count=count)
        launched = time.monotonic()
        timeout = min(1800.0, 120 + expected / 300)
        deadline = launched + timeout
        t0: float | None = None
        m0 = 0
        window: CpuWindow | None = None
        recorder: pyspy.Recorder | None = None
        truncated = False
        stats: list[dict[str, Any]] = []
        try:
            while True:
                now = time.monotonic()
                if now > deadline:
                    done = sum(s.get("messages", 0) for s in stats)
                    raise BenchError(f"worker processed {done} of {expected} messages within {timeout:.0f} s")
                for worker in workers:
                    worker._check_alive()
                try:
                    stats = [worker.stats(timeout=2.0) for worker in workers]
                except Exception:  # not listening yet
                    time.sleep(0.1)
                    continue
                now = time.monotonic()
                total = sum(s["messages"] for s in stats)
                if t0 is None and total > 0:
                    t0, m0 = now, total
                    window = CpuWindow({"broker": self.broker_pid, **({"clickhouse": self.clickhouse_pid}
                                                                      if self.clickhouse_pid else {}),
                                        **{f"worker{i}": w.pid for i, w in enumerate(workers)}})  # fmt: skip
                    if profile:
                        out = self.run_dir / f"{app_id}.pyspy.txt"
                        recorder = pyspy.Recorder(workers[0].pid, out)  # type: ignore[arg-type]
                        self.recorders.append(recorder)
                # One worker: its count is exact. Several: a rebalance replays uncommitted batches, so the
                # summed count passes N early; done means the group has committed every offset.
                if total >= expected and (len(workers) == 1 or lag_checker.lag(app_id) == 0):
                    t_end = now
                    break
                if recorder is not None and t0 is not None and now - t0 >= PROFILE_SECONDS:
                    t_end, truncated = now, True  # enough samples: the profiled run is not a figure
                    break
                time.sleep(0.1)
            cpu = window.finish() if window else {}
            if recorder is not None:
                recorder.stop()
            memory = [vm_status(w.pid) for w in workers if w.pid]  # type: ignore[arg-type]
            stored = None if truncated else self.store_totals(workers, period)
        finally:
            self.stop_workers(workers)
            lag_checker.close()
        assert t0 is not None
        seconds = t_end - t0
        done = sum(s["messages"] for s in stats)
        result: dict[str, Any] = {
            "app_id": app_id,
            "workers": len(workers),
            # Distinct work done: N when the run completed (replays after a rebalance are not progress).
            "events_per_s": round(((done if truncated else expected) - m0) / seconds) if seconds > 0 else None,
            "stopped_early_for_profile": truncated,
            "seconds": round(seconds, 2),
            "startup_seconds": round(t0 - launched, 2),
            "first_observation_messages": m0,
            "messages": sum(s["messages"] for s in stats),
            "rated": sum(s["rated"] for s in stats),
            "duplicates": sum(s["duplicates"] for s in stats),
            "dead_letters": sum(s["dead_letters"] for s in stats),
            "batches": sum(s["batches"] for s in stats),
            "inserts": sum(s.get("inserts", 0) for s in stats),
            # Per worker, seconds rating and in store writes since it started (the two overlapping stages).
            "busy_seconds": [s.get("busy_seconds") for s in stats],
            "store": stored,
            # One store for every worker: an event two workers both wrote across a rebalance is one row (FINAL).
            "rows_ok": None if stored is None else (
                stored["rated_rows"] == counts["distinct_events"] and stored["raw_events"] == counts["distinct_events"]
            ),
            "vmhwm_bytes": [m.get("VmHWM") for m in memory],
            "vmhwm_bytes_max": max((m.get("VmHWM", 0) for m in memory), default=0),
            "vmrss_bytes_end": [m.get("VmRSS") for m in memory],
            "cpu": cpu,
        }
        if recorder is not None and recorder.out.exists():
            result["profile"] = {"raw_file": str(recorder.out), **pyspy.summarise(recorder.out)}
        return result

    def store_totals(self, workers: list[BenchWorker], period: str) -> dict[str, Any]:
        """``store_totals`` of the run's one store (every worker wrote to it)."""
        row = run_saved_query(workers[0].clickhouse, "store_totals", period=period).dicts()[0]
        return {"raw_events": int(row["raw_events"] or 0), "rated_rows": int(row["rated_rows"] or 0),
                "credits": str(row["credits"] or Decimal(0))}

    def reference(self, client: str, topics: list[str], expected: int) -> dict[str, Any]:
        timeout = min(900.0, 60 + expected / 1000)
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.consumers", client, "--bootstrap", self.bootstrap,
             "--topics", ",".join(topics), "--messages", str(expected), "--timeout", str(timeout)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.children.append(child)
        try:
            out, err = child.communicate(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate(timeout=10)
            raise BenchError(f"{client} reference consumer timed out") from None
        if child.returncode != 0:
            raise BenchError(f"{client} reference consumer failed: {err.decode(errors='replace')[-2000:]}")
        # The last JSON line: Faust's worker can write terminal codes (its spinner's) after it at exit.
        lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
        if not lines:
            raise BenchError(f"{client} reference consumer printed no result: {out.decode(errors='replace')[-500:]!r}")
        return json.loads(lines[-1])

    # 3. produce -> alert latency --------------------------------------------------------------------

    def phase_latency(self) -> dict[str, Any]:
        plan = self.plan
        runs = [
            self.latency_once(f"lat{rep}", plan.latency_rate, plan.latency_seconds, plan.customers, seed=100 + rep)
            for rep in range(plan.latency_reps)
        ]
        p50 = [r["latency_to_consumer_s"]["p50"] for r in runs]
        p99 = [r["latency_to_consumer_s"]["p99"] for r in runs]
        state_p50 = [r["latency_to_enforcement_state_s"]["p50"] for r in runs]
        state_p99 = [r["latency_to_enforcement_state_s"]["p99"] for r in runs]
        out: dict[str, Any] = {
            "offered_events_per_s": plan.latency_rate,
            "seconds": plan.latency_seconds,
            "p50_s": summary(p50, 4),
            "p99_s": summary(p99, 4),
            "enforcement_state_p50_s": summary([v for v in state_p50 if v is not None], 4),
            "enforcement_state_p99_s": summary([v for v in state_p99 if v is not None], 4),
            "p99_is_lower_bound": any(r["latency_to_consumer_s"]["censored"] for r in runs),
            "runs": runs,
        }
        # If the worker cannot sustain the target load, the latency above is mostly queueing;
        # also measure it at a load the worker does sustain (half its measured throughput).
        worker_rate = self.measured_worker_rate
        if worker_rate is not None and worker_rate < plan.latency_rate:
            rate = max(50, int(worker_rate * 0.5))
            events = int(rate * plan.latency_seconds)
            customers = min(plan.customers, max(50, events // 40))
            out["sustainable_load"] = self.latency_once(
                "latlow", rate, plan.latency_seconds, customers, seed=200
            )
        return out

    def phase_state_latency(self) -> dict[str, Any]:
        """produce -> enforcement-state at each offered rate of ``--state-rates`` (default 500 and 5,000/s)."""
        out: dict[str, Any] = {"rates": {}}
        for rate in self.args.state_rates:
            events = int(rate * self.plan.latency_seconds)
            customers = min(self.plan.customers, max(50, events // 40))
            run = self.latency_once(f"state{rate}", rate, self.plan.latency_seconds, customers, seed=300 + rate)
            out["rates"][str(rate)] = {
                "offered_events_per_s": rate,
                "achieved_offered_events_per_s": run["achieved_offered_events_per_s"],
                "worker_drained": run["worker_drained"],
                "enforcement_state_s": run["latency_to_enforcement_state_s"],
                "run": run,
            }
        return out

    def latency_once(self, label: str, rate: int, seconds: float, customers: int, *, seed: int) -> dict[str, Any]:
        total = int(rate * seconds)
        console.print(f"  {label}: offering {total:,} events at {rate:,}/s from {customers:,} customers")
        with quiet_heap():
            workload = generate(total, customers, seed=seed, backlog_seconds=None)
            budgets_text, crossing, alerts_expected = self.budgets_for(workload)
        kafka = self.kafka(label)
        topics = ensure_topics(kafka)
        budgets_file = self.run_dir / f"budgets-{label}.yaml"
        budgets_file.write_text(budgets_text)
        app_id = f"{self.tag}-{label}"
        drain_cap = max(30.0, self.plan.latency_drain_seconds)

        alerts: list[tuple[float, float, dict[str, Any]]] = []
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read_alerts, args=(kafka, topics.budget_alerts.name, alerts, stop), daemon=True
        )
        reader.start()
        # The enforcement-state topic: each state carries the newest event time it includes
        # (watermark), which in this run is the moment that event was built and sent.
        states: list[tuple[float, float, dict[str, Any]]] = []
        state_reader = threading.Thread(
            target=self._read_alerts, args=(kafka, topics.enforcement.name, states, stop), daemon=True
        )
        state_reader.start()
        workers: list[BenchWorker] = []
        monitor: threading.Thread | None = None
        try:
            workers = self.start_workers(kafka, app_id, budgets_file=budgets_file, wait_ready=True)
            progress: list[tuple[float, int, int]] = []  # (t, sent, worker messages)
            sent_box = [0]
            batch_samples: list[tuple[float, int, int, float, float, float]] = []  # t, staged, batch, rate/write/store s
            monitor = threading.Thread(
                target=self._watch, args=(workers, sent_box, progress, stop, batch_samples), daemon=True
            )
            stamps: dict[str, float] = {}
            built: dict[int, Any] = {}
            failures: list[DeliveryFailure] = []
            meter = MeterClient(kafka, on_delivery_error=failures.append)
            monitor.start()
            window = CpuWindow({"broker": self.broker_pid, **{f"worker{i}": w.pid for i, w in enumerate(workers)}})
            messages = workload.messages
            started = time.monotonic()
            started_wall = time.time()
            send_deadline = started + seconds * 3 + 30
            i = 0
            try:
                while i < len(messages):
                    now = time.monotonic()
                    if now > send_deadline:
                        raise BenchError(f"could not offer {total} events at {rate}/s: sent {i}")
                    due = min(len(messages), int((now - started) * rate) + 1)
                    while i < due:
                        spec = messages[i]
                        wall = time.time()
                        event = built.get(id(spec))
                        if event is None:  # first send: build and validate now, stamped now
                            event = spec.build(occurred_at=datetime.now(timezone.utc))
                            built[id(spec)] = event
                            stamps[event.event_id] = wall
                        meter.record(event)
                        i += 1
                    sent_box[0] = i
                    time.sleep(0.001)
                send_seconds = time.monotonic() - started
                remaining = meter.flush(60)
            finally:
                meter.close(30)
            if remaining or failures:
                raise BenchError(f"latency run: {len(failures)} deliveries failed, {remaining} unconfirmed")
            last_send_wall = time.time()
            last_sent = time.monotonic()
            final, drained = self._wait_messages(workers, len(messages), timeout=drain_cap)
            drain_seconds = time.monotonic() - last_sent
            cpu = window.finish()
            deadline = time.monotonic() + (15 if drained else 3)
            while time.monotonic() < deadline and len({a[2]["alert_id"] for a in alerts}) < alerts_expected:
                time.sleep(0.2)
            time.sleep(1.0)  # anything extra (a duplicate alert) would arrive now
            stopped_wall = time.time()
            memory = [vm_status(w.pid) for w in workers if w.pid]  # type: ignore[arg-type]
        finally:
            stop.set()
            if monitor is not None:
                monitor.join(5)
            reader.join(10)
            state_reader.join(10)
            self.stop_workers(workers)

        to_consumer, to_kafka, unmatched = [], [], 0
        seen: set[str] = set()
        for received, kafka_ts, alert in list(alerts):
            if alert["alert_id"] in seen:
                continue
            seen.add(alert["alert_id"])
            stamp = stamps.get(alert["triggering_event_id"])
            if stamp is None:
                unmatched += 1
                continue
            to_consumer.append(received - stamp)
            to_kafka.append(kafka_ts - stamp)
        # Alerts not raised by the end (the worker had not reached their events): their latency is
        # at least the time from the last send to the end of the run. Counted as that lower bound.
        missing = max(0, alerts_expected - len(seen))
        censored_at = stopped_wall - last_send_wall
        lags = [sent - done for _, sent, done in progress]
        # produce -> enforcement-state: from the send of the newest event a state includes to its arrival.
        to_state = [
            received - datetime.fromisoformat(state["watermark"]).timestamp()
            for received, _, state in states
            if state.get("watermark") and not state.get("run_id")
            and not str(state.get("key", "")).startswith("__")  # the heartbeat and the default budget
            and datetime.fromisoformat(state["watermark"]).timestamp() >= started_wall
        ]

        def dist(values: list[float], censored: int) -> dict[str, Any]:
            values = sorted(values + [censored_at] * censored)
            p = {q: percentile(values, q) for q in (50, 90, 99)}
            return {
                "count": len(values) - censored,
                "censored": censored,
                "censored_at_s": round(censored_at, 2) if censored else None,
                **{f"p{q}": round(v, 4) for q, v in p.items()},
                "max": round(values[-1], 4) if values else None,
            }

        return {
            "label": label,
            "messages": len(messages),
            "distinct_events": workload.distinct,
            "active_customers": workload.counts()["active_customers"],
            "offered_events_per_s": rate,
            "achieved_offered_events_per_s": round(len(messages) / send_seconds),
            "send_seconds": round(send_seconds, 2),
            "worker_drained": drained,
            "worker_messages_at_end": sum(s.get("messages", 0) for s in final),
            "drain_after_last_send_s": round(drain_seconds, 2),
            "drain_cap_s": drain_cap,
            "max_backlog_messages": max(lags) if lags else None,
            "customers_with_crossing_budgets": len(crossing),
            "alerts_expected": alerts_expected,
            "alerts_received_distinct": len(seen),
            "alerts_received_total": len(alerts),
            "alerts_worker_stats": sum(s.get("alerts", 0) for s in final),
            "alerts_unmatched": unmatched,
            "latency_to_consumer_s": dist(to_consumer, missing),
            "latency_to_alert_kafka_timestamp_s": dist(to_kafka, missing),
            "latency_to_enforcement_state_s": dist(to_state, 0),
            "vmhwm_bytes": [m.get("VmHWM") for m in memory],
            "cpu": cpu,
            "backlog_samples": [(round(t, 1), s, d) for t, s, d in progress[:: max(1, len(progress) // 60)]],
            # The first worker's last batch at each sample: (t, staged messages, its size, rate, write, store s).
            "batch_samples": batch_samples[:: max(1, len(batch_samples) // 60)],
            "last_batch_messages_p50_max": _p50_max([b[2] for b in batch_samples]),
            "rate_seconds_p50_max": _p50_max([b[3] for b in batch_samples]),
            "write_seconds_p50_max": _p50_max([b[4] for b in batch_samples]),
            "store_seconds_p50_max": _p50_max([b[5] for b in batch_samples]),
            # The workers' own garbage collections (WORKER__GC_COLLECT_SECONDS): how many, the last one's seconds.
            "gc": [s.get("gc") for s in final],
        }

    def budgets_for(self, workload: Workload) -> tuple[str, list[str], int]:
        """Budgets that customers cross during the run (at 50/80/100%), spread over its length.

        Each customer with at least 20 events gets a budget of f x its total credits
        in this run, f uniform in [0.4, 1.0) rounded to 3 digits: its 50% threshold falls at
        ~0.5 f of its spend, its 100% threshold at ~f, so the three are crossed before the end,
        at times spread over the run. Customers with fewer events get no budget. Returns the
        budgets file, the customers with one and the alerts expected: each threshold the
        customer's total reaches (an f rounded up to 1.0 with the budget rounded above the total
        leaves 100% unreached: seed 102 has one such customer).
        """
        import random

        now = datetime.now(timezone.utc)
        credits: dict[str, Decimal] = defaultdict(Decimal)
        events: Counter[str] = Counter()
        seen: set[int] = set()
        for spec in workload.messages:
            if id(spec) in seen:
                continue
            seen.add(id(spec))
            customer = spec.fields["customer_id"]
            events[customer] += 1
            credits[customer] += rate_event(spec.build(occurred_at=now), self.price_book).credits
        rng = random.Random(42)
        lines = ["customers:"]
        crossing = []
        expected = 0
        for customer, n in sorted(events.items()):
            if n < 20 or credits[customer] <= 0:
                continue
            budget = (credits[customer] * Decimal(str(round(rng.uniform(0.4, 1.0), 3)))).quantize(Decimal("0.0001"))
            if budget <= 0:
                continue
            crossing.append(customer)
            expected += sum(credits[customer] * 100 >= budget * t for t in (50, 80, 100))
            lines.append(f'  {customer}: {{monthly_credits: "{budget}", thresholds: [50, 80, 100], action: alert}}')
        return "\n".join(lines) + "\n", crossing, expected

    def _read_alerts(
        self, kafka: KafkaSettings, topic: str, sink: list[tuple[float, float, dict[str, Any]]], stop: threading.Event
    ) -> None:
        consumer = Consumer(
            {
                **kafka.confluent_config(),
                "group.id": f"{self.tag}-alert-reader-{uuid.uuid4().hex[:6]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 50,
            }
        )
        try:
            meta = consumer.list_topics(topic, timeout=10)
            consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
            while not stop.is_set():
                msg = consumer.poll(0.05)
                if msg is None or msg.error():
                    continue
                received = time.time()
                sink.append((received, msg.timestamp()[1] / 1000.0, orjson.loads(msg.value())))
        finally:
            consumer.close()

    def _watch(
        self, workers: list[BenchWorker], sent: list[int], out: list[tuple[float, int, int]], stop: threading.Event,
        batches: list[tuple[float, int, int, float, float, float]] | None = None,
    ) -> None:
        """Every 0.5 s: (t, sent, stored); with ``batches``, (t, staged, last batch's messages, its rate, write and
        store seconds)."""
        started = time.monotonic()
        while not stop.wait(0.5):
            with contextlib.suppress(Exception):
                stats = [w.stats(timeout=2.0) for w in workers]
                t = time.monotonic() - started
                out.append((t, sent[0], sum(s["messages"] for s in stats)))
                if batches is not None and "last_batch" in stats[0]:
                    last = stats[0]["last_batch"]
                    batches.append((round(t, 1), sum(s.get("staged", 0) for s in stats), last["messages"],
                                    last["rate_seconds"], last["write_seconds"], last.get("store_seconds", 0.0)))  # fmt: skip

    def _wait_messages(
        self, workers: list[BenchWorker], expected: int, timeout: float
    ) -> tuple[list[dict[str, Any]], bool]:
        """Wait (bounded) until the workers have processed ``expected`` messages; (last stats, reached?)."""
        deadline = time.monotonic() + timeout
        stats: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            for worker in workers:
                worker._check_alive()
            with contextlib.suppress(Exception):
                stats = [w.stats(timeout=2.0) for w in workers]
                if sum(s["messages"] for s in stats) >= expected:
                    return stats, True
            time.sleep(0.2)
        return stats, False

    # 4. invoice query -------------------------------------------------------------------------------

    def phase_invoice(self) -> dict[str, Any]:
        out = self.run_dir / "invoice.json"
        cmd = [sys.executable, "-m", "bench.invoice", "--rows", str(self.plan.invoice_rows),
               "--customers", str(TARGETS["active_customers"]), "--runs", str(self.plan.invoice_runs),
               "--json-out", str(out)]  # fmt: skip
        if self.args.invoice_store:
            cmd += ["--store", self.args.invoice_store]
        if self.args.rebuild_invoice_store:
            cmd.append("--rebuild")
        child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.children.append(child)
        try:
            text, _ = child.communicate(timeout=1500)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate(timeout=10)
            raise BenchError("invoice benchmark timed out (25 min)") from None
        if child.returncode != 0:
            raise BenchError(f"invoice benchmark failed:\n{text.decode(errors='replace')[-3000:]}")
        return json.loads(out.read_text())


# -- report -----------------------------------------------------------------------------------------


def _p50_max(values: list[float]) -> list[float] | None:
    return [statistics.median(values), max(values)] if values else None


def _fmt_rate(v: Any) -> str:
    return "—" if v is None else f"{v:,.0f}/s"


def _ok_phase(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    phase = results.get(name)
    return phase if phase and "error" not in phase else None


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sdk = _ok_phase(results, "sdk")
    if sdk:
        out["sdk"] = sdk["sdk_events_per_s"]["median"] >= TARGETS["sdk_events_per_s"]
    worker = _ok_phase(results, "worker")
    if worker:
        out["worker_rate"] = worker["worker_events_per_s"]["median"] >= TARGETS["worker_events_per_s"]
        out["worker_share"] = worker["worker_share_of_aiokafka"] >= TARGETS["worker_share_of_aiokafka"]
        if worker["workload"]["active_customers"] >= TARGETS["active_customers"]:  # else not the target scenario
            out["memory"] = worker["vmhwm_bytes"]["max"] <= TARGETS["worker_vmhwm_bytes"]
    latency = _ok_phase(results, "latency")
    if latency and latency["offered_events_per_s"] >= TARGETS["alert_offered_events_per_s"]:
        out["alert_latency"] = latency["p99_s"]["median"] <= TARGETS["alert_p99_s"]
    invoice = _ok_phase(results, "invoice")
    if invoice and invoice["rows_in_period"] >= TARGETS["invoice_rows"]:
        out["invoice"] = _invoice_figure(invoice["queries"]["heaviest_customer"])["median_ms"] <= TARGETS["invoice_query_ms"]
    return out


def render(results: dict[str, Any]) -> Table:
    ok = {True: "[green]met[/]", False: "[red]missed[/]", None: "n/a"}
    verdict = results.get("verdicts", {})
    table = Table(title=f"meterstream benchmark {results['run_id']} ({results['mode']}, {results['workers']} worker(s))")
    for column in ("measure", "median", "min", "max", "target", ""):
        table.add_column(column, justify="left" if column in ("measure", "") else "right")
    sdk = _ok_phase(results, "sdk")
    if sdk:
        s, r = sdk["sdk_events_per_s"], sdk["raw_confluent_msgs_per_s"]
        table.add_row("1. SDK produce (MeterClient, validated)", _fmt_rate(s["median"]), _fmt_rate(s["min"]),
                      _fmt_rate(s["max"]), "≥ 150,000/s", ok[verdict.get("sdk")])
        table.add_row("   ref: bare confluent-kafka produce", _fmt_rate(r["median"]), _fmt_rate(r["min"]),
                      _fmt_rate(r["max"]), "", "")
        b = sdk["breakdown_without_kafka"]
        table.add_row("   no Kafka: pydantic build+validate | model_dump_json",
                      f"{b['build_validate_events_per_s']:,}/s | {b['model_dump_json_events_per_s']:,}/s", "", "", "",
                      "diagnostic")
    worker = _ok_phase(results, "worker")
    if worker:
        w, a, c = worker["worker_events_per_s"], worker["aiokafka_bare_msgs_per_s"], worker["confluent_bare_msgs_per_s"]
        table.add_row("2. worker end to end (topic -> rated rows)", _fmt_rate(w["median"]), _fmt_rate(w["min"]),
                      _fmt_rate(w["max"]), "≥ 30,000/s", ok[verdict.get("worker_rate")])
        table.add_row("   ref: bare aiokafka getmany", _fmt_rate(a["median"]), _fmt_rate(a["min"]), _fmt_rate(a["max"]), "", "")
        table.add_row("   ref: bare confluent-kafka consume", _fmt_rate(c["median"]), _fmt_rate(c["min"]),
                      _fmt_rate(c["max"]), "", "")
        f = worker.get("faust_agent_msgs_per_s")
        if f:
            table.add_row("   ref: no-op Faust agent (sample)", _fmt_rate(f["median"]), _fmt_rate(f["min"]),
                          _fmt_rate(f["max"]), "", "why the worker reads in batches")
        table.add_row("   worker / aiokafka", f"{worker['worker_share_of_aiokafka']:.1%}", "", "", "≥ 25%",
                      ok[verdict.get("worker_share")])
    latency = _ok_phase(results, "latency")
    if latency:
        p50, p99 = latency["p50_s"], latency["p99_s"]
        run = latency["runs"][0]
        bound = "≥ " if latency.get("p99_is_lower_bound") else ""

        def ms(v: float | None) -> str:
            return "—" if v is None else f"{bound}{v * 1000:,.0f} ms"

        table.add_row(f"3. produce -> alert p50, {latency['offered_events_per_s']:,}/s offered",
                      ms(p50["median"]), ms(p50["min"]), ms(p50["max"]), "", "")
        lat = run["latency_to_consumer_s"]
        note = f", {lat['censored']:,} not raised by the end" if lat["censored"] else ""
        table.add_row(f"   p99 ({lat['count']:,} alerts{note})", ms(p99["median"]), ms(p99["min"]), ms(p99["max"]),
                      "≤ 1,000 ms", ok[verdict.get("alert_latency")])
        sp50, sp99 = latency.get("enforcement_state_p50_s", {}), latency.get("enforcement_state_p99_s", {})
        if sp50.get("median") is not None:
            table.add_row("   produce -> enforcement-state p50 / p99",
                          f"{sp50['median'] * 1000:,.0f} / {sp99['median'] * 1000:,.0f} ms", "", "", "", "diagnostic")
        low = latency.get("sustainable_load")
        if low:
            lo = low["latency_to_consumer_s"]
            bound = "≥ " if lo["censored"] else ""
            table.add_row(f"   at {low['offered_events_per_s']:,}/s offered (half the worker rate): p50 / p99",
                          f"{ms(lo['p50'])} / {ms(lo['p99'])}", "", "", "", "diagnostic")
            st = low["latency_to_enforcement_state_s"]
            table.add_row("   same load, produce -> enforcement-state p50 / p99",
                          f"{ms(st['p50'])} / {ms(st['p99'])}", "", "", "", "diagnostic")
    state = _ok_phase(results, "state")
    if state:
        for rate, r in state["rates"].items():
            st = r["enforcement_state_s"]
            p50 = "—" if st["p50"] is None else f"{st['p50'] * 1000:,.0f}"
            p99 = "—" if st["p99"] is None else f"{st['p99'] * 1000:,.0f}"
            table.add_row(f"3b. produce -> enforcement-state p50 / p99, {int(rate):,}/s offered ({st['count']:,} states)",
                          f"{p50} / {p99} ms", "", "", "", "diagnostic")
    invoice = _ok_phase(results, "invoice")
    if invoice:
        for label, name in (("heaviest_customer", "heaviest"), ("median_customer", "median")):
            q = invoice["queries"][label]
            m = _invoice_figure(q)
            title = (f"4. invoice query, {name} customer ({q['rows_for_customer']:,} of "
                     f"{invoice['rows_in_period']:,} rows)")
            table.add_row(title if label == "heaviest_customer" else f"   {name} customer ({q['rows_for_customer']:,} rows)",
                          f"{m['median_ms']:,.0f} ms", f"{m['min_ms']:,.0f} ms", f"{m['max_ms']:,.0f} ms",
                          "≤ 200 ms" if label == "heaviest_customer" else "",
                          ok[verdict.get("invoice")] if label == "heaviest_customer" else "")
    if worker:
        v = worker["vmhwm_bytes"]
        table.add_row(f"5. worker VmHWM ({worker['workload']['active_customers']:,} active customers)",
                      f"{v['median'] / 2**20:,.0f} MiB", f"{v['min'] / 2**20:,.0f} MiB", f"{v['max'] / 2**20:,.0f} MiB",
                      "≤ 1,024 MiB", ok[verdict.get("memory")])
    for name in ("sdk", "worker", "latency", "invoice"):
        phase = results.get(name)
        if phase and "error" in phase:
            table.add_row(f"{name}: FAILED", phase["error"].splitlines()[0][:60], "", "", "", "[red]error[/]")
    return table


def _invoice_figure(q: dict[str, Any]) -> dict[str, Any]:
    """The invoice query's timing: ``invoice_usage`` (what an invoice runs); ``month_to_date`` in older results."""
    return q.get("invoice_usage") or q["month_to_date"]


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (small N, 1M-row invoice store)")
    parser.add_argument("--workers", type=int, default=1, help="workers in one consumer group (default 1)")
    parser.add_argument("--partitions", type=int, default=None,
                        help="partitions per topic (default 3 = the project default; 2 x workers when > 1)")
    parser.add_argument("--phases", default="sdk,worker,latency,invoice", help="comma-separated subset to run")
    parser.add_argument("--customers", type=int, default=None)
    parser.add_argument("--sdk-events", type=int, default=None)
    parser.add_argument("--worker-events", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="repetitions for the SDK and worker figures")
    parser.add_argument("--latency-rate", type=int, default=None, help="offered events/s (default 5,000)")
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--latency-reps", type=int, default=None,
                        help="latency runs at the offered rate, each with its own topics and worker (default 1)")
    parser.add_argument("--state-rates", type=lambda s: [int(x) for x in s.split(",")], default=[500, 5000],
                        help="offered events/s of the produce -> enforcement-state phase (default 500,5000)")
    parser.add_argument("--backlog-seconds", type=float, default=1800,
                        help="pre-filled events occurred within this many seconds before the run (default 1800)")
    parser.add_argument("--invoice-rows", type=int, default=None)
    parser.add_argument("--invoice-store", default=None, help="cached store dir (default .local/bench/invoice-<rows>)")
    parser.add_argument("--rebuild-invoice-store", action="store_true")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy the worker during an extra throughput run (default: on for full runs)")
    parser.add_argument("--bootstrap", default=None, help="use this broker instead of starting the benchmark's own")
    parser.add_argument("--state-dir", default=os.environ.get("METERSTREAM_SERVICES__STATE_DIR", "/tmp/bench-state"))
    parser.add_argument("--kafka-port", type=int, default=int(os.environ.get("METERSTREAM_SERVICES__KAFKA_PORT", 19192)))
    parser.add_argument("--controller-port", type=int,
                        default=int(os.environ.get("METERSTREAM_SERVICES__KAFKA_CONTROLLER_PORT", 19193)))
    parser.add_argument("--keep-broker", action="store_true", help="leave a broker started here running")
    parser.add_argument("--work-dir", default="/tmp/meterstream-bench", help="worker logs, stores, profiles")
    parser.add_argument("--output", default=None, help="results JSON (default bench/results/<timestamp>.json)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    updates: dict[str, Any] = {}
    for arg, name in (("customers", "customers"), ("sdk_events", "sdk_events"), ("worker_events", "worker_events"),
                      ("latency_rate", "latency_rate"), ("latency_seconds", "latency_seconds"),
                      ("latency_reps", "latency_reps"),
                      ("invoice_rows", "invoice_rows"), ("profile", "profile")):  # fmt: skip
        if getattr(args, arg) is not None:
            updates[name] = getattr(args, arg)
    if args.reps is not None:
        updates.update(sdk_reps=args.reps, worker_reps=args.reps, ref_reps=args.reps)
    return replace(plan, **updates)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bench = Bench(args, plan)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    results: dict[str, Any] = {
        "run_id": bench.run_id,
        "mode": "quick" if args.quick else "full",
        "workers": args.workers,
        "partitions": bench.partitions,
        "plan": asdict(plan),
        "targets": TARGETS,
        "machine": machine_info(),
        "source": source_fingerprint(),
        "worker_backlog_seconds": args.backlog_seconds,
        "worker_settings": {
            **{k: v for k, v in WorkerSettings().model_dump(mode="json").items()
               if k in ("batch_size", "batch_timeout", "window_seconds", "window_expires_seconds")},
            "env_overrides": bench.worker_env_overrides,
        },  # fmt: skip
    }
    exit_code = 0
    try:
        bench.broker_up()
        bench.clickhouse_up()
        results["versions"] = versions(bench.broker_version)
        m, v = results["machine"], results["versions"]
        console.print(
            f"[bold]machine[/] {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, "
            f"load average {' '.join(m['load_average_at_start'])}"
        )
        console.print("[bold]versions[/] " + ", ".join(f"{k} {val}" for k, val in v.items()))
        console.print(
            f"[bold]plan[/] {plan}; partitions {bench.partitions}; work dir {bench.run_dir}"
        )
        for phase, title, fn in (
            ("sdk", "1. SDK produce rate", bench.phase_sdk),
            ("worker", "2+5. worker throughput, bare consumers, memory", bench.phase_worker),
            ("latency", "3. produce -> budget-alert latency", bench.phase_latency),
            ("state", "3b. produce -> enforcement-state latency", bench.phase_state_latency),
            ("invoice", "4. invoice query over a large store", bench.phase_invoice),
        ):
            if phase not in phases:
                continue
            console.rule(title)
            phase_started = time.monotonic()
            try:
                results[phase] = fn()
            except BenchError as exc:  # a failed phase is reported; the others still run
                exit_code = 1
                results[phase] = {"error": str(exc)}
                console.print(f"[bold red]{phase} failed:[/] {exc}")
            except WorkerProcessError as exc:
                exit_code = 1
                results[phase] = {"error": f"worker failed: {exc}"}
                console.print(f"[bold red]{phase} failed: the worker died[/]; log tail:\n{str(exc)[-1500:]}")
            except Exception as exc:  # anything else in one phase: report it, run the next
                exit_code = 1
                results[phase] = {"error": f"{type(exc).__name__}: {exc}"}
                console.print(f"[bold red]{phase} failed:[/] {type(exc).__name__}: {exc}")
            results[phase]["phase_seconds"] = round(time.monotonic() - phase_started, 1)
            console.print(f"  done in {results[phase]['phase_seconds']:.0f} s")
    except Exception as exc:
        exit_code = 1
        results["error"] = f"{type(exc).__name__}: {exc}"
        console.print(f"[bold red]benchmark failed:[/] {results['error']}")
        console.print_exception()
    except KeyboardInterrupt:
        exit_code = 130
        results["error"] = "interrupted"
    finally:
        with console.status("cleaning up (workers, topics, broker)"):
            bench.cleanup()
        results["total_seconds"] = round(time.monotonic() - started, 1)
        results["machine"]["load_average_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        results["verdicts"] = verdicts(results)
        output = Path(args.output) if args.output else RESULTS_DIR / f"{bench.run_id}{'-quick' if args.quick else ''}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2, default=str))
        console.print(render(results))
        console.print(f"total {results['total_seconds']:.0f} s; results written to {output}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
