"""``meterstream demo``: the whole pipeline on this machine, with realistic traffic.

Starts the local broker and ClickHouse server, runs the real worker as a child process (exactly as
``meterstream worker`` runs in production), sends usage and outcome events for
a few dozen customers through the SDK — a few heavy users, many light ones,
several models, some resent events and a few malformed messages — and then
prints month-to-date usage, credits, cost to serve and the budget alerts raised,
checking the stored totals against the same events rated offline.

Each run is self-contained: its own topics (deleted afterwards), its own
consumer group and its own database on the ClickHouse server (the local one, started
here when the DSN points at it).
"""

from __future__ import annotations

import math
import random
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meterstream.clock import utc_now
from meterstream.config import Settings
from meterstream.periods import period_of
from meterstream.pricing.money import round_money
from meterstream.pricing.plans import Catalog, load_catalog
from meterstream.producers.client import DeliveryFailure, MeterClient
from meterstream.schemas.events import Attribution, OutcomeEvent, UsageEvent
from meterstream.topics import Topics

#: Model mix: cheap models carry most calls, frontier models most of the cost.
MODEL_MIX = {
    "gpt-4o-mini": 30,
    "gpt-4.1-mini": 15,
    "gpt-4o": 15,
    "claude-sonnet-4-5": 15,
    "claude-haiku-4-5": 12,
    "gemini-2.5-pro": 8,
    "gpt-5": 5,
}
WORKFLOWS = ["support-agent", "doc-search", "sales-assistant", "code-review"]
HEAVY_NAMES = ["acme-corp", "globex", "initech", "umbrella", "hooli", "stark-industries", "wayne-enterprises"]
MALFORMED = [
    b"{not json",
    b'{"event_id": "bad-1", "customer_id": "acme-corp", "occurred_at": "2026-01-01T00:00:00", "model": "gpt-4o"}',
    b'{"event_id": "bad-2", "customer_id": "globex", "occurred_at": "2026-01-01T00:00:00Z", "model": "gpt-4o",'
    b' "input_tokens": "1200"}',
    b'{"event_id": "bad-3", "customer_id": "initech", "occurred_at": "2026-01-01T00:00:00Z",'
    b' "model": "no-such-model", "input_tokens": 10}',
    b"\xff\xfe\x00 binary garbage",
]


class DemoError(RuntimeError):
    pass


@dataclass
class Traffic:
    usage: list[UsageEvent] = field(default_factory=list)
    outcomes: list[OutcomeEvent] = field(default_factory=list)
    duplicates: list[UsageEvent] = field(default_factory=list)

    @property
    def unique(self) -> list[UsageEvent | OutcomeEvent]:
        return [*self.usage, *self.outcomes]


def customer_ids(count: int) -> list[str]:
    names = HEAVY_NAMES[: min(len(HEAVY_NAMES), max(3, count // 6))]
    return names + [f"tenant-{i:03d}" for i in range(1, count - len(names) + 1)]


def generate_traffic(customers: list[str], events: int, seed: int, now: datetime) -> Traffic:
    """Power-law customers, a model mix, log-normal token counts, runs with outcomes."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.3 for rank in range(len(customers))]
    models = list(MODEL_MIX)
    model_weights = list(MODEL_MIX.values())
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    span = max((now - month_start).total_seconds() - 60, 60)
    traffic = Traffic()
    runs: dict[str, tuple[str, str]] = {}
    for _ in range(events):
        customer = rng.choices(customers, weights)[0]
        workflow = rng.choice(WORKFLOWS)
        # Agent runs are a handful of steps: reuse a recent run of this customer's workflow most of the time.
        run_key = f"{customer}|{workflow}"
        if run_key not in runs or rng.random() < 0.2:
            runs[run_key] = (f"run-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}", workflow)
            if len(traffic.usage) > 0 and rng.random() < 0.5:
                traffic.outcomes.append(_outcome(rng, customer, runs, run_key, month_start, span))
        run_id, _ = runs[run_key]
        input_tokens = max(1, int(rng.lognormvariate(math.log(1500), 0.9)))
        cached = int(input_tokens * rng.choice([0, 0, 0.3, 0.6]))
        event = UsageEvent(
            event_id=str(uuid.UUID(int=rng.getrandbits(128))),
            customer_id=customer,
            occurred_at=month_start + timedelta(seconds=rng.uniform(0, span)),
            model=rng.choices(models, model_weights)[0],
            input_tokens=input_tokens,
            cached_input_tokens=cached,
            output_tokens=max(1, int(rng.lognormvariate(math.log(300), 0.8))),
            workflow_id=workflow,
            run_id=run_id,
            attributes={"environment": "production", "feature": workflow},
        )
        traffic.usage.append(event)
        if rng.random() < 0.01:  # a client retry: the same event sent again
            traffic.duplicates.append(event)
    return traffic


def _outcome(
    rng: random.Random, customer: str, runs: dict[str, tuple[str, str]], run_key: str, start: datetime, span: float
) -> OutcomeEvent:
    run_id, workflow = runs[run_key]
    outcome_type = "resolved_ticket" if workflow == "support-agent" else "verified_application"
    return OutcomeEvent(
        event_id=str(uuid.UUID(int=rng.getrandbits(128))),
        customer_id=customer,
        occurred_at=start + timedelta(seconds=rng.uniform(0, span)),
        outcome_type=outcome_type,
        attribution=Attribution.AI_ONLY if rng.random() < 0.8 else Attribution.HUMAN_ASSISTED,
        workflow_id=workflow,
        run_id=run_id,
    )


def expected_credits(traffic: Traffic, catalog: Catalog) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for event in traffic.unique:
        totals[event.customer_id] += catalog.rate(event).credits
    return dict(totals)


def budgets_yaml(credits: dict[str, Decimal], customers: list[str]) -> str:
    """Budgets that make the alert paths visible: some customers cross 100%, some 80%, some 50%."""
    lines = ["customers:"]
    for rank, customer in enumerate(customers):
        spent = credits.get(customer, Decimal(0))
        if spent <= 0:
            continue
        if rank < 2:
            budget, action = spent / Decimal("1.1"), "block"  # ends at ~110%
        elif rank < 4:
            budget, action = spent / Decimal("0.9"), "downgrade"  # ~90%
        elif rank % 5 == 0:
            budget, action = spent / Decimal("0.6"), "alert"  # ~60%
        else:
            budget, action = spent * 3, "alert"  # ~33%: no alert
        budget = max(round_money(budget), Decimal("1.00"))
        extra = ", downgrade_to: gpt-4o-mini" if action == "downgrade" else ""
        lines.append(
            f'  {customer}: {{monthly_credits: "{budget}", thresholds: [50, 80, 100], action: {action}{extra}}}'
        )
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_demo(settings: Settings, *, customers: int, events: int, seed: int, timeout: float, console: Console) -> None:
    from meterstream.cs.tables import alerts_table, usage_table
    from meterstream.services.clickhouse import ClickHouseServer, is_local_dsn
    from meterstream.services.kafka import KafkaBroker, bootstrap_servers
    from meterstream.services.process import ServiceError
    from meterstream.storage.clickhouse import StoreError
    from meterstream.storage.queries import run_saved_query
    from meterstream.stream_processors.runner import WorkerProcess, WorkerProcessError
    from meterstream.topics import ensure_topics

    started = time.monotonic()
    now = utc_now()
    run_id = now.strftime("%Y%m%d%H%M%S")
    demo_dir = settings.services.state_dir / "demo"
    local_bootstrap = bootstrap_servers(settings.services)
    if settings.kafka.bootstrap_servers == local_bootstrap:
        try:
            with console.status("starting Kafka") as status:
                KafkaBroker(settings.services).up(on_step=lambda step: status.update(f"Kafka: {step}"))
        except ServiceError as exc:
            raise DemoError(str(exc)) from None
        console.print(f"[green]✓[/] Kafka broker ready at {local_bootstrap}")
    if is_local_dsn(settings.clickhouse, settings.services):
        try:
            with console.status("starting ClickHouse") as status:
                server = ClickHouseServer(settings.services).up(on_step=lambda s: status.update(f"ClickHouse: {s}"))
        except ServiceError as exc:
            raise DemoError(str(exc)) from None
        console.print(f"[green]✓[/] ClickHouse server ready at {server.http_url}")

    # Isolate this run: own topics, consumer group, store.
    kafka = settings.kafka.model_copy(update={"topic_prefix": f"demo-{run_id}."})
    clickhouse = settings.clickhouse.model_copy(update={"database": f"meterstream_demo_{run_id}"})
    catalog = load_catalog(settings.worker.plans_file)
    names = customer_ids(customers)
    traffic = generate_traffic(names, events, seed, now)
    credits = expected_credits(traffic, catalog)
    demo_dir.mkdir(parents=True, exist_ok=True)
    budgets_file = demo_dir / "budgets.yaml"
    budgets_file.write_text(budgets_yaml(credits, names))
    topics = ensure_topics(kafka)

    web_port = _free_port()
    env = {
        "METERSTREAM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "METERSTREAM_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "METERSTREAM_KAFKA__PARTITIONS": str(kafka.partitions),
        "METERSTREAM_CLICKHOUSE__DSN": clickhouse.dsn.get_secret_value(),
        "METERSTREAM_CLICKHOUSE__DATABASE": clickhouse.database,
        "METERSTREAM_WORKER__APP_ID": f"meterstream-demo-{run_id}",
        "METERSTREAM_WORKER__WEB_PORT": str(web_port),
        "METERSTREAM_WORKER__BUDGETS_FILE": str(budgets_file.resolve()),
        "METERSTREAM_WORKER__DATA_DIR": str((demo_dir / "worker").resolve()),
    }
    if settings.worker.plans_file:
        env["METERSTREAM_WORKER__PLANS_FILE"] = str(settings.worker.plans_file.resolve())
    worker = WorkerProcess(env, web_port, demo_dir / "worker.log")
    try:
        with console.status("starting the worker (joining the consumer group)"):
            worker.start(ready_timeout=min(timeout, 180))
        console.print(f"[green]✓[/] worker ready (log: {worker.log_path})")
        sent_messages = _send(traffic, kafka, topics, console)
        with _progress(console) as progress:
            task = progress.add_task("worker: rating and storing", total=sent_messages)
            stats = worker.wait_for(
                sent_messages, timeout, on_progress=lambda s: progress.update(task, completed=s["messages"])
            )
        period = period_of(now)
        usage = run_saved_query(clickhouse, "month_to_date", period=period, customer="").dicts()
        alerts = run_saved_query(clickhouse, "budget_alerts", period=period, customer="").dicts()
        totals = run_saved_query(clickhouse, "store_totals", period=period).dicts()[0]
    except (WorkerProcessError, StoreError) as exc:
        raise DemoError(str(exc)) from None
    finally:
        worker.stop()
        _delete_topics(kafka, topics, f"meterstream-demo-{run_id}")

    console.print(usage_table(usage, f"Month-to-date usage, {period} (all {len(usage)} customers)"))
    console.print(alerts_table(alerts, f"Budget alerts raised, {period}"))
    _summary(console, traffic, stats, totals, credits, usage, time.monotonic() - started, store_path=clickhouse)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


def _send(traffic: Traffic, kafka, topics, console: Console) -> int:  # type: ignore[no-untyped-def]
    from confluent_kafka import Producer

    failures: list[DeliveryFailure] = []
    events: list[UsageEvent | OutcomeEvent] = [*traffic.unique, *traffic.duplicates]
    random.Random(1).shuffle(events)
    with MeterClient(kafka, on_delivery_error=failures.append) as meter, _progress(console) as progress:
        task = progress.add_task("SDK: sending events", total=len(events))
        for i, event in enumerate(events, 1):
            meter.record(event)
            if i % 500 == 0:
                progress.update(task, completed=i)
        progress.update(task, completed=len(events))
        remaining = meter.flush(60)
    # Malformed messages, as a buggy service in another language might send them.
    raw = Producer(kafka.producer_config())
    for value in MALFORMED:
        raw.produce(topics.usage.name, key=b"malformed", value=value)
    if raw.flush(30) or remaining or failures:
        raise DemoError(f"{len(failures)} deliveries failed, {remaining} unconfirmed: is the broker healthy?")
    console.print(
        f"[green]✓[/] sent {len(traffic.usage):,} usage + {len(traffic.outcomes):,} outcome events, "
        f"{len(traffic.duplicates)} resent duplicates and {len(MALFORMED)} malformed messages; all confirmed"
    )
    return len(events) + len(MALFORMED)


def _summary(console, traffic, stats, totals, credits, usage, elapsed, store_path) -> None:  # type: ignore[no-untyped-def]
    expected_total = sum(credits.values(), Decimal(0))
    stored_total = totals["credits"] or Decimal(0)
    unique = len(traffic.unique)
    ok_rows = totals["rated_rows"] == unique
    ok_credits = stored_total == expected_total
    mark = {True: "[green]✓[/]", False: "[red]✗[/]"}
    console.print(
        f"{mark[ok_rows]} {totals['rated_rows']:,} rated rows stored for {unique:,} distinct events "
        f"({stats['duplicates']} resends counted once, {stats['dead_letters']} messages to the dead-letter topic)"
    )
    console.print(
        f"{mark[ok_credits]} stored usage + outcome credits {round_money(stored_total):,} = offline rating of the same events "
        f"{round_money(expected_total):,} (exact: {ok_credits})"
    )
    cost = sum((row["cost_to_serve"] for row in usage), Decimal(0))
    console.print(
        f"  cost to serve ${round_money(cost):,} across {len(usage)} customers; "
        f"{stats['alerts']} budget alerts; finished in {elapsed:.0f} s"
    )
    console.print(
        f"  explore it: METERSTREAM_CLICKHOUSE__DATABASE={store_path.database} "
        "meterstream usage   ·   stop the services: meterstream services down"
    )
    if not (ok_rows and ok_credits):
        raise DemoError("stored totals differ from the offline rating of the same events")


def _delete_topics(kafka, topics: Topics, app_id: str) -> None:  # type: ignore[no-untyped-def]
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka.confluent_config())
    try:
        names = [t for t in admin.list_topics(timeout=10).topics if t.startswith((kafka.topic_prefix, app_id))]
        if names:
            for future in admin.delete_topics(names, operation_timeout=30).values():
                future.result(timeout=30)
    except Exception:  # best effort: a leftover demo topic is harmless
        pass


__all__ = ["DemoError", "Path", "run_demo"]
