"""One report, three faces: a rich table for people, JSON and CSV for machines.

JSON and CSV carry every field at full precision (Decimals as plain decimal
strings, never floats or exponents; times in UTC ISO 8601); the table rounds for
reading: money to the cent, costs to 4 decimals, credits to 2.

Tables survive a pipe: on a terminal every column folds a long value onto the
next line rather than cutting it; anywhere else (a pipe, a file) the console is
as wide as the widest row (:func:`stdout_console`), so every value is printed
whole, ids and plan versions included. Every JSON the CLI prints goes through
:func:`json_text`, so ``Decimal('0E-18')`` is ``"0.000000000000000000"``, never ``"0E-18"``.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import Enum, StrEnum
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from meterstream.pricing.money import round_money
from meterstream.storage import clickhouse


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"


@dataclass(frozen=True)
class Column:
    """A table column: the row key, its heading and how to show the value."""

    key: str
    header: str
    #: text, int, credits (2 dp), money (2 dp), cost (4 dp), percent (ratio x 100, 1 dp),
    #: datetime (minutes, UTC), date
    style: str = "text"


@dataclass
class Report:
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    #: Keys written to JSON and CSV, in order; default: every key of the columns.
    fields: list[str] | None = None
    #: An extra bold last row of the table (not part of JSON or CSV).
    total: dict[str, Any] | None = None
    #: Printed under the table (not part of JSON or CSV).
    notes: list[str] = field(default_factory=list)

    @property
    def machine_fields(self) -> list[str]:
        return self.fields if self.fields is not None else [c.key for c in self.columns]


as_utc = clickhouse.as_utc  # one rule for timestamps read from the store


def plain(value: Any) -> Any:
    """A JSON/CSV value: Decimal as a plain decimal string, datetimes as UTC ISO 8601."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return as_utc(value).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return value


def plain_tree(value: Any) -> Any:
    """:func:`plain` applied through pydantic models, dicts, lists and tuples; enums as their values."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="python")
    if isinstance(value, dict):
        return {str(k): plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_tree(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return plain(value)


def json_text(data: Any, indent: int | None = 2) -> str:
    """JSON for machines: Decimals as plain decimal strings at full precision, times in UTC ISO 8601.

    ``Decimal('0E-18')`` (how ClickHouse's Decimal(38, 18) zero arrives) is ``"0.000000000000000000"``.
    """
    return json.dumps(plain_tree(data), indent=indent, default=str)


#: Wide enough for any row: rich never cuts or wraps a table printed on a console this wide.
PIPE_WIDTH = 100_000


def stdout_console() -> Console:
    """The console for tables on stdout: the terminal's width on a terminal, unlimited otherwise.

    Off a terminal rich falls back to 80 columns and would cut values (``tenant-0…``);
    a pipe or a file gets every value whole instead.
    """
    if sys.stdout.isatty():
        return Console()
    return Console(width=PIPE_WIDTH, soft_wrap=True)


def cell(value: Any, style: str) -> str:
    if value is None:
        return "-"
    if style == "int":
        return f"{int(value):,}"
    if isinstance(value, Decimal):
        if style in ("credits", "money"):
            return f"{round_money(value):,}"
        if style == "cost":
            return f"{value.quantize(Decimal('0.0001'), rounding=ROUND_HALF_UP):,}"
        if style == "percent":
            return f"{(value * 100).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"
        return f"{value.normalize():,f}"
    if style == "percent" and isinstance(value, (int, float)):
        return f"{value * 100:.1f}%"
    if isinstance(value, datetime):
        return as_utc(value).strftime("%Y-%m-%d %H:%M")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(report: Report) -> Table:
    out = Table(title=report.title)
    for column in report.columns:
        # fold: a value too long for a narrow terminal continues on the next line; never "…".
        out.add_column(column.header, justify="left" if column.style in ("text", "datetime", "date") else "right",
                       overflow="fold")
    for row in report.rows:
        out.add_row(*(cell(row.get(c.key), c.style) for c in report.columns))
    if report.total is not None:
        out.add_row(*(f"[bold]{cell(report.total.get(c.key), c.style)}" if c.key in report.total else ""
                      for c in report.columns))  # fmt: skip
    return out


def write_json(rows: Iterable[dict[str, Any]], fields: list[str], stream: TextIO) -> None:
    stream.write(json_text([{key: row.get(key) for key in fields} for row in rows]) + "\n")


def write_csv(rows: Iterable[dict[str, Any]], fields: list[str], stream: TextIO) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow(["" if row.get(key) is None else plain_tree(row.get(key)) for key in fields])


def emit(report: Report, fmt: Format, console: Console) -> None:
    if fmt is Format.JSON:
        write_json(report.rows, report.machine_fields, sys.stdout)
    elif fmt is Format.CSV:
        write_csv(report.rows, report.machine_fields, sys.stdout)
    else:
        console.print(table(report))
        for note in report.notes:
            console.print(note, highlight=False)
