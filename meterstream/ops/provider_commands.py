"""``meterstream reconcile-provider``: metered vs billed tokens and cost per provider, model and day."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from meterstream.cli_common import check_period, fail, load_catalog_or_fail, query_runner
from meterstream.config import get_settings

console = Console()


def reconcile_provider_command(
    bill: Annotated[
        list[Path], typer.Option("--bill", help="A provider export (JSON page, array of pages or JSON Lines): "
                                 "OpenAI usage/completions or costs, Anthropic usage_report/messages or cost_report. "
                                 "Repeatable; the kind is recognised from the content.")  # fmt: skip
    ],
    period: Annotated[str | None, typer.Option("--period", help="Billing period YYYY-MM (UTC); default: this month.")] = None,
    threshold: Annotated[str, typer.Option("--threshold", help="Flag gaps above this percent.")] = "1",
    min_tokens: Annotated[int, typer.Option("--min-tokens", min=0, help="...and above this many tokens.")] = 0,
    min_cost: Annotated[str, typer.Option("--min-cost", help="...and above this amount of money.")] = "0",
    aliases: Annotated[
        Path | None, typer.Option("--aliases", help="YAML mapping provider model names to price-book names.")
    ] = None,
    plans: Annotated[Path | None, typer.Option("--plans", help="Plan catalog (its price books); default: the worker's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Metered vs billed tokens and cost per provider, model and day; flags gaps and price-table drift.

    Exit code 0 when nothing is flagged, 1 when something is, 2 when a file or the store cannot be read.
    """
    from meterstream.ops import provider_bills as pb

    settings = get_settings()
    period = check_period(period, code=2)
    try:
        threshold_percent, min_money = Decimal(threshold), Decimal(min_cost)
    except InvalidOperation:
        raise fail("--threshold and --min-cost must be decimal numbers", 2) from None
    alias_map: dict[str, str] = {}
    if aliases is not None:
        try:
            alias_map = {str(k): str(v) for k, v in (yaml.safe_load(aliases.read_text()) or {}).items()}
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            raise fail(f"{aliases}: {exc}", 2) from None
    catalog = load_catalog_or_fail(plans, settings)
    try:
        bills = pb.read_bills(bill, alias_map)
    except pb.BillFileError as exc:
        raise fail(str(exc), 2) from None
    try:
        with query_runner(settings) as run:
            metered = pb.metered_from_rows(run("provider_daily_usage", period=period).dicts())
    except typer.Exit as exc:
        raise typer.Exit(2) from exc
    result = pb.reconcile(period, metered, bills, catalog, threshold_percent=threshold_percent,
                          min_tokens=min_tokens, min_cost=min_money)  # fmt: skip
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        table = Table(title=f"Provider bills vs metered usage, {period} (flag above {threshold_percent}%)")
        for column in ("provider", "model", "day", "metered tok", "billed tok", "token gap", "metered cost",
                       "billed cost", "our price of billed tok", "drift", "flags"):  # fmt: skip
            table.add_column(column, justify="left" if column in ("provider", "model", "day", "flags") else "right")
        for cells in pb.iter_table_rows(result):
            style = "bold red" if cells[-1] else None
            table.add_row(*cells, style=style)
        console.print(table)
        for total in result.totals():
            console.print(
                f"{total['provider']}: metered {total['metered_tokens']:,} tokens, billed "
                f"{'-' if total['billed_tokens'] is None else format(total['billed_tokens'], ',')}; cost metered "
                f"{total['metered_cost']} vs billed {total['billed_cost'] or '-'} {result.currency}; "
                f"{total['flagged_rows']} flagged",
                highlight=False,
            )
    if result.flagged:
        raise typer.Exit(1)
