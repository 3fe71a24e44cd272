"""The ``meterstream`` command: services, migrate, worker, demo, usage, audit, alerts, schemas."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from meterstream.alerting.commands import forward_command, redeliver_command, tail_command
from meterstream.cli_common import check_period, fail, load_catalog_or_fail, pricing_errors, query_runner
from meterstream.config import get_settings
from meterstream.cs.commands import audit_command, margin_command, usage_app
from meterstream.cs.render import json_text, stdout_console
from meterstream.cs.tables import alerts_table
from meterstream.ops.commands import dlq_app, reconcile_command
from meterstream.ops.ingest_commands import import_command, otlp_command
from meterstream.ops.provider_commands import reconcile_provider_command

app = typer.Typer(help="Usage metering for AI products: SDK -> Kafka -> Faust -> ClickHouse.", no_args_is_help=True)
services_app = typer.Typer(help="Local Kafka broker and ClickHouse server for machines without Docker.", no_args_is_help=True)
alerts_app = typer.Typer(help="Budget alerts.", no_args_is_help=True)
schemas_app = typer.Typer(help="Event schemas for producers in other languages.", no_args_is_help=True)
app.add_typer(services_app, name="services")
app.add_typer(alerts_app, name="alerts")
app.add_typer(schemas_app, name="schemas")

console = stdout_console()  # full width when piped: nothing cut
err_console = Console(stderr=True)

PeriodOption = Annotated[
    str | None, typer.Option("--period", help="Billing period YYYY-MM (UTC); default: the current month.")
]
CustomerOption = Annotated[str | None, typer.Option("--customer", help="Only this customer.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


# -- services ---------------------------------------------------------------------------------


ServiceArgument = Annotated[
    list[str] | None,
    typer.Argument(help="kafka, clickhouse, or both (the default).", show_default=False),
]
SERVICES = ("kafka", "clickhouse")


def _services(names: list[str] | None) -> list[str]:
    chosen = names or list(SERVICES)
    unknown = [name for name in chosen if name not in SERVICES]
    if unknown:
        raise fail(f"unknown service {unknown[0]!r}: choose from {', '.join(SERVICES)}")
    return [name for name in SERVICES if name in chosen]


def _service(name: str, settings: Any) -> Any:
    from meterstream.services.clickhouse import ClickHouseServer
    from meterstream.services.kafka import KafkaBroker

    return KafkaBroker(settings.services) if name == "kafka" else ClickHouseServer(settings.services)


@services_app.command("up")
def services_up(names: ServiceArgument = None) -> None:
    """Start the local Kafka broker and ClickHouse server (127.0.0.1 only); harmless if they run."""
    from meterstream.services.process import ServiceError

    settings = get_settings()
    for name in _services(names):
        label = "Kafka" if name == "kafka" else "ClickHouse"
        try:
            with console.status(f"starting {label}") as status:
                result = _service(name, settings).up(on_step=lambda step, label=label: status.update(f"{label}: {step}"))
        except ServiceError as exc:
            raise fail(str(exc)) from None
        if name == "kafka":
            console.print(f"Kafka ready at [bold]{result.bootstrap}[/] (pid {result.pid}, data in {result.data_dir})")
        else:
            console.print(f"ClickHouse ready at [bold]{result.http_url}[/] (native port {result.tcp_port}, "
                          f"pid {result.pid}, data in {result.data_dir})")


@services_app.command("down")
def services_down(names: ServiceArgument = None) -> None:
    """Stop the local Kafka broker and ClickHouse server; harmless if they are not running."""
    from meterstream.services.process import ServiceError

    settings = get_settings()
    for name in _services(names):
        label = "Kafka" if name == "kafka" else "ClickHouse"
        try:
            stopped = _service(name, settings).down()
        except ServiceError as exc:
            raise fail(str(exc)) from None
        console.print(f"{label} stopped" if stopped else f"{label} was not running")


def _port_taken_hint(name: str, services: Any) -> None:
    """A stopped service whose port answers: most likely one started from another directory's state."""
    from meterstream.services.process import port_in_use, port_owner

    port = services.kafka_port if name == "kafka" else services.clickhouse_http_port
    if port_in_use(port):
        owner = port_owner(port) or "another process"
        console.print(f"  but port {port} is in use by {owner}: a {name} started with another state directory "
                      f"(this one is {services.state_dir}, relative to where the command runs; "
                      "METERSTREAM_SERVICES__STATE_DIR) or another program")


@services_app.command("status")
def services_status(names: ServiceArgument = None, as_json: JsonOption = False) -> None:
    """Show whether the local services run, where, and with which data directory (exit 3 if one is stopped)."""
    settings = get_settings()
    statuses = {name: _service(name, settings).status() for name in _services(names)}
    if as_json:
        console.print_json(json.dumps({name: s.__dict__ for name, s in statuses.items()}, default=str))
    for name, status in statuses.items():
        if as_json:
            break
        state = "[green]running[/]" if status.running else "[yellow]stopped[/]"
        if name == "kafka":
            console.print(f"Kafka {state}  pid={status.pid}  bootstrap={status.bootstrap}  data={status.data_dir}")
        else:
            console.print(f"ClickHouse {state}  pid={status.pid}  http={status.http_url}  "
                          f"tcp={status.tcp_port}  data={status.data_dir}")
        if not status.running:
            _port_taken_hint(name, settings.services)
    if not all(status.running for status in statuses.values()):
        raise typer.Exit(3)


# -- store ------------------------------------------------------------------------------------


@app.command()
def migrate() -> None:
    """Apply the numbered ClickHouse DDL in sql/ (idempotent)."""
    from meterstream.storage.clickhouse import StoreError, connect
    from meterstream.storage.clickhouse import migrate as apply_migrations

    settings = get_settings()
    try:
        client = connect(settings.clickhouse)
        applied = apply_migrations(client)
        client.close()
    except StoreError as exc:
        raise fail(str(exc)) from None
    if applied:
        for name in applied:
            console.print(f"applied {name}")
    else:
        console.print("schema is up to date")


@app.command()
def settle(
    before: Annotated[
        str | None, typer.Option(help="settle the days before this date (YYYY-MM-DD); default today, UTC")
    ] = None,
) -> None:
    """Settle closed days: the per-day sums invoices read instead of rated rows (sql/007; incremental)."""
    from datetime import date

    from meterstream.storage.clickhouse import StoreError, open_store
    from meterstream.storage.settle import settle as settle_days

    settings = get_settings()
    try:
        cutoff = date.fromisoformat(before) if before else None
    except ValueError:
        raise fail(f"--before must be a date (YYYY-MM-DD), not {before!r}") from None
    try:
        store = open_store(settings.clickhouse)
        try:
            result = settle_days(store.client, cutoff)
        finally:
            store.close()
    except StoreError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        raise fail(f"settle failed: {exc}") from None
    console.print(
        f"settled {result.customer_days:,} customer-days before {result.before} "
        f"({result.rows_written:,} rows; {result.unsettleable_customer_days:,} left to FINAL) "
        f"in {result.seconds:.1f} s"
    )


# -- worker -----------------------------------------------------------------------------------


@app.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="crit, error, warn, info or debug")] = "info",
) -> None:
    """Run the Faust worker: rate, dedupe, count, alert, and write to ClickHouse."""
    import asyncio

    import faust
    from aiokafka.errors import KafkaError

    from meterstream.budgets import BudgetBookError, load_budgets
    from meterstream.pricing.plans import PlanError, load_catalog
    from meterstream.pricing.pricebook import PriceBookError
    from meterstream.producers.ledger import LedgerUnavailable, RedisLedger
    from meterstream.storage.clickhouse import StoreError
    from meterstream.stream_processors.alerts import (
        OutboxKafka,
        current_states,
        publish_states,
        reconcile_alerts,
        reconcile_ledger,
        standalone_outbox,
    )
    from meterstream.stream_processors.app import create_app, take_over_garbage_collection
    from meterstream.topics import TopicError, customer_partition, ensure_topics

    settings = get_settings()
    try:
        topics = ensure_topics(settings.kafka)
        store = _open_store_waiting(settings.clickhouse)
    except (TopicError, StoreError) as exc:
        raise fail(str(exc)) from None
    # One loop: the start-up steps below run on it (aiokafka), then the Faust app does.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        catalog = load_catalog(settings.worker.plans_file)
        budgets = load_budgets(settings.worker.budgets_file, catalog)
        with standalone_outbox(settings.kafka, loop) as kafka:
            # The ids already on the topic; the outbox itself runs when partitions are assigned, for
            # their customers only (alerts.py says why not here).
            published, _ = reconcile_alerts(store, budgets, kafka, topics.budget_alerts.name,
                                            owns=lambda customer_id: False,
                                            open_periods=catalog.open_billing_periods)  # fmt: skip
            states = current_states(store, budgets, catalog_fingerprint=catalog.fingerprint(),
                                    billing_period=catalog.billing_period)  # fmt: skip
            publish_states(kafka, topics.enforcement.name, states)

        def reconcile_for(partitions: set[int], kafka: OutboxKafka) -> set[str]:
            count = settings.kafka.partitions
            ids, sent = reconcile_alerts(
                store, budgets, kafka, topics.budget_alerts.name,
                owns=lambda customer_id: customer_partition(customer_id, count) in partitions,
                open_periods=catalog.open_billing_periods,
            )  # fmt: skip
            if sent:
                logging.getLogger("meterstream.alerts").warning(
                    "published %d budget alerts a previous owner of partitions %s recorded but had not sent",
                    sent, sorted(partitions))  # fmt: skip
            return ids

        try:
            reconcile_ledger(RedisLedger.from_settings(settings.ledger), states)
        except LedgerUnavailable as exc:  # each batch sets its customers' totals again
            err_console.print(f"warning: {exc}; the ledger's counted totals follow with the next batches")
        faust_app = create_app(settings, store, published, reconcile_for)
        if settings.worker.gc_collect_seconds > 0:
            take_over_garbage_collection()
        faust.Worker(faust_app, loop=loop, loglevel=loglevel).execute_from_commandline()
    except (PriceBookError, PlanError, BudgetBookError, StoreError, KafkaError, TimeoutError, ValueError) as exc:
        raise fail(str(exc)) from None
    finally:
        store.close()


def _open_store_waiting(clickhouse: Any) -> Any:
    """Open the store, waiting (bounded) while it is unavailable: a worker started before its
    ClickHouse server, or during an outage, waits instead of crashing. A wrong password or a
    failing statement is not waited for."""
    import time

    from meterstream.storage.clickhouse import StoreError, dsn_origin, open_store

    deadline = time.monotonic() + clickhouse.start_wait_seconds
    delay = clickhouse.retry_backoff_initial
    while True:
        try:
            return open_store(clickhouse)
        except StoreError as exc:
            left = deadline - time.monotonic()
            if not exc.retryable or left <= 0:
                if exc.retryable:
                    raise StoreError(f"ClickHouse at {dsn_origin(clickhouse)} still unavailable after "
                                     f"{clickhouse.start_wait_seconds:.0f} s: {exc}") from None
                raise
            err_console.print(f"waiting for ClickHouse at {dsn_origin(clickhouse)} (unavailable; "
                              f"giving up in {left:.0f} s): {str(exc)[:200]}", highlight=False)
            time.sleep(min(delay, max(left, 0.1)))
            delay = min(delay * 2, clickhouse.retry_backoff_max)


# -- demo -------------------------------------------------------------------------------------


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=3, max=1000, help="How many customers send traffic.")] = 40,
    events: Annotated[int, typer.Option(min=100, max=2_000_000, help="How many usage events to send.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed for the traffic.")] = 7,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the worker to catch up.")] = 300.0,
) -> None:
    """Start the services, run the worker, send realistic traffic and print what was billed."""
    from meterstream.demo import DemoError, run_demo

    try:
        run_demo(get_settings(), customers=customers, events=events, seed=seed, timeout=timeout, console=console)
    except DemoError as exc:
        raise fail(str(exc)) from None


# -- queries ----------------------------------------------------------------------------------


def _emit_json(result: Any) -> None:
    print(json_text(result.dicts()))


# `meterstream usage` (month to date and spend; top-customers, margin, cache-savings,
# cost-per-outcome, hourly, daily) and `meterstream audit` live in meterstream/cs/.
app.add_typer(usage_app, name="usage")
app.command("audit")(audit_command)


@alerts_app.command("list")
def alerts_list(period: PeriodOption = None, customer: CustomerOption = None, as_json: JsonOption = False) -> None:
    """Budget alerts raised in a period, in the order they were crossed."""
    settings = get_settings()
    period = check_period(period)
    with query_runner(settings) as run:
        result = run("budget_alerts", period=period, customer=customer or "")
    if as_json:
        _emit_json(result)
        return
    console.print(alerts_table(result.dicts(), f"Budget alerts, {period}"))


# `alerts tail`, `alerts forward` and `alerts redeliver` (the alert consumers) live in meterstream/alerting/.
alerts_app.command("tail")(tail_command)
alerts_app.command("forward")(forward_command)
alerts_app.command("redeliver")(redeliver_command)


# -- billing ----------------------------------------------------------------------------------

PlansOption = Annotated[
    Path | None, typer.Option("--plans", help="Plan catalog (YAML); default: METERSTREAM_WORKER__PLANS_FILE or the shipped one.")
]


def _print_invoice_json(invoices: Any) -> None:
    # Decimals as plain decimal strings, exactly as computed: machines must not re-round them.
    print(json_text(invoices))


@app.command()
def invoice(
    customer: Annotated[str, typer.Option("--customer", help="The customer to invoice.")],
    period: PeriodOption = None,
    plans: PlansOption = None,
    as_json: JsonOption = False,
) -> None:
    """The invoice for one customer and period from ClickHouse: the issued record once the period is closed.

    A closed period (`meterstream close-period`) returns exactly the invoice stored then, whatever
    changed since. Before that it is computed from the rated rows: a preview mid-period, "final"
    after it ends; its totals equal `meterstream rate` on the same events, to the cent.
    """
    from meterstream.billing import invoice_from_store
    from meterstream.pricing.invoice import render_invoice_text

    settings = get_settings()
    period = check_period(period)
    catalog = load_catalog_or_fail(plans, settings)
    with pricing_errors(), query_runner(settings) as run:
        result = invoice_from_store(run, catalog, customer, period)
    if as_json:
        _print_invoice_json(result)  # one customer, one period: one object
    else:
        console.print(render_invoice_text(result), highlight=False)


@app.command("close-period")
def close_period(
    period: Annotated[str, typer.Option("--period", help="The billing period YYYY-MM (UTC) to close.")],
    customer: CustomerOption = None,
    plans: PlansOption = None,
) -> None:
    """Issue a closed period's invoices: store their lines, totals, plan versions and catalog fingerprint.

    One invoice per customer with usage in the period or billed for it by the catalog (or only
    --customer), skipping those already issued. Refused until the period's late grace has passed.
    Issued invoices never change: `invoice` returns them as stored.
    """
    from datetime import timedelta

    from meterstream.billing import invoices_to_issue
    from meterstream.clock import utc_now
    from meterstream.storage.clickhouse import StoreError, open_store
    from meterstream.storage.issued import store_issued_invoice
    from meterstream.storage.queries import saved_query

    settings = get_settings()
    period = check_period(period)
    catalog = load_catalog_or_fail(plans, settings)
    try:
        store = open_store(settings.clickhouse)
        try:

            def run(name: str, **params: str) -> Any:
                return store.query(saved_query(name), params)

            with pricing_errors():
                invoices = invoices_to_issue(
                    run, catalog, period, now=utc_now(),
                    late_grace=timedelta(seconds=settings.worker.late_grace_seconds),
                    customers=[customer] if customer else None,
                )  # fmt: skip
            for issued in invoices:
                store_issued_invoice(store.client, issued, catalog)
                console.print(f"issued {issued.invoice_number}: {issued.total:,} {issued.currency}", highlight=False)
        finally:
            store.close()
    except StoreError as exc:
        raise fail(str(exc)) from None
    if not invoices:
        console.print(f"nothing to issue for {period}")


@app.command()
def rate(
    plan: Annotated[Path, typer.Option("--plan", help="Plan catalog (YAML) to rate with.")],
    events: Annotated[Path, typer.Option("--events", help="Events, one JSON object per line (the wire format).")],
    period: Annotated[
        str | None,
        typer.Option("--period", help="Only this billing period YYYY-MM (UTC); default: every period in the file."),
    ] = None,
) -> None:
    """Rate a file of events offline (no Kafka, no ClickHouse) and print the invoices as JSON.

    One invoice per customer and period present in the file, oldest first (grant balances
    carried forward), or only --period. Invalid lines, events the plan cannot price and
    refused reversals are reported on stderr and make the exit code 2; the invoices of
    everything else are still printed (refused reversals also under "refused").
    """
    from meterstream.billing import invoices_from_rated, rate_events, read_events
    from meterstream.pricing.invoice import InvoiceError

    settings = get_settings()
    if period is not None:
        period = check_period(period)
    catalog = load_catalog_or_fail(plan, settings)
    if not events.is_file():
        raise fail(f"no such events file: {events}")
    parsed, bad = read_events(events)
    refused: list[Any] = []
    rated, unpriced = rate_events(catalog, parsed, refused=refused)
    for line in bad:
        err_console.print(f"{events}:{line.line}: {line.reason}", highlight=False)
    for message in unpriced:
        err_console.print(f"not priced: {message}", highlight=False)
    for reversal in refused:
        err_console.print(f"refused reversal {reversal.event_id}: {reversal.reason}", highlight=False)
    try:
        invoices = invoices_from_rated(catalog, rated, period=period, refused=refused)
    except InvoiceError as exc:
        raise fail(str(exc)) from None
    _print_invoice_json(invoices)
    if bad or unpriced or refused:
        raise typer.Exit(2)


@app.command()
def rerate(
    plans: Annotated[Path, typer.Option("--plans", help="The new plan catalog to re-rate with.")],
    period: PeriodOption = None,
    current: Annotated[
        Path | None, typer.Option("--current", help="The catalog the period was billed with; default as for invoice.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-rate a period's stored events under another catalog: old total, new total, difference.

    The old total is the issued invoice once the period is closed (else it is computed with
    --current). Read-only: nothing stored changes; issued invoices stay as they were billed.
    """
    from meterstream.billing import (
        invoice_from_store,
        invoices_from_rated,
        rate_events,
        stored_events_to_rerate,
    )

    settings = get_settings()
    period = check_period(period)
    old_catalog = load_catalog_or_fail(current, settings)
    new_catalog = load_catalog_or_fail(plans, settings)
    rows = []
    with pricing_errors(), query_runner(settings) as run:
        customers = [row["customer_id"] for row in run("period_customers", period=period).dicts()]
        for customer in customers:
            old = invoice_from_store(run, old_catalog, customer, period)
            events, earlier = stored_events_to_rerate(run, period, customer)
            rated, unpriced = rate_events(new_catalog, events, earlier=earlier)
            if unpriced:
                raise fail(f"the new catalog cannot price {len(unpriced)} events of {customer}: {unpriced[0]}")
            new = invoices_from_rated(new_catalog, rated, period=period)
            new_total = new[0].total if new else Decimal(0)
            rows.append({"customer_id": customer, "old_total": old.total, "new_total": new_total,
                         "difference": new_total - old.total, "old_plan_version": old.plan_version,
                         "new_plan_version": new[0].plan_version if new else ""})  # fmt: skip
    if as_json:
        print(json_text(rows))
        return
    table = Table(title=f"Re-rating {period}: {current or 'current catalog'} -> {plans}")
    for column in ("customer", "old plan", "old total", "new plan", "new total", "difference"):
        table.add_column(column, justify="left" if column in ("customer", "old plan", "new plan") else "right")
    for row in rows:
        table.add_row(row["customer_id"], row["old_plan_version"], f"{row['old_total']:,}", row["new_plan_version"],
                      f"{row['new_total']:,}", f"{row['difference']:+,}")  # fmt: skip
    total_old = sum((r["old_total"] for r in rows), Decimal(0))
    total_new = sum((r["new_total"] for r in rows), Decimal(0))
    table.add_row("[bold]all", "", f"{total_old:,}", "", f"{total_new:,}", f"{total_new - total_old:+,}")
    console.print(table)


# Revenue, cost to serve and margin; also `meterstream usage margin` (meterstream/cs/commands.py).
app.command("margin")(margin_command)

# `dlq list|show|replay` and `reconcile` (nothing lost, nothing counted twice) live in meterstream/ops/.
app.add_typer(dlq_app, name="dlq")
app.command("reconcile")(reconcile_command)
# Metered vs the providers' own bills (meterstream/ops/provider_bills.py).
app.command("reconcile-provider")(reconcile_provider_command)


# `meterstream import FILE`: backfill historical events (meterstream/producers/backfill.py).
app.command("import")(import_command)
# `meterstream otlp`: meter GenAI spans received over OTLP/HTTP (meterstream/producers/otlp.py).
app.command("otlp")(otlp_command)


# -- usage profiles and the threshold advisor (meterstream/advisor.py) ------------------------


@app.command()
def profile(
    period: PeriodOption = None,
    by: Annotated[
        str, typer.Option("--by", help="plan (the catalog's assignment) or cohort (first-seen month).")
    ] = "plan",
    cohorts: Annotated[
        Path | None, typer.Option("--cohorts", help="YAML mapping customer_id: cohort label; implies --by cohort.")
    ] = None,
    plans: PlansOption = None,
    as_json: JsonOption = False,
) -> None:
    """p50/p75/p90 of each meter's period total per customer, by plan or cohort (nearest rank)."""
    from meterstream import advisor

    if by not in ("plan", "cohort"):
        raise fail("--by must be plan or cohort")
    settings = get_settings()
    period = check_period(period)
    with query_runner(settings) as run:
        try:
            if cohorts is not None:
                by, group_of = "cohort", advisor.cohort_grouping(advisor.load_cohorts(cohorts))
            elif by == "cohort":
                group_of = advisor.cohort_grouping(advisor.first_periods(run, period))
            else:
                group_of = advisor.plan_grouping(load_catalog_or_fail(plans, settings))
            profiles = advisor.profiles_from_store(run, period, group_of)
        except advisor.AdvisorError as exc:
            raise fail(str(exc)) from None
    if as_json:
        print(advisor.profiles_json(period, by, profiles))
    elif not profiles:
        console.print(f"no rated usage in {period}")
    else:
        console.print(advisor.profile_table(profiles, f"Usage profiles, {period}, by {by}"))


@app.command()
def advise(
    plan: Annotated[Path, typer.Option("--plan", help="Plan catalog (YAML) holding the candidate plan.")],
    period: PeriodOption = None,
    plan_id: Annotated[str | None, typer.Option("--plan-id", help="Default: the only plan, else default_plan.")] = None,
    plan_version: Annotated[
        str | None, typer.Option("--plan-version", help="Default: the one in effect at the period start.")
    ] = None,
    included: Annotated[str | None, typer.Option("--included", help="Override the included credits.")] = None,
    overage_rate: Annotated[
        str | None, typer.Option("--overage-rate", help="Override the overage: this price per credit.")
    ] = None,
    percentile: Annotated[
        str, typer.Option("--percentile", help="Show the allowance that keeps this % of customers within it.")
    ] = "75",
    all_customers: Annotated[
        bool, typer.Option("--all-customers", help="Replay every customer of the period, not only the plan's.")
    ] = False,
    png: Annotated[Path | None, typer.Option("--png", help="Also draw the figures to this PNG file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Replay a period under a candidate plan: who stays within the allowance, revenue, cost, margin."""
    from meterstream import advisor

    settings = get_settings()
    period = check_period(period)
    catalog = load_catalog_or_fail(plan, settings)
    with pricing_errors(), query_runner(settings) as run:
        try:
            advice = advisor.advice_from_store(
                run, catalog, period, plan_id=plan_id, version=plan_version, included=included,
                overage_rate=overage_rate, percentile=percentile, all_customers=all_customers,
            )  # fmt: skip
        except advisor.AdvisorError as exc:
            raise fail(str(exc)) from None
    if png is not None:
        advisor.write_advice_chart(advice, png)
    if as_json:
        print(json_text(advice.to_json()))
        return
    console.print(advisor.advice_table(advice))
    for line in advisor.advice_summary(advice):
        console.print(line, highlight=False)
    if png is not None:
        console.print(f"chart: {png}", highlight=False)


# -- customer-visible usage (meterstream/web/) ------------------------------------------------


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Port; default METERSTREAM_WEB__PORT (8088).")] = None,
    bind: Annotated[str | None, typer.Option(help="Address; default METERSTREAM_WEB__BIND (127.0.0.1).")] = None,
) -> None:
    """Serve each customer its usage, budget burn-down and enforcement state (page + JSON API, per-customer tokens)."""
    from meterstream.web.server import WebError
    from meterstream.web.server import serve as serve_web

    try:
        serve_web(get_settings(), port=port, bind=bind)
    except WebError as exc:
        raise fail(str(exc)) from None


# -- schemas ----------------------------------------------------------------------------------


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument(help="Where to write *.schema.json")] = Path("docs/schemas"),
) -> None:
    """Write the JSON Schema of each event, for producers in other languages."""
    from meterstream.schemas.jsonschema import export_json_schemas

    for path in export_json_schemas(directory):
        console.print(f"wrote {path}")


def main() -> None:  # pragma: no cover - console entry point
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
