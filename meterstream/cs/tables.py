"""The tables of ``meterstream usage`` (month to date) and ``alerts list``; the demo prints them too."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from rich.table import Table

from meterstream.pricing.money import round_money


def _fmt(value: Any, places: int | None = None) -> str:
    if isinstance(value, Decimal):
        if places is not None:
            return f"{round_money(value):,}" if places == 2 else f"{value.quantize(Decimal(1).scaleb(-places)):,}"
        return f"{value.normalize():,f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def usage_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("customer", "events", "input tok", "cached tok", "output tok", "usage credits", "outcome credits",
                   "cost to serve $"):
        table.add_column(column, justify="left" if column == "customer" else "right")
    for row in rows:
        table.add_row(
            row["customer_id"],
            _fmt(row["events"]),
            _fmt(row["input_tokens"]),
            _fmt(row["cached_input_tokens"]),
            _fmt(row["output_tokens"]),
            _fmt(row["usage_credits"], 2),
            _fmt(row["outcome_credits"], 2),
            _fmt(row["cost_to_serve"], 4),
        )
    return table


def alerts_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("crossed at", "customer", "threshold", "spent credits", "budget credits", "action"):
        table.add_column(column)
    for row in rows:
        crossed = row["crossed_at"]
        table.add_row(
            crossed.strftime("%m-%d %H:%M:%S") if isinstance(crossed, datetime) else str(crossed),
            row["customer_id"],
            f"{row['threshold_percent']}%",
            _fmt(row["spent_credits"], 2),
            _fmt(row["budget_credits"], 2),
            row["action"],
        )
    return table
