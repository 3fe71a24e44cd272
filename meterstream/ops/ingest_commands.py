"""``meterstream import`` (backfill historical events from a file, :mod:`meterstream.producers.backfill`) and ``meterstream otlp`` (:mod:`meterstream.producers.otlp`): the commands of the ingestion paths."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meterstream.cli_common import fail, load_catalog_or_fail, query_runner

if TYPE_CHECKING:
    from meterstream.producers.backfill import Priced
from meterstream.clock import utc_now
from meterstream.config import get_settings

console = Console()
err_console = Console(stderr=True)


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=False) as progress:
        yield progress


def _task(progress: Progress | None, description: str, total: int | None) -> Callable[[int], None] | None:
    if progress is None:
        return None
    task = progress.add_task(description, total=total, rate="")
    started = time.monotonic()

    def advance(n: int) -> None:
        progress.advance(task, n)
        elapsed = time.monotonic() - started
        done = progress.tasks[task].completed
        if elapsed > 0:
            progress.update(task, rate=f"{done / elapsed:,.0f}/s")

    return advance


def import_command(
    file: Annotated[Path, typer.Argument(help="Events in the wire format: .jsonl, .csv or .parquet.")],
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl, csv or parquet; default from the suffix.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate, dedupe and price the import; send nothing.")
    ] = False,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Send the valid events even when some records are invalid.")
    ] = False,
    plans: Annotated[
        Path | None, typer.Option("--plans", help="Plan catalog for --dry-run; default: the worker's.")
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Backfill historical events from FILE through the event topics (deduped against the store).

    Every record is validated first; invalid ones are listed as FILE:LINE: reason and,
    unless --skip-invalid, nothing is sent (exit 2). Events already stored, and
    repeats within the file, are skipped. Periods whose invoice is closed are billed
    on the open invoice as a late adjustment, never rewritten.
    """
    from meterstream.producers import backfill

    settings = get_settings()
    now = utc_now()
    late_grace = timedelta(seconds=settings.worker.late_grace_seconds)
    if not file.is_file():
        raise fail(f"no such file: {file}")
    try:
        fmt_ = backfill.detect_format(file, fmt)
    except backfill.BackfillError as exc:
        raise fail(str(exc)) from None
    catalog = load_catalog_or_fail(plans, settings) if dry_run else None

    passes: dict[str, float] = {}  # seconds of each pass, timed as it ran
    with _progress(not no_progress and not as_json) as progress:
        started = time.perf_counter()
        try:
            scanned = backfill.scan(file, fmt_, _task(progress, "validating", None))
        except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:  # csv.Error: e.g. a cell over 128 KiB
            raise fail(f"cannot read {file}: {exc}") from None
        passes["validate"] = time.perf_counter() - started
        for bad in scanned.bad:
            err_console.print(f"{file}:{bad.line}: {bad.reason}", highlight=False, markup=False, soft_wrap=True)
        if scanned.bad and not skip_invalid and not dry_run:
            raise fail(f"{len(scanned.bad):,} invalid records; nothing sent (fix them, or --skip-invalid)", 2)
        mark = time.perf_counter()
        with query_runner(settings) as run:
            stored = backfill.stored_keys(run, scanned)
        passes["stored_ids"] = time.perf_counter() - mark
        summary: dict[str, Any] = {
            "file": str(file), "format": fmt_, "records": scanned.records, "valid": scanned.valid,
            "invalid": len(scanned.bad), "repeated_in_file": len(scanned.repeated_lines),
            "first_occurred_at": scanned.first_at.isoformat() if scanned.first_at else None,
            "last_occurred_at": scanned.last_at.isoformat() if scanned.last_at else None,
            "closed_periods": [p for p in scanned.periods if backfill.period_closed(p, now, late_grace)],
        }  # fmt: skip
        if dry_run:
            assert catalog is not None  # loaded above for a dry run
            priced = backfill.price(scanned, stored, catalog, now=now, late_grace=late_grace,
                                    progress=_task(progress, "pricing", scanned.records))  # fmt: skip
        else:
            result = backfill.send(scanned, stored, settings.kafka, progress=_task(progress, "sending", scanned.records))
            passes["send"] = result.seconds
        seconds = time.perf_counter() - started

    if dry_run:
        for bad in priced.unpriced:
            err_console.print(f"{file}:{bad.line}: not priced: {bad.reason}", highlight=False, markup=False)
        summary |= {"dry_run": True, "already_stored": priced.already_stored, "would_send": priced.events,
                    "unpriced": len(priced.unpriced), "usage_credits": str(priced.usage_credits),
                    "outcome_credits": str(priced.outcome_credits),
                    "cost_to_serve": str(priced.cost_to_serve), "by_customer_period": [g.to_json() for g in priced.groups]}  # fmt: skip
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            _print_priced(priced, summary)
        if scanned.bad or priced.unpriced:
            raise typer.Exit(2)
        return

    summary |= {"dry_run": False, "already_stored": result.already_stored, "sent": result.sent,
                "delivered": result.delivered, "failed": len(result.failed),
                # the whole import (validate, stored ids, send until the broker confirmed every event)
                "seconds": round(seconds, 3), "events_per_second": round(result.sent / seconds) if seconds else None,
                "seconds_by_pass": {name: round(value, 3) for name, value in passes.items()}}  # fmt: skip
    for event_id, error in result.failed[:20]:
        err_console.print(f"not delivered: {event_id}: {error}", highlight=False, markup=False)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(
            f"sent {result.sent:,} events ({result.delivered:,} confirmed) in {seconds:.2f} s "
            f"({round(result.sent / seconds) if seconds else 0:,} events/s; validate {passes['validate']:.2f} s, "
            f"stored ids {passes['stored_ids']:.2f} s, send {passes['send']:.2f} s); skipped "
            f"{result.already_stored:,} already stored, {len(scanned.repeated_lines):,} repeated in the file, "
            f"{len(scanned.bad):,} invalid",
            highlight=False,
        )
        if summary["closed_periods"]:
            console.print(f"closed periods {', '.join(summary['closed_periods'])}: billed on the open invoice "
                          "as a late adjustment", highlight=False)  # fmt: skip
    if result.failed:
        raise typer.Exit(1)
    if scanned.bad:
        raise typer.Exit(2)


def _print_priced(priced: Priced, summary: dict[str, Any]) -> None:
    table = Table(title=f"Dry run: {summary['file']} (nothing sent)")
    for column in ("customer", "period", "billed in", "events", "usage credits", "outcome credits",
                   "cost to serve $"):
        table.add_column(column, justify="left" if column in ("customer", "period", "billed in") else "right")
    for g in priced.groups:
        billed = f"{g.billed_in} (late)" if g.billed_in != g.period else g.billed_in
        table.add_row(g.customer_id, g.period, billed, f"{g.events:,}", f"{g.usage_credits.normalize():,f}",
                      f"{g.outcome_credits.normalize():,f}",
                      f"{g.cost_to_serve.normalize():,f}")  # fmt: skip
    table.add_row("[bold]all", "", "", f"{priced.events:,}", f"{priced.usage_credits.normalize():,f}",
                  f"{priced.outcome_credits.normalize():,f}",
                  f"{priced.cost_to_serve.normalize():,f}")  # fmt: skip
    console.print(table)
    console.print(
        f"{summary['records']:,} records: {priced.events:,} would be sent, {priced.already_stored:,} already "
        f"stored, {summary['repeated_in_file']:,} repeated in the file, {summary['invalid']:,} invalid, "
        f"{summary['unpriced']:,} not priced",
        highlight=False,
    )


def otlp_command(
    port: Annotated[int, typer.Option(help="Port (OTLP/HTTP's default is 4318).")] = 4318,
    bind: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    customer_attribute: Annotated[
        list[str], typer.Option("--customer-attribute", help="Span/resource attribute holding the customer id "
                                "(repeatable, first found wins); default meterstream.customer_id.")  # fmt: skip
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    workflow_attribute: Annotated[
        list[str], typer.Option("--workflow-attribute", help="Default meterstream.workflow_id.")
    ] = [],  # noqa: B006
    run_attribute: Annotated[list[str], typer.Option("--run-attribute", help="Default meterstream.run_id.")] = [],  # noqa: B006
) -> None:
    """Receive OTLP/HTTP traces (protobuf or JSON) and meter every GenAI span as a usage event."""
    try:
        from meterstream.producers import otlp
    except ImportError as exc:
        raise fail(f"meterstream otlp needs the otel extra (pip install 'meterstream[otel]'): {exc}") from None
    from meterstream.producers.client import MeterClient
    from meterstream.topics import TopicError, ensure_topics

    settings = get_settings()
    try:
        ensure_topics(settings.kafka)
    except TopicError as exc:
        raise fail(str(exc)) from None
    mapping = otlp.mapping_from_options(customer_attribute, workflow_attribute, run_attribute)
    err_console.print(f"OTLP/HTTP receiver on http://{bind}:{port}/v1/traces; customer from "
                      f"{', '.join(mapping.customer_keys)}", highlight=False)  # fmt: skip
    with MeterClient(settings.kafka) as meter:
        otlp.serve(meter, mapping, bind, port)
