"""Billing from stored or offline events: invoices, re-rating and margins.

The thin layer between the pure pricing engine (:mod:`meterstream.pricing`) and
its two sources of usage:

- the store: ``usage_rated`` rows the worker wrote, aggregated by the saved
  query ``sql/queries/invoice_usage.sql`` (``meterstream invoice``, ``margin``);
- a file of events in the wire format, rated here with the same catalog
  (``meterstream rate``): a dry run for a plan change and the reference the
  tests compare the stream against.

Both end in :func:`invoice_series`, so a customer's invoice is computed one way.
Prepaid and free credit grants are balances: an invoice for a period is computed
after the invoices of every earlier period since the customer's first grant,
carrying the closing balances forward.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from meterstream.periods import periods_between, previous_period
from meterstream.pricing.engine import row_of
from meterstream.pricing.invoice import (
    Invoice,
    InvoiceError,
    InvoiceLine,
    MeterSubtotal,
    OutcomeCount,
    PeriodUsage,
    RefusedEvent,
    VersionUsage,
    compute_invoice,
    issue,
    late_adjustment,
)
from meterstream.pricing.plans import Catalog, period_bounds
from meterstream.pricing.reversals import RefusedReversal, match_reversals
from meterstream.schemas.events import Attribution, OutcomeEvent, UsageEvent
from meterstream.schemas.records import RatedUsage
from meterstream.schemas.validation import describe_validation_error

ZERO = Decimal(0)


def first_billed_period(catalog: Catalog, customer_id: str, period: str, first_usage: str | None) -> str:
    """Where a customer's grant balances start.

    The billing period of its earliest grant's ``granted_on`` (required: a grant is
    never spent on a period before it was granted). Without grants, ``period``
    itself: nothing carries over. ``first_usage`` is kept for callers; grants no
    longer depend on it.
    """
    customer = catalog.customers.get(customer_id)
    grants = customer.grants if customer else ()
    starts = [period]
    for grant in grants:
        starts.append(customer.billing_period(datetime.combine(grant.granted_on, time(), timezone.utc)) if customer else period)
    return min(starts)


def invoice_series(
    catalog: Catalog,
    customer_id: str,
    period: str,
    usage_for: Callable[[str], PeriodUsage],
    *,
    first_usage: str | None = None,
    as_of: datetime | None = None,
    since: str | None = None,
    issued: Callable[[str], Invoice | None] | None = None,
) -> list[Invoice]:
    """Invoices from where the customer's grant balances start (or ``since``, if earlier) up to ``period``.

    A period with an ``issued`` invoice is that record, not a recomputation, and its
    closing grant balances are the ones carried forward.
    """
    invoices: list[Invoice] = []
    balances: dict[str, Decimal] | None = None
    start = first_billed_period(catalog, customer_id, period, first_usage)
    if since is not None:
        start = min(start, since)
    for month in periods_between(start, period):
        record = issued(month) if issued is not None else None
        if record is not None:
            balances = record.closing_grant_balances()
            invoices.append(record)
            continue
        previous = invoices[-1] if invoices else (issued(previous_period(month)) if issued is not None else None)
        invoice = compute_invoice(
            customer_id, month, usage_for(month), catalog, as_of=as_of, grant_balances=balances, previous=previous
        )
        balances = invoice.closing_grant_balances()
        invoices.append(invoice)
    return invoices


# -- from the store ---------------------------------------------------------------------------


def period_usage_from_aggregates(customer_id: str, period: str, rows: Iterable[dict[str, Any]]) -> PeriodUsage:
    """Build :class:`PeriodUsage` from ``invoice_usage`` rows (same rules as ``PeriodUsage.from_rated``).

    One pass over the rows, plain sums per meter and model and per plan version, meter and
    model; each subtotal is built once at the end, and with one plan version in the period
    (the usual case) its per-version subtotals are the same records (``usage`` with spend
    builds this for every customer of a period: :func:`period_invoices`).
    """
    credits = cost = seats = ZERO
    outcomes: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    # [events, credits, cost_to_serve, max_quantity, sum_quantity] per (meter, model) and per (version, meter, model)
    merged: dict[tuple[str, str], list[Any]] = {}
    versions: dict[str, list[Decimal]] = {}
    version_meters: dict[tuple[str, str, str], list[Any]] = {}
    for row in rows:
        row_cost = row["cost_to_serve"]
        cost += row_cost
        events = int(row["events"])
        if row["kind"] == "outcome":
            outcomes[(row["outcome_type"], row["attribution"], row["plan_version"])][
                1 if row["is_reversal"] else 0
            ] += events
            continue
        row_credits, version, meter, model, quantity, quantity_sum = (
            row["credits"], row["plan_version"], row["meter"], row["model"], row["max_quantity"], row["sum_quantity"]
        )  # fmt: skip
        credits += row_credits
        per_version = versions.get(version)
        if per_version is None:
            per_version = versions[version] = [ZERO, ZERO]
        per_version[0] += row_credits
        if meter == "seats":
            seats = max(seats, quantity)
            per_version[1] = max(per_version[1], quantity)
        for acc in (
            merged.setdefault((meter, model), [0, ZERO, ZERO, quantity, ZERO]),
            version_meters.setdefault((version, meter, model), [0, ZERO, ZERO, quantity, ZERO]),
        ):
            acc[0] += events
            acc[1] += row_credits
            acc[2] += row_cost
            acc[3] = max(acc[3], quantity)
            acc[4] += quantity_sum

    def subtotal(meter: str, model: str, acc: list[Any]) -> MeterSubtotal:
        return MeterSubtotal(
            meter=meter, model=model, events=acc[0], credits=acc[1], cost_to_serve=acc[2], max_quantity=acc[3],
            sum_quantity=acc[4],
        )

    by_meter = tuple(subtotal(m, model, merged[(m, model)]) for m, model in sorted(merged))
    per_version_meters: dict[str, tuple[MeterSubtotal, ...]] = {}
    if len(versions) == 1:  # every row under one version: its subtotals are the period's
        per_version_meters[next(iter(versions))] = by_meter
    else:
        grouped: dict[str, list[MeterSubtotal]] = defaultdict(list)
        for (v, m, model), acc in sorted(version_meters.items()):
            grouped[v].append(subtotal(m, model, acc))
        per_version_meters = {v: tuple(subs) for v, subs in grouped.items()}
    return PeriodUsage(
        customer_id=customer_id,
        period=period,
        credits=credits,
        cost_to_serve=cost,
        active_seats=seats,
        outcomes=tuple(
            OutcomeCount(outcome_type=t, attribution=Attribution(a), plan_version=v, count=n, reversals=r)
            for (t, a, v), (n, r) in sorted(outcomes.items())
        ),
        by_meter=by_meter,
        by_version=tuple(
            VersionUsage(plan_version=v, credits=c, active_seats=n, by_meter=per_version_meters.get(v, ()))
            for v, (c, n) in sorted(versions.items())
        ),
    )


QueryRunner = Callable[..., Any]  # (name, **params) -> QueryResult


def store_usage_for(run_query: QueryRunner, customer_id: str, late_until: str = "") -> Callable[[str], PeriodUsage]:
    """Stored usage per period: as issued (``late_until=""``), or with the late usage billed up to a period."""

    def usage_for(period: str) -> PeriodUsage:
        rows = run_query("invoice_usage", customer=customer_id, period=period, late_until=late_until).dicts()
        return period_usage_from_aggregates(customer_id, period, rows)

    return usage_for


def invoice_from_store(
    run_query: QueryRunner,
    catalog: Catalog,
    customer_id: str,
    period: str,
    *,
    as_of: datetime | None = None,
    period_usage: PeriodUsage | None = None,
) -> Invoice:
    """The customer's invoice for ``period``, grant balances carried from the earlier periods.

    ``period_usage`` replaces the stored aggregate of ``period`` itself (earlier periods
    still come from the store): the dispute audit recomputes the invoice from the rows
    it exported to show they add up to the same lines.
    """
    record = issued_invoice(run_query, customer_id, period)
    if record is not None and period_usage is None:
        return record  # issued: exactly what was billed, whatever changed since
    periods = [row["period"] for row in run_query("customer_periods", customer=customer_id).dicts()]
    first_usage = periods[0] if periods else None
    stored_usage_for = store_usage_for(run_query, customer_id)

    def usage_for(month: str) -> PeriodUsage:
        return period_usage if period_usage is not None and month == period else stored_usage_for(month)

    def issued_for(month: str) -> Invoice | None:
        return issued_invoice(run_query, customer_id, month) if month != period else None

    adjustments = late_adjustments(run_query, catalog, customer_id, period, first_usage=first_usage, as_of=as_of)
    series = invoice_series(
        catalog, customer_id, period, usage_for, first_usage=first_usage, as_of=as_of, issued=issued_for
    )
    if not adjustments:
        return series[-1]
    balances = series[-2].closing_grant_balances() if len(series) > 1 else None
    previous = series[-2] if len(series) > 1 else issued_for(previous_period(period))
    return compute_invoice(
        customer_id, period, usage_for(period), catalog, as_of=as_of, grant_balances=balances,
        adjustments=adjustments, previous=previous,
    )  # fmt: skip


def issued_catalog(run_query: QueryRunner, customer_id: str, period: str) -> Catalog | None:
    """The catalog the customer's ``period`` was issued with (sql/009), or None.

    None when the period was not issued, or was issued before the catalog was kept with
    the record. A kept catalog that does not match the record's fingerprint is an error.
    """
    rows = run_query("issued_invoice", customer=customer_id, period=period).dicts()
    if not rows or not rows[0]["catalog_json"]:
        return None
    text = rows[0]["catalog_json"]
    if hashlib.sha256(text.encode()).hexdigest() != rows[0]["catalog_fingerprint"]:
        raise InvoiceError(f"the catalog kept with invoice {rows[0]['invoice_number']} does not match its fingerprint")
    return Catalog.model_validate_json(text)


def issued_invoice(run_query: QueryRunner, customer_id: str, period: str) -> Invoice | None:
    """The invoice issued for the customer's period (sql/008), exactly as stored, or None."""
    rows = run_query("issued_invoice", customer=customer_id, period=period).dicts()
    return Invoice.model_validate_json(rows[0]["invoice_json"]) if rows else None


def invoices_to_issue(
    run_query: QueryRunner,
    catalog: Catalog,
    period: str,
    *,
    now: datetime,
    late_grace: timedelta,
    customers: Iterable[str] | None = None,
) -> list[Invoice]:
    """Close ``period``: the invoices to store, one per customer not yet issued, stamped as issued.

    The customers are those with rated usage in the period and those the catalog bills for
    it (a subscription with fees and no usage), or only ``customers``. A period can be
    closed once its late grace has passed (usage arriving later is billed on the open
    period's invoice as a flagged late adjustment).
    """
    # Anniversary periods end later than the month they are named by: the latest end decides.
    ends = [period_bounds(period)[1]] + [catalog.billing_bounds(c, period)[1] for c in catalog.customers]
    end = max(ends)
    if now < end + late_grace:
        raise InvoiceError(f"{period} closes at {(end + late_grace).isoformat()} (its end plus the late grace)")
    if customers is None:
        found = {row["customer_id"] for row in run_query("period_customers", period=period).dicts()}
        for customer_id in catalog.customers:
            if catalog.segments(customer_id, period):
                found.add(customer_id)
        customers = found
    done = {row["customer_id"] for row in run_query("issued_customers", period=period).dicts()}
    out = []
    for customer_id in sorted(set(customers) - done):
        invoice = invoice_from_store(run_query, catalog, customer_id, period, as_of=now)
        out.append(issue(invoice, catalog, invoice_number=f"INV-{period}-{customer_id}", issued_at=now))
    return out

def group_by_customer(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["customer_id"]].append(row)
    return dict(grouped)


def period_invoices(
    run_query: QueryRunner,
    catalog: Catalog,
    period: str,
    rows_by_customer: dict[str, list[dict[str, Any]]],
    *,
    as_of: datetime | None = None,
) -> dict[str, Invoice | ValueError]:
    """Every customer's invoice for ``period`` from one ``period_usage`` query, not one invoice path each.

    ``rows_by_customer`` are the period's ``sql/queries/period_usage.sql`` rows (every
    customer, or one), grouped by customer. Each invoice is exactly
    :func:`invoice_from_store`'s (``test_cs_queries`` compares them):

    - usage billed in its own period (``billed_in = ''``) is the invoice's, as
      ``invoice_usage.sql`` gives it;
    - grant balances carried from earlier periods: ``period_usage`` once per earlier
      month needed (for every customer at once), and the customers' first periods once
      (``customer_first_periods.sql``) when a grant has no ``granted_on``;
    - a customer with late usage billed on this period (``late_billed_customers.sql``), or
      with an issued invoice (``issued_customers.sql``, sql/008) for a period its invoice
      depends on (this one, the one before, any month its grant balances are carried
      through), gets the full path, :func:`invoice_from_store`, which reads those records.

    A customer whose invoice cannot be computed maps to the error (``InvoiceError``,
    ``PlanError``), never dropped.
    """
    from meterstream.pricing.invoice import InvoiceError
    from meterstream.pricing.plans import PlanError

    months: dict[str, dict[str, list[dict[str, Any]]]] = {period: rows_by_customer}

    def rows_of(month: str) -> dict[str, list[dict[str, Any]]]:
        if month not in months:
            months[month] = group_by_customer(run_query("period_usage", period=month, customer="").dicts())
        return months[month]

    late = {row["customer_id"] for row in run_query("late_billed_customers", billed_in=period).dicts()}
    issued_in: dict[str, set[str]] = {}

    def issued_customers(month: str) -> set[str]:
        if month not in issued_in:
            issued_in[month] = {r["customer_id"] for r in run_query("issued_customers", period=month).dicts()}
        return issued_in[month]

    first_usage: dict[str, str] = {}
    if any(
        grant.granted_on is None
        for customer in rows_by_customer
        if (entry := catalog.customers.get(customer)) is not None
        for grant in entry.grants
    ):
        first_usage = {r["customer_id"]: r["first_period"] for r in run_query("customer_first_periods", period=period).dicts()}
    invoices: dict[str, Invoice | ValueError] = {}
    for customer in sorted(rows_by_customer):
        try:
            first = first_usage.get(customer, period)
            start = first_billed_period(catalog, customer, period, first)
            depends_on = [previous_period(start), *periods_between(start, period)]
            if customer in late or any(customer in issued_customers(month) for month in depends_on):
                invoices[customer] = invoice_from_store(run_query, catalog, customer, period, as_of=as_of)
                continue

            def usage_for(month: str, customer: str = customer) -> PeriodUsage:
                rows = [r for r in rows_of(month).get(customer, ()) if r["billed_in"] == ""]
                return period_usage_from_aggregates(customer, month, rows)

            series = invoice_series(catalog, customer, period, usage_for, first_usage=first, as_of=as_of)
            invoices[customer] = series[-1]
        except (InvoiceError, PlanError) as exc:
            invoices[customer] = exc
    return invoices


def late_adjustments(
    run_query: QueryRunner,
    catalog: Catalog,
    customer_id: str,
    period: str,
    *,
    first_usage: str | None,
    as_of: datetime | None = None,
) -> list[InvoiceLine]:
    """Flagged lines on ``period``'s invoice for usage of closed periods that arrived late.

    For each closed period P with usage billed in ``period``: P's invoice with the
    late usage billed up to ``period`` minus P's invoice with the late usage billed
    before it. A closed invoice is never rewritten; its rules price the difference:
    when P was issued, both are computed with the catalog it was issued with (kept
    with the record, sql/009), so a price or plan changed since does not reach P's
    usage; else (not issued, or issued before 009) with ``catalog``.
    (Grant balances carried out of P are not re-drawn.)
    """
    lines = []
    for row in run_query("late_usage", customer=customer_id, billed_in=period).dicts():
        closed = row["period"]
        closed_catalog = issued_catalog(run_query, customer_id, closed) or catalog

        def total_of(late_until: str, closed: str = closed, closed_catalog: Catalog = closed_catalog) -> Invoice:
            usage = store_usage_for(run_query, customer_id, late_until)
            return invoice_series(closed_catalog, customer_id, closed, usage, first_usage=first_usage, as_of=as_of)[-1]

        before = total_of(previous_period(period) if previous_period(period) > closed else "")
        after = total_of(period)
        lines.append(late_adjustment(closed, before, after, int(row["events"]), row["credits"]))
    return lines


# -- from a file of events ---------------------------------------------------------------------


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


def read_events(path: Path) -> tuple[list[UsageEvent | OutcomeEvent], list[BadLine]]:
    """Events from a JSON Lines file in the wire format; ``"type": "outcome"`` marks outcomes.

    Invalid lines are reported with their line number, never silently skipped.
    """
    events: list[UsageEvent | OutcomeEvent] = []
    bad: list[BadLine] = []
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            model = OutcomeEvent if b'"outcome"' in raw and b'"type"' in raw else UsageEvent
            try:
                events.append(model.model_validate_json(raw))
            except ValidationError as exc:
                if model is OutcomeEvent:  # the marker was in a string elsewhere: try as usage
                    try:
                        events.append(UsageEvent.model_validate_json(raw))
                        continue
                    except ValidationError:
                        pass
                bad.append(BadLine(number, describe_validation_error(exc)))
    return events, bad


def rate_events(
    catalog: Catalog,
    events: Iterable[UsageEvent | OutcomeEvent],
    *,
    earlier: Iterable[UsageEvent | OutcomeEvent] = (),
    refused: list[RefusedReversal] | None = None,
) -> tuple[list[RatedUsage], list[str]]:
    """Rate events offline; duplicates (same customer and ``event_id``) count once, as in the stream.

    Reversals are matched to their outcomes by :func:`~meterstream.pricing.reversals.match_reversals`
    (whatever the order of ``events``); ``earlier`` are events of earlier periods, rated only so
    that a reversal of one of their outcomes finds it. A refused reversal is appended to
    ``refused`` if given, else reported in the errors like an event that cannot be priced.
    """
    pairs: list[tuple[UsageEvent | OutcomeEvent, RatedUsage]] = []
    errors: list[str] = []
    seen: set[tuple[str, str]] = set()
    first: list[UsageEvent | OutcomeEvent] = []
    for event in events:
        key = (event.customer_id, event.event_id)
        if key not in seen:
            seen.add(key)
            first.append(event)
    # One call of the rating engine for the whole set (what the worker does per batch).
    rating = catalog.rate_rows([row_of(event) for event in first])
    for j, event in enumerate(first):
        error = rating.errors[j]
        if error is not None:  # RatingError, PlanError: the stream would dead-letter it
            errors.append(f"{event.event_id}: {error}")
        else:
            pairs.append((event, rating.rated.row(j)))
    billed: dict[tuple[str, str], RatedUsage] = {}
    for event in earlier:
        if isinstance(event, OutcomeEvent) and not event.reversal_of and (event.customer_id, event.event_id) not in seen:
            try:
                billed[(event.customer_id, event.event_id)] = catalog.rate(event)
            except ValueError:
                continue
    rated, refusals = match_reversals(pairs, billed)
    if refused is not None:
        refused.extend(refusals)
    else:
        errors += [f"{r.event_id}: refused reversal: {r.reason}" for r in refusals]
    return rated, errors


def invoices_from_rated(
    catalog: Catalog,
    rated: Iterable[RatedUsage],
    *,
    period: str | None = None,
    as_of: datetime | None = None,
    refused: Iterable[RefusedReversal] = (),
) -> list[Invoice]:
    """One invoice per customer and period present (or only ``period``), balances carried forward.

    ``refused`` reversals are listed on the invoice of their customer and period (a period
    with only refused events still gets one).
    """
    rows: dict[tuple[str, str], list[RatedUsage]] = defaultdict(list)
    for row in rated:
        rows[(row.customer_id, row.period)].append(row)
    notes: dict[tuple[str, str], list[RefusedEvent]] = defaultdict(list)
    for r in refused:
        notes[(r.customer_id, r.period)].append(RefusedEvent(event_id=r.event_id, reason=r.reason))
        rows.setdefault((r.customer_id, r.period), [])
    customers = sorted({c for c, _ in rows})
    invoices: list[Invoice] = []
    for customer in customers:
        periods = sorted(p for c, p in rows if c == customer)
        last = period or periods[-1]
        if period is not None and period not in periods:
            continue

        def usage_for(month: str, customer: str = customer) -> PeriodUsage:
            got = rows.get((customer, month))
            return PeriodUsage.from_rated(got) if got else PeriodUsage(customer_id=customer, period=month)

        # Without --period every period present is wanted, so the series starts at the first.
        since = None if period is not None else periods[0]
        series = invoice_series(catalog, customer, last, usage_for, first_usage=periods[0], as_of=as_of, since=since)
        wanted = {last} if period is not None else set(periods)
        invoices.extend(
            inv.model_copy(update={"refused": tuple(notes[(customer, inv.period)])}) if notes.get((customer, inv.period)) else inv
            for inv in series
            if inv.period in wanted
        )
    return invoices


# -- margin ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarginRow:
    customer_id: str
    workflow_id: str
    model: str
    events: int
    credits: Decimal
    revenue: Decimal
    cost_to_serve: Decimal

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.cost_to_serve


def allocate_revenue(rows: list[dict[str, Any]], invoices: dict[str, Invoice]) -> list[MarginRow]:
    """Spread each customer's invoice total over its rows in proportion to credits.

    Outcome lines go to the rows of outcomes (by their share of outcome rows' events);
    everything else (base fee, overage, seats, discounts) by usage credits. With no
    credits at all, the usage part is spread by events.
    """
    by_customer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_customer[row["customer_id"]].append(row)
    out: list[MarginRow] = []
    for customer, group in sorted(by_customer.items()):
        invoice = invoices[customer]
        outcome_money = sum((line.amount for line in invoice.lines if line.kind == "outcomes"), ZERO)
        usage_money = invoice.total - outcome_money
        outcome_rows = [r for r in group if r["model"].startswith("outcome:")]
        usage_rows = [r for r in group if not r["model"].startswith("outcome:")]
        outcome_events = sum(int(r["events"]) for r in outcome_rows)
        usage_credits = sum((r["credits"] for r in usage_rows), ZERO)
        usage_events = sum(int(r["events"]) for r in usage_rows)
        for row in group:
            if row in outcome_rows:
                share = Decimal(int(row["events"])) / outcome_events if outcome_events else ZERO
                revenue = outcome_money * share
            elif usage_credits:
                revenue = usage_money * row["credits"] / usage_credits
            else:
                revenue = usage_money * Decimal(int(row["events"])) / usage_events if usage_events else ZERO
            out.append(
                MarginRow(
                    customer_id=customer, workflow_id=row["workflow_id"], model=row["model"],
                    events=int(row["events"]), credits=row["credits"], revenue=revenue,
                    cost_to_serve=row["cost_to_serve"],
                )  # fmt: skip
            )
    return out


def group_margin(rows: Iterable[MarginRow], by: str) -> list[MarginRow]:
    """Roll margin rows up to ``customer``, ``workflow`` or ``model``."""
    totals: dict[str, list[Any]] = {}
    for row in rows:
        key = {"customer": row.customer_id, "workflow": row.workflow_id or "(none)", "model": row.model}[by]
        t = totals.setdefault(key, [0, ZERO, ZERO, ZERO])
        t[0] += row.events
        t[1] += row.credits
        t[2] += row.revenue
        t[3] += row.cost_to_serve
    return [
        MarginRow(
            customer_id=key if by == "customer" else "", workflow_id=key if by == "workflow" else "",
            model=key if by == "model" else "", events=t[0], credits=t[1], revenue=t[2], cost_to_serve=t[3],
        )  # fmt: skip
        for key, t in sorted(totals.items(), key=lambda kv: kv[1][2] - kv[1][3], reverse=True)
    ]


MARGIN_DIMENSIONS = ("customer", "workflow", "model")


def margin_report(run_query: QueryRunner, catalog: Catalog, period: str, by: str) -> list[MarginRow]:
    """Revenue, cost to serve and margin for a period, grouped by customer, workflow or model.

    The rows come from ``sql/queries/margin.sql``; each customer's revenue is its
    invoice total (:func:`invoice_from_store`) spread by :func:`allocate_revenue`.
    ``meterstream margin`` and ``meterstream usage margin`` both print this.
    """
    if by not in MARGIN_DIMENSIONS:
        raise ValueError(f"margin is grouped by one of {', '.join(MARGIN_DIMENSIONS)}, not {by!r}")
    rows = run_query("margin", period=period).dicts()
    invoices = {c: invoice_from_store(run_query, catalog, c, period) for c in sorted({r["customer_id"] for r in rows})}
    return group_margin(allocate_revenue(rows, invoices), by)


def stored_events_to_rerate(
    run_query: QueryRunner, period: str, customer: str
) -> tuple[list[UsageEvent | OutcomeEvent], list[UsageEvent | OutcomeEvent]]:
    """A period's stored events, and the earlier periods' events its reversals need (``rate_events(earlier=)``)."""
    events = list(iter_raw_events(run_query, period, customer))
    ids = {e.event_id for e in events}
    missing = {e.reversal_of for e in events if isinstance(e, OutcomeEvent) and e.reversal_of and e.reversal_of not in ids}
    earlier: list[UsageEvent | OutcomeEvent] = []
    if missing:
        for row in run_query("customer_periods", customer=customer).dicts():
            if row["period"] < period:
                earlier += [e for e in iter_raw_events(run_query, row["period"], customer) if e.event_id in missing]
    return events, earlier


def iter_raw_events(run_query: QueryRunner, period: str, customer: str = "") -> Iterator[UsageEvent | OutcomeEvent]:
    """Stored raw events of a period, parsed again (they were valid when accepted)."""
    for row in run_query("raw_events", period=period, customer=customer).dicts():
        model = OutcomeEvent if row["kind"] == "outcome" else UsageEvent
        yield model.model_validate_json(row["payload"])
