"""The customer-success commands: ``meterstream usage …``, ``meterstream margin``, ``meterstream audit``.

Registered in :mod:`meterstream.cli`; this module does not import it (``python -m
meterstream.cli`` would import it twice). Reads are saved queries
on one connection to the ClickHouse server (:func:`meterstream.cli_common.query_runner`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console

from meterstream.cli_common import check_period, fail, load_catalog_or_fail, pricing_errors, query_runner
from meterstream.config import get_settings
from meterstream.cs.render import Column, Format, Report, emit, stdout_console
from meterstream.periods import Period

console = stdout_console()  # full width when piped: nothing cut
err_console = Console(stderr=True)

PeriodOption = Annotated[
    str | None, typer.Option("--period", help="Billing period YYYY-MM (UTC); default: the current month.")
]
CustomerOption = Annotated[str | None, typer.Option("--customer", help="Only this customer.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (full precision) instead of a table.")]
CsvOption = Annotated[bool, typer.Option("--csv", help="Print CSV (full precision) instead of a table.")]
PlansOption = Annotated[
    Path | None,
    typer.Option("--plans", help="Plan catalog (YAML); default: METERSTREAM_WORKER__PLANS_FILE or the shipped one."),
]

usage_app = typer.Typer(
    help="Usage reports for customer success. Without a subcommand: month-to-date usage and spend.",
    invoke_without_command=True,
)


# -- helpers ----------------------------------------------------------------------------------


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


def output_format(as_json: bool, as_csv: bool) -> Format:
    if as_json and as_csv:
        raise fail("choose one of --json and --csv")
    return Format.JSON if as_json else Format.CSV if as_csv else Format.TABLE


def show(report: Report, fmt: Format, problems: Sequence[str] = ()) -> None:
    for problem in problems:
        warn(problem)
    emit(report, fmt, console)


TOKENS = [Column("input_tokens", "input tok", "int"), Column("cached_input_tokens", "cached tok", "int"),
          Column("output_tokens", "output tok", "int")]  # fmt: skip
# "Credits" has one meaning per word in every report (meterstream.cs.reports.CREDIT_KINDS).
CREDITS = [Column("usage_credits", "usage credits", "credits"), Column("outcome_credits", "outcome credits", "credits")]
CREDITS_NOTE = ("usage credits: usage events, what the invoice's allowance and overage count; "
                "outcome credits: outcomes (net of reversals), counted by budgets, priced in money on the invoice")
BILLED_NOTE = "billed credits: overage credits the invoice charges for (after the allowance and credit grants)"


# -- usage (month to date) ---------------------------------------------------------------------


@usage_app.callback(invoke_without_command=True)
def usage(
    ctx: typer.Context,
    period: PeriodOption = None,
    customer: CustomerOption = None,
    plans: PlansOption = None,
    spend: Annotated[bool, typer.Option("--spend/--no-spend", help="Add the invoice preview (money) per customer.")] = True,
    as_json: JsonOption = False,
    as_csv: CsvOption = False,
) -> None:
    """Month-to-date usage and spend per customer: events, tokens, usage and outcome credits, cost, invoice preview.

    Spend is the billed credits and the money of the invoice preview (`meterstream invoice`), all customers
    from one query for the period.
    Subcommands: top-customers, margin, cache-savings, cost-per-outcome, hourly, daily.
    """
    if ctx.invoked_subcommand is not None:
        return
    from meterstream.cs.reports import month_to_date

    settings = get_settings()
    fmt = output_format(as_json, as_csv)
    period = check_period(period)
    catalog = load_catalog_or_fail(plans, settings) if spend else None
    with query_runner(settings) as run:
        result = month_to_date(run, catalog, period, customer or "")
    columns = [Column("customer_id", "customer"), Column("events", "events", "int"), *TOKENS, *CREDITS,
               Column("cost_to_serve", "cost to serve $", "cost")]  # fmt: skip
    fields = [c.key for c in columns] + ["models"]
    notes = [CREDITS_NOTE]
    if spend:
        columns += [Column("billed_credits", "billed credits", "credits"), Column("spend", "spend $", "money"),
                    Column("invoice_status", "invoice"), Column("plan_version", "plan version")]  # fmt: skip
        fields += ["billed_credits", "spend", "currency", "plan_version", "invoice_status"]
        notes.append(BILLED_NOTE)
    title = "Month-to-date usage and spend" if spend else "Month-to-date usage"
    report = Report(f"{title}, {period}", columns, result.rows, fields, notes=notes)
    show(report, fmt, result.problems)


# -- top customers ---------------------------------------------------------------------------


@usage_app.command("top-customers")
def top_customers_command(
    period: PeriodOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help="How many customers.")] = 10,
    as_json: JsonOption = False,
    as_csv: CsvOption = False,
) -> None:
    """Customers ranked by cost to serve, the most expensive first, with their share of the period's cost."""
    from meterstream.cs.reports import top_customers

    settings = get_settings()
    fmt = output_format(as_json, as_csv)
    period = check_period(period)
    with query_runner(settings) as run:
        rows = top_customers(run, period, limit).rows
    columns = [Column("customer_id", "customer"), Column("events", "events", "int"), *TOKENS, *CREDITS,
               Column("cost_to_serve", "cost to serve $", "cost"),
               Column("cost_share", "share of cost", "percent"), Column("models", "models", "int")]  # fmt: skip
    show(Report(f"Top {limit} customers by cost to serve, {period}", columns, rows, notes=[CREDITS_NOTE]), fmt)


# -- margin ------------------------------------------------------------------------------------


def margin_command(
    period: PeriodOption = None,
    by: Annotated[str, typer.Option("--by", help="customer, workflow or model")] = "customer",
    plans: PlansOption = None,
    as_json: JsonOption = False,
    as_csv: CsvOption = False,
) -> None:
    """Revenue, cost to serve and margin for a period, per customer, workflow or model.

    Revenue is each customer's invoice total, spread over its usage by usage credits (outcome lines over its outcomes); cost to serve is exact per row.
    """
    from meterstream.billing import MARGIN_DIMENSIONS
    from meterstream.cs.reports import margin
    from meterstream.pricing.money import round_money

    if by not in MARGIN_DIMENSIONS:
        raise fail("--by must be customer, workflow or model")
    settings = get_settings()
    fmt = output_format(as_json, as_csv)
    period = check_period(period)
    catalog = load_catalog_or_fail(plans, settings)
    with pricing_errors(), query_runner(settings) as run:
        rows = margin(run, catalog, period, by).rows
    if fmt is not Format.TABLE:
        # Money rounded once, to the cent, as on the invoices it is allocated from.
        rows = [{**r, **{k: round_money(r[k]) for k in ("revenue", "cost_to_serve", "margin")}} for r in rows]
    columns = [Column(by, by), Column("events", "events", "int"), Column("usage_credits", "usage credits", "credits"),
               Column("revenue", "revenue $", "money"), Column("cost_to_serve", "cost to serve $", "money"),
               Column("margin", "margin $", "money"), Column("margin_percent", "margin %", "percent")]  # fmt: skip
    notes = ["revenue is spread over usage by usage credits (outcome lines over outcomes); " + CREDITS_NOTE]
    show(Report(f"Margin by {by}, {period}", columns, rows, notes=notes), fmt)


usage_app.command("margin")(margin_command)


# -- cache savings -----------------------------------------------------------------------------


@usage_app.command("cache-savings")
def cache_savings_command(
    period: PeriodOption = None,
    customer: CustomerOption = None,
    by: Annotated[str, typer.Option("--by", help="customer-model, customer or model")] = "customer-model",
    plans: PlansOption = None,
    as_json: JsonOption = False,
    as_csv: CsvOption = False,
) -> None:
    """What prompt caching saved, in cost to serve and in the customer's usage credits.

    Cost saved = cached tokens × (provider input − cached input price per 1M) / 1M; usage credits saved = cached tokens × (input − cached input credits per 1K) / 1K, with the rates of the plan version that rated the tokens.
    """
    from meterstream.cs.reports import CACHE_GROUPINGS, cache_savings

    if by not in CACHE_GROUPINGS:
        raise fail(f"--by must be one of {', '.join(CACHE_GROUPINGS)}")
    settings = get_settings()
    fmt = output_format(as_json, as_csv)
    period = check_period(period)
    catalog = load_catalog_or_fail(plans, settings)
    with query_runner(settings) as run:
        result = cache_savings(run, catalog, period, customer or "", by)
    keys = {"customer-model": ["customer_id", "model"], "customer": ["customer_id"], "model": ["model"]}[by]
    columns = [Column(k, k.removesuffix("_id")) for k in keys] + [
        Column("events", "token events", "int"), Column("input_tokens", "input tok", "int"),
        Column("cached_input_tokens", "cached tok", "int"), Column("hit_rate", "hit rate", "percent"),
        Column("cost_saved", "cost saved $", "cost"), Column("cost_to_serve", "cost to serve $", "cost"),
        Column("usage_credits_saved", "usage credits saved", "credits"),
        Column("usage_credits", "usage credits", "credits"),
    ]  # fmt: skip
    fields = [*keys, "events", "events_with_cache_hits", "input_tokens", "cached_input_tokens", "hit_rate",
              "cost_saved", "cost_to_serve", "cost_without_cache", "usage_credits_saved", "usage_credits",
              "usage_credits_without_cache", "unvalued_cached_tokens"]  # fmt: skip
    total = None
    if result.rows:
        total = {keys[0]: "all"} | {k: sum((r[k] for r in result.rows), 0) for k in
                                    ("events", "input_tokens", "cached_input_tokens", "cost_saved", "cost_to_serve",
                                     "usage_credits_saved", "usage_credits")}  # fmt: skip
    formula = (
        "cost saved = cached tokens × (provider input − cached input $/1M) / 1M; "
        "usage credits saved = cached tokens × (input − cached input credits/1K) / 1K"
    )
    notes = [formula]
    show(Report(f"Prompt-cache savings, {period}", columns, result.rows, fields, total, notes), fmt, result.problems)


# -- cost per outcome --------------------------------------------------------------------------


@usage_app.command("cost-per-outcome")
def cost_per_outcome_command(
    period: PeriodOption = None,
    customer: CustomerOption = None,
    as_json: JsonOption = False,
    as_csv: CsvOption = False,
) -> None:
    """Cost to serve per outcome, by outcome type and attribution.

    Each run's usage cost (same customer and run_id; usage from this period or the one before) is shared equally among the run's outcomes; reversals take no share.
    """
    from meterstream.cs.reports import cost_per_outcome

    settings = get_settings()
    fmt = output_format(as_json, as_csv)
    period = check_period(period)
    with query_runner(settings) as run:
        rows = cost_per_outcome(run, period, customer or "").rows
    columns = [Column("outcome_type", "outcome"), Column("attribution", "attribution"),
               Column("outcomes", "outcomes", "int"), Column("reversals", "reversals", "int"),
               Column("outcomes_without_usage", "no usage", "int"), Column("runs_with_usage", "runs", "int"),
               Column("usage_events", "usage events", "int"), Column("cost_to_serve", "cost to serve $", "cost"),
               Column("cost_per_outcome", "cost / outcome $", "cost"),
               Column("credits_per_outcome", "usage credits / outcome", "credits")]  # fmt: skip
    fields = ["outcome_type", "attribution", "outcomes", "reversals", "outcomes_with_usage", "outcomes_without_usage",
              "runs_with_usage", "usage_events", "usage_credits", "cost_to_serve", "cost_per_outcome",
              "credits_per_outcome"]  # fmt: skip
    notes = ["outcomes without a run_id or whose run has no usage are left out of the per-outcome figures"]
    show(Report(f"Cost per outcome, {period}", columns, rows, fields, notes=notes), fmt)


# -- hourly / daily (rollups) --------------------------------------------------------------------


def _series(grain: str, period: str | None, customer: str | None, day: str, as_json: bool, as_csv: bool) -> None:
    from meterstream.cs.reports import usage_series

    settings = get_settings()
    fmt = output_format(as_json, as_csv)
    period = check_period(period)
    if day:
        try:
            parsed = datetime.strptime(day, "%Y-%m-%d")
        except ValueError:
            raise fail(f"--day must look like 2026-11-03, got {day!r}") from None
        if str(Period(parsed.year, parsed.month)) != period:
            raise fail(f"--day {day} is not in --period {period}")
    with query_runner(settings) as run:
        rows = usage_series(run, grain, period, customer or "", day).rows
    bucket = "hour" if grain == "hourly" else "day"
    columns = [Column(bucket, bucket, "datetime" if grain == "hourly" else "date"), Column("customer_id", "customer"),
               Column("meter", "meter"), Column("model", "model"), Column("workflow_id", "workflow"),
               Column("events", "events", "int"), *TOKENS, Column("quantity", "quantity", "number"),
               *CREDITS, Column("cost_to_serve", "cost to serve $", "cost")]  # fmt: skip
    fields = [c.key for c in columns] + ["source"]
    notes = [CREDITS_NOTE]
    fallback = sorted({r["customer_id"] for r in rows if r["source"] != "rollup"})
    if fallback:
        notes.append(f"read from usage_rated FINAL (an event reached the rollup twice): {', '.join(fallback)}")
    title = f"{grain.capitalize()} usage, {day or period}" + (f", {customer}" if customer else "")
    show(Report(title, columns, rows, fields, notes=notes), fmt)


@usage_app.command("hourly")
def hourly_command(
    period: PeriodOption = None,
    customer: CustomerOption = None,
    day: Annotated[str, typer.Option("--day", help="Only this UTC day (YYYY-MM-DD) of the period.")] = "",
    as_json: JsonOption = False,
    as_csv: CsvOption = False,
) -> None:
    """Usage per hour × customer × meter × model × workflow, from the usage_hourly rollup (exact)."""
    _series("hourly", period, customer, day, as_json, as_csv)


@usage_app.command("daily")
def daily_command(
    period: PeriodOption = None,
    customer: CustomerOption = None,
    as_json: JsonOption = False,
    as_csv: CsvOption = False,
) -> None:
    """Usage per day × customer × meter × model × workflow, from the usage_daily rollup (exact)."""
    _series("daily", period, customer, "", as_json, as_csv)


# -- audit -------------------------------------------------------------------------------------


LINE_HELP = (
    "Invoice line kind: base_fee, included_usage, overage, credits_applied, outcomes, seats, discount, "
    "commitment_true_up; default: all."
)


def audit_command(
    customer: Annotated[str, typer.Option("--customer", help="The customer whose invoice is disputed.")],
    period: PeriodOption = None,
    line: Annotated[str | None, typer.Option("--line", help=LINE_HELP)] = None,
    csv_file: Annotated[
        str | None, typer.Option("--csv", help="Write the rows behind the line(s) to this CSV file ('-': stdout).")
    ] = None,
    plans: PlansOption = None,
    as_json: JsonOption = False,
    page_size: Annotated[int, typer.Option("--page-size", min=1, max=1_000_000, help="Rows per read.")] = 10_000,
) -> None:
    """Trace an invoice line to the rated rows and raw events behind it, and reconcile them.

    Prints, per line kind, the invoice figures beside the sums of the rows behind them, and whether the invoice recomputed from exactly those rows gives the same lines.

    With --csv, exports the rows (event, tokens, credits, cost, plan version, rule, raw payload) in a stable order: re-running gives the same bytes. Exit code 3 if the rows do not reconcile with the invoice.
    """
    from meterstream.cs.audit import LINE_KINDS, audit

    if line is not None and line not in LINE_KINDS:
        raise fail(f"--line must be one of {', '.join(LINE_KINDS)}")
    settings = get_settings()
    period = check_period(period)
    catalog = load_catalog_or_fail(plans, settings)
    out = console if csv_file != "-" else err_console
    with pricing_errors(), query_runner(settings) as run, _csv_sink(csv_file) as sink:
        result = audit(run, catalog, customer, period, line, sink, page_size=page_size)
    if as_json:
        _audit_json(result, csv_file, sys.stderr if csv_file == "-" else sys.stdout)
    else:
        _audit_tables(result, csv_file, out)
    if not result.reconciled:
        raise typer.Exit(3)


@contextmanager
def _csv_sink(path: str | None) -> Iterator[TextIO | None]:
    """The CSV destination; a file is written beside its final name and renamed when complete."""
    if path is None:
        yield None
        return
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("w", newline="", encoding="utf-8") as handle:
            yield handle
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _audit_summary(result: Any) -> dict[str, Any]:
    inv = result.invoice
    return {
        "customer_id": result.customer_id, "period": result.period, "line": result.line,
        "plan_id": inv.plan_id, "plan_version": inv.plan_version, "status": inv.status,
        "currency": inv.currency, "invoice_total": inv.total, "rows": result.stats.rows,
        "rows_without_raw_event": result.stats.without_raw_event, "reconciled": result.reconciled,
    }  # fmt: skip


def _audit_json(result: Any, csv_file: str | None, stream: TextIO) -> None:
    import json

    from meterstream.cs.render import plain

    body = {
        **{k: plain(v) for k, v in _audit_summary(result).items()},
        "csv": csv_file,
        "lines": [{k: plain(v) for k, v in check.__dict__.items()} for check in result.checks],
        "by_rule": [{k: plain(v) for k, v in row.items()} for row in result.by_rule()],
    }
    stream.write(json.dumps(body, indent=2) + "\n")


def _audit_tables(result: Any, csv_file: str | None, out: Console) -> None:
    from meterstream.cs.render import table

    inv = result.invoice
    out.print(
        f"Audit of {result.customer_id}, {result.period}: plan {inv.plan_id} (version {inv.plan_version}), "
        f"invoice {inv.status}, total {inv.total:,} {inv.currency}; {result.stats.rows:,} rated rows "
        f"{'behind ' + result.line if result.line else 'in the period'}",
        highlight=False,
    )
    checks = [{**check.__dict__, "ok": "yes" if check.reconciled else "[bold red]NO"} for check in result.checks]
    columns = [Column("line", "invoice line"), Column("invoice_lines", "lines", "int"),
               Column("invoice_quantity", "quantity", "number"), Column("invoice_amount", "amount $", "money"),
               Column("rows", "rows", "int"), Column("rows_credits", "row credits", "number"),
               Column("rows_cost_to_serve", "row cost $", "cost"), Column("figure", "how the rows add up"),
               Column("recomputed_amount", "from rows $", "money"), Column("ok", "reconciled")]  # fmt: skip
    out.print(table(Report("Invoice lines and the rows behind them", columns, checks)))
    by_rule = Report(
        "Rows by plan version and rule",
        [Column("plan_version", "plan version"), Column("rule", "rule"), Column("rows", "rows", "int"),
         Column("usage_credits", "usage credits", "number"), Column("outcome_credits", "outcome credits", "number"),
         Column("cost_to_serve", "cost to serve $", "cost")],
        result.by_rule(),
    )  # fmt: skip
    out.print(table(by_rule))
    if result.stats.without_raw_event:
        out.print(f"[yellow]{result.stats.without_raw_event:,} rated rows have no raw event in events_raw[/]")
    if csv_file and csv_file != "-":
        out.print(f"wrote {result.stats.rows:,} rows to {csv_file}", highlight=False)
    elif not csv_file:
        out.print("export the rows with --csv FILE", highlight=False)
    out.print("[green]reconciled[/]" if result.reconciled else "[bold red]NOT reconciled[/]")


__all__ = ["audit_command", "margin_command", "usage_app"]
