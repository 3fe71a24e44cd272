"""Customer-success helpers without a store: cache savings, output formatting, audit CSV rows."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from decimal import Decimal
from typing import get_args

import pytest

from meterstream.cs.audit import CSV_COLUMNS, LINE_ROWS, csv_row
from meterstream.cs.render import Column, Report, cell, plain, write_csv, write_json
from meterstream.pricing.invoice import LineKind
from meterstream.pricing.pricebook import load_price_book
from meterstream.pricing.rating import RatingError, cache_saving

D = Decimal


def test_cache_saving_is_the_cached_tokens_at_the_input_rate_minus_the_cached_rate():
    book = load_price_book()
    # gpt-4o: cost 2.50 / 1.25 per 1M, credits 0.5 / 0.25 per 1K
    saving = cache_saving(book, "gpt-4o", 10_000)
    assert (saving.cost_to_serve, saving.credits) == (D("0.0125"), D("2.5"))
    # text-embedding-3-small has no cache discount
    assert cache_saving(book, "text-embedding-3-small", 10_000).cost_to_serve == 0
    with pytest.raises(RatingError, match="no price for model"):
        cache_saving(book, "no-such-model", 1)


def test_every_invoice_line_kind_says_which_rows_stand_behind_it():
    assert set(LINE_ROWS) == set(get_args(LineKind))


def test_machine_values_are_exact_and_tables_are_rounded():
    assert plain(D("0E-18")) == "0.000000000000000000"
    assert plain(datetime(2026, 11, 3, 10, 0)) == "2026-11-03T10:00:00Z"  # chDB's naive UTC
    assert cell(D("193.545"), "money") == "193.55"
    assert cell(D("0.00075"), "cost") == "0.0008"
    assert cell(D("0.98755"), "percent") == "98.8%"
    assert cell(None, "money") == "-"
    report = Report("t", [Column("a", "A"), Column("b", "B", "money")], [{"a": "x", "b": D("1.500")}])
    out = io.StringIO()
    write_csv(report.rows, report.machine_fields, out)
    assert out.getvalue() == "a,b\nx,1.500\n"
    out = io.StringIO()
    write_json(report.rows, report.machine_fields, out)
    assert '"b": "1.500"' in out.getvalue()


def test_an_audit_csv_row_has_fixed_scales():
    row = {
        "event_id": "e1", "occurred_at": datetime(2026, 10, 3, 10, 15, 0, 250_000), "kind": "usage",
        "meter": "tokens", "model": "gpt-4o", "workflow_id": "w", "run_id": "r", "input_tokens": 10,
        "cached_input_tokens": 0, "output_tokens": 5, "quantity": D("0E-9"), "credits": D("80"),
        "cost_to_serve": D("0.4"), "price_book_version": "v1", "rule": "tokens:gpt-4o", "payload": '{"a": 1}',
    }  # fmt: skip
    values = csv_row(row)
    assert len(values) == len(CSV_COLUMNS)
    assert values[1] == "2026-10-03T10:15:00.250Z"
    assert values[10:13] == ["0.000000000", "80.000000000000000000", "0.400000000000000000"]
    aware = csv_row({**row, "occurred_at": datetime(2026, 10, 3, 10, 15, 0, 250_000, tzinfo=timezone.utc)})
    assert aware == values


def test_json_for_machines_never_writes_an_exponent():
    from meterstream.cs.render import json_text
    from meterstream.pricing.invoice import PeriodUsage, compute_invoice
    from meterstream.pricing.plans import load_catalog

    data = {"zero": D("0E-18"), "tiny": D("1E-7"), "big": D("1E+3"), "list": [D("0E-9")], "at": datetime(2026, 11, 1, tzinfo=timezone.utc)}
    assert json_text(data, indent=None) == (
        '{"zero": "0.000000000000000000", "tiny": "0.0000001", "big": "1000", "list": ["0.000000000"], '
        '"at": "2026-11-01T00:00:00Z"}'
    )
    # A zero-usage invoice, its figures as a ClickHouse Decimal(38, 18) zero: pydantic alone gave "0E-18".
    usage = PeriodUsage(customer_id="acme", period="2026-11", credits=D("0E-18"), cost_to_serve=D("0E-18"))
    invoice = compute_invoice("acme", "2026-11", usage, load_catalog(), as_of=datetime(2026, 11, 5, tzinfo=timezone.utc))
    assert "E-18" in invoice.model_dump_json()
    text = json_text(invoice)
    assert "E-" not in text and '"credits_used": "0.000000000000000000"' in text


def test_tables_fold_long_values_on_a_terminal_and_print_them_whole_in_a_pipe():
    from rich.console import Console

    from meterstream.cs.render import PIPE_WIDTH, table

    row = {"customer_id": "tenant-0042-with-a-rather-long-name", "plan_version": "enterprise-2026-11-01-v3",
           "total": D("9463.00")}  # fmt: skip
    report = Report("t", [Column("customer_id", "customer"), Column("plan_version", "plan version"),
                          Column("total", "total $", "money")], [row])  # fmt: skip
    narrow = Console(width=40, record=True, file=io.StringIO())
    narrow.print(table(report))
    folded = narrow.export_text()
    cells = [line.split("│")[1:4] for line in folded.splitlines() if line.startswith("│")]
    columns = ["".join(c[i].strip() for c in cells) for i in range(3)]  # each column's text, unfolded
    assert "…" not in folded and columns == ["tenant-0042-with-a-rather-long-name", "enterprise-2026-11-01-v3", "9,463.00"]
    wide = Console(width=PIPE_WIDTH, record=True, file=io.StringIO())
    wide.print(table(report))
    line = next(line for line in wide.export_text().splitlines() if "tenant" in line)
    assert all(value in line for value in ("tenant-0042-with-a-rather-long-name", "enterprise-2026-11-01-v3", "9,463.00"))


def test_a_list_of_models_is_json_too():
    from meterstream.cs.render import json_text
    from meterstream.pricing.invoice import PeriodUsage

    assert json_text([PeriodUsage(customer_id="a", credits=D("0E-18"))], indent=None).startswith(
        '[{"customer_id": "a", "period": null, "credits": "0.000000000000000000"'
    )
