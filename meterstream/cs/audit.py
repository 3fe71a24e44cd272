"""The dispute audit: from an invoice line to the rated rows and raw events behind it.

``audit(run, catalog, customer, period, line)`` reads the customer's rated rows of
the period page by page (``sql/queries/audit_rows.sql``, ordered by occurred_at and
event_id, so a re-run yields the same rows in the same order and a large period is
never held in memory), writes each to a CSV sink with its raw event, the plan
version and the rule that priced it, and reconciles them with the invoice:

* the invoice is :func:`meterstream.billing.invoice_from_store`, exactly what
  ``meterstream invoice`` prints;
* the exported rows are aggregated again in Python (:meth:`PeriodUsage.from_rated`)
  and the invoice recomputed from them (same catalog, same earlier periods, same
  ``as_of``); each line kind reconciles when the recomputed lines equal the
  invoice's, and the direct identities hold (Σ credits of the usage rows = credits
  used, outcome rows − reversals = outcome line quantities, max seats = seats).

Which rows stand behind which line (``LINE_ROWS``): included usage, overage and
credits applied are priced from the period's usage credits, so all usage rows;
seats from the ``seats`` meter rows; outcomes from the outcome rows; discount and
commitment true-up from the usage-based lines, so usage and outcome rows; the base
fee is a fixed fee of the plan version with no rows behind it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, TextIO

from meterstream.billing import QueryRunner, invoice_from_store
from meterstream.clock import utc_now
from meterstream.cs.render import as_utc
from meterstream.pricing.invoice import Invoice, InvoiceLine, PeriodUsage
from meterstream.pricing.money import round_money
from meterstream.pricing.plans import Catalog
from meterstream.schemas.records import RatedUsage
from meterstream.storage.clickhouse import RATED_COLUMNS

ZERO = Decimal(0)
PAGE_SIZE = 10_000

#: Invoice line kind -> (usage_rated.kind, meter) of the rows behind it; '' is any. None: no rows.
LINE_ROWS: dict[str, tuple[str, str] | None] = {
    "base_fee": None,
    # Fees billed in advance, and their adjustment: fixed fees with no rows behind them.
    "base_fee_advance": None,
    "base_fee_adjustment": None,
    "included_usage": ("usage", ""),
    # A charge of its own on one meter: that meter's usage rows (the line names the meter).
    "usage_charge": ("usage", ""),
    "overage": ("usage", ""),
    "credits_applied": ("usage", ""),
    "outcomes": ("outcome", ""),
    "seats": ("usage", "seats"),
    "discount": ("", ""),
    "commitment_true_up": ("", ""),
    # Late usage of a closed period: its rows belong to that period (audit it there).
    "late_adjustment": None,
}
LINE_KINDS = tuple(LINE_ROWS)

#: The CSV export, one row per rated event; raw_payload is the event exactly as it arrived.
CSV_COLUMNS = [
    "event_id", "occurred_at", "kind", "meter", "model", "workflow_id", "run_id",
    "input_tokens", "cached_input_tokens", "output_tokens", "quantity", "credits", "cost_to_serve",
    "plan_version", "rule", "raw_payload",
]  # fmt: skip

_CREDITS_EXP = Decimal(1).scaleb(-18)  # usage_rated.credits / cost_to_serve: Decimal(38, 18)
_QUANTITY_EXP = Decimal(1).scaleb(-9)  # usage_rated.quantity: Decimal(38, 9)


def iter_audit_rows(
    run: QueryRunner, customer: str, period: str, kind: str = "", meter: str = "", page_size: int = PAGE_SIZE
) -> Iterator[dict[str, Any]]:
    """The customer's rated rows of the period with raw payloads, in (occurred_at, event_id) order.

    Keyset pagination: each page starts after the last row of the previous one, so
    pages neither overlap nor skip rows, and memory holds one page.
    """
    after_at = after_id = ""
    while True:
        page = run(
            "audit_rows", customer=customer, period=period, kind=kind, meter=meter,
            after_occurred_at=after_at, after_event_id=after_id, page_size=str(page_size),
        ).dicts()  # fmt: skip
        yield from page
        if len(page) < page_size:
            return
        last = page[-1]
        after_at = as_utc(last["occurred_at"]).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        after_id = last["event_id"]


def _occurred(value: datetime) -> str:
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def csv_row(row: dict[str, Any]) -> list[Any]:
    """One CSV line; numbers at the column's fixed scale so every run writes the same bytes."""
    return [
        row["event_id"], _occurred(row["occurred_at"]), row["kind"], row["meter"], row["model"],
        row["workflow_id"], row["run_id"], row["input_tokens"], row["cached_input_tokens"],
        row["output_tokens"], format(Decimal(row["quantity"]).quantize(_QUANTITY_EXP), "f"),
        format(Decimal(row["credits"]).quantize(_CREDITS_EXP), "f"),
        format(Decimal(row["cost_to_serve"]).quantize(_CREDITS_EXP), "f"),
        row["price_book_version"], row["rule"], row["payload"] or "",
    ]  # fmt: skip


def rated_from_row(row: dict[str, Any]) -> RatedUsage:
    values = {name: row[name] for name in RATED_COLUMNS}
    values["occurred_at"] = as_utc(row["occurred_at"])
    return RatedUsage(**values)


@dataclass
class RowStats:
    """Running totals over the exported rows, by what they feed on the invoice."""

    rows: int = 0
    usage_rows: int = 0
    usage_credits: Decimal = ZERO
    usage_cost: Decimal = ZERO
    seat_rows: int = 0
    max_seats: Decimal = ZERO
    outcome_rows: int = 0
    outcome_reversals: int = 0
    outcome_credits: Decimal = ZERO
    outcome_cost: Decimal = ZERO
    without_raw_event: int = 0
    #: (plan_version, rule) -> [rows, credits, cost_to_serve]
    by_rule: dict[tuple[str, str], list[Any]] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        credits, cost = Decimal(row["credits"]), Decimal(row["cost_to_serve"])
        self.rows += 1
        if not row["payload"]:
            self.without_raw_event += 1
        if row["kind"] == "outcome":
            self.outcome_rows += 1
            self.outcome_reversals += row["rule"].endswith(":reversal")
            self.outcome_credits += credits
            self.outcome_cost += cost
        else:
            self.usage_rows += 1
            self.usage_credits += credits
            self.usage_cost += cost
            if row["meter"] == "seats":
                self.seat_rows += 1
                self.max_seats = max(self.max_seats, Decimal(row["quantity"]))
        entry = self.by_rule.setdefault((row["price_book_version"], row["rule"]), [0, ZERO, ZERO, row["kind"]])
        entry[0] += 1
        entry[1] += credits
        entry[2] += cost


@dataclass(frozen=True)
class LineCheck:
    """One invoice line kind: its figures on the invoice, the rows behind it, and whether they agree."""

    line: str
    invoice_lines: int
    invoice_quantity: Decimal | None
    invoice_amount: Decimal
    recomputed_amount: Decimal
    rows: int
    rows_credits: Decimal
    rows_cost_to_serve: Decimal
    figure: str
    reconciled: bool


@dataclass(frozen=True)
class AuditResult:
    customer_id: str
    period: str
    line: str | None
    invoice: Invoice
    stats: RowStats
    checks: list[LineCheck]

    @property
    def reconciled(self) -> bool:
        return all(check.reconciled for check in self.checks)

    def by_rule(self) -> list[dict[str, Any]]:
        return [
            # A rule rates one kind: its credits are usage credits or outcome credits, never both.
            {"plan_version": version, "rule": rule, "rows": n,
             "usage_credits": ZERO if kind == "outcome" else credits,
             "outcome_credits": credits if kind == "outcome" else ZERO, "cost_to_serve": cost}  # fmt: skip
            for (version, rule), (n, credits, cost, kind) in sorted(self.stats.by_rule.items())
        ]


def rows_selector(line: str | None) -> tuple[str, str] | None:
    """(kind, meter) filter of the rows behind ``line`` (None: every row)."""
    if line is None:
        return ("", "")
    return LINE_ROWS[line]


def audit(
    run: QueryRunner,
    catalog: Catalog,
    customer: str,
    period: str,
    line: str | None = None,
    sink: TextIO | None = None,
    *,
    page_size: int = PAGE_SIZE,
    as_of: datetime | None = None,
) -> AuditResult:
    """Trace ``line`` (every line if None) of the customer's invoice to its rows; write them to ``sink`` as CSV."""
    if line is not None and line not in LINE_ROWS:
        raise ValueError(f"unknown invoice line kind {line!r}; kinds: {', '.join(LINE_KINDS)}")
    as_of = as_of or utc_now()
    invoice = invoice_from_store(run, catalog, customer, period, as_of=as_of)
    writer = csv.writer(sink, lineterminator="\n") if sink is not None else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    stats = RowStats()

    def exported() -> Iterator[RatedUsage]:
        selector = rows_selector(line)
        if selector is None:
            return
        for row in iter_audit_rows(run, customer, period, *selector, page_size=page_size):
            if writer is not None:
                writer.writerow(csv_row(row))
            stats.add(row)
            yield rated_from_row(row)

    usage = PeriodUsage.from_rated(exported())
    recomputed = invoice_from_store(run, catalog, customer, period, as_of=as_of, period_usage=usage)
    kinds = [line] if line is not None else sorted({ln.kind for ln in invoice.lines}, key=LINE_KINDS.index)
    checks = [_check(kind, invoice, recomputed, stats) for kind in kinds]
    if line is None:
        checks += _usage_checks(invoice, recomputed, stats)
    return AuditResult(customer, period, line, invoice, stats, checks)


def _usage_checks(invoice: Invoice, recomputed: Invoice, stats: RowStats) -> list[LineCheck]:
    """The invoice's usage summary against every row: credits used and cost to serve."""
    usage, again = invoice.usage, recomputed.usage
    cost = stats.usage_cost + stats.outcome_cost
    rounded_cost = round_money(cost, invoice.currency)
    return [
        LineCheck(
            line="usage.credits_used", invoice_lines=0, invoice_quantity=usage.credits_used,
            invoice_amount=ZERO, recomputed_amount=ZERO, rows=stats.usage_rows,
            rows_credits=stats.usage_credits, rows_cost_to_serve=stats.usage_cost,
            figure=f"Σ credits of {stats.usage_rows:,} usage rows = {_num(stats.usage_credits)} credits used",
            reconciled=stats.usage_credits == usage.credits_used == again.credits_used,
        ),
        LineCheck(
            line="usage.cost_to_serve", invoice_lines=0, invoice_quantity=None,
            invoice_amount=usage.cost_to_serve, recomputed_amount=again.cost_to_serve, rows=stats.rows,
            rows_credits=stats.usage_credits + stats.outcome_credits, rows_cost_to_serve=cost,
            figure=f"Σ cost to serve of {stats.rows:,} rows = {_num(cost)} ≈ {rounded_cost} rounded once",
            reconciled=rounded_cost == usage.cost_to_serve == again.cost_to_serve,
        ),
    ]  # fmt: skip


def _of_kind(invoice: Invoice, kind: str) -> list[InvoiceLine]:
    return [ln for ln in invoice.lines if ln.kind == kind]


def _num(value: Decimal) -> str:
    return f"{value.normalize():,f}"


def _check(kind: str, invoice: Invoice, recomputed: Invoice, stats: RowStats) -> LineCheck:
    lines, again = _of_kind(invoice, kind), _of_kind(recomputed, kind)
    quantities = [ln.quantity for ln in lines if ln.quantity is not None]
    usage = invoice.usage
    identity = True
    if kind == "base_fee":
        rows, credits, cost = 0, ZERO, ZERO
        figure = f"fixed fee of plan version {invoice.plan_version}; no rated rows behind it"
    elif kind == "late_adjustment":
        rows, credits, cost = 0, ZERO, ZERO
        figure = "late usage of a closed period: its rows are in that period (billed_in = this period)"
    elif kind == "outcomes":
        rows, credits, cost = stats.outcome_rows, stats.outcome_credits, stats.outcome_cost
        counted = stats.outcome_rows - 2 * stats.outcome_reversals
        identity = sum(quantities, ZERO) == counted
        figure = (f"{stats.outcome_rows - stats.outcome_reversals:,} outcome rows − "
                  f"{stats.outcome_reversals:,} reversals = {counted:,} = Σ line quantities")  # fmt: skip
    elif kind == "seats":
        rows, credits, cost = stats.seat_rows, ZERO, ZERO
        identity = stats.max_seats == usage.active_seats
        figure = f"max quantity of {stats.seat_rows:,} seats rows = {_num(stats.max_seats)} active seats"
    elif kind in ("discount", "commitment_true_up"):
        rows = stats.rows
        credits, cost = stats.usage_credits + stats.outcome_credits, stats.usage_cost + stats.outcome_cost
        basis = "discount % of" if kind == "discount" else "minimum commitment minus"
        figure = f"{basis} the usage-based lines (overage, credits applied, outcomes) over {rows:,} rows"
        identity = stats.usage_credits == usage.credits_used
    else:  # included_usage, overage, credits_applied: priced from the period's usage credits
        rows, credits, cost = stats.usage_rows, stats.usage_credits, stats.usage_cost
        identity = credits == usage.credits_used
        head = f"Σ credits of {rows:,} usage rows = {_num(credits)}"
        if kind == "included_usage":
            figure = f"{head}; {_num(usage.included_used)} of {_num(usage.included_credits)} included"
        elif kind == "overage":
            figure = f"{head} − {_num(usage.included_credits)} included = {_num(usage.overage_credits)} overage credits"
        else:
            figure = f"{head}; {_num(usage.grant_credits_applied)} of {_num(usage.overage_credits)} overage credits paid by grants"
    return LineCheck(
        line=kind,
        invoice_lines=len(lines),
        invoice_quantity=sum(quantities, ZERO) if quantities else None,
        invoice_amount=sum((ln.amount for ln in lines), ZERO),
        recomputed_amount=sum((ln.amount for ln in again), ZERO),
        rows=rows,
        rows_credits=credits,
        rows_cost_to_serve=cost,
        figure=figure,
        reconciled=identity and lines == again,
    )
