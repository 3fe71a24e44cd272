"""The invoice: one customer, one period, from a usage aggregate and the plan catalog. Pure.

``compute_invoice(customer_id, "2026-11", usage, catalog)`` turns a
:class:`PeriodUsage` (built from rated rows, or by the stream store) into an
:class:`Invoice`. The rules, in the order the lines appear:

1. **Version.** Period charges come from the plan version in effect at the
   start of the period (see :mod:`meterstream.pricing.plans`). Usage credits
   were already computed per event with the version in effect when each event
   occurred; outcome prices likewise come from the version that rated the
   outcome (``OutcomeCount.plan_version``), or the period's version if unknown.
2. **Base fee** (``base_fee``): the version's flat fee, prorated by the day for a
   part of the period (start, change, cancellation). In arrears (default) it is
   billed on the period's own invoice. With ``base_fee_timing: in_advance`` the
   invoice of a period bills the *next* period's fee (``base_fee_advance``, as the
   catalog knows it at that time); the first period of a subscription also bills
   its own fee; and when a period's fee turns out different from what was billed
   in advance for it (a cancellation or change entered later), its invoice carries
   the difference (``base_fee_adjustment``, possibly negative: a credit note).
3. **Included usage** (``included_usage``): credits up to ``included_credits``
   are covered by the base fee; the line shows how many were used, at 0.
4. **Overage** (``overage``): credits above the allowance are charged with the
   version's overage model; one line per band (e.g. 100,000 at 0.012, 30,000
   at 0.010). The lines show what *all* overage credits cost.
5. **Credits applied** (``credits_applied``, negative). Credit grants are
   drawn down before overage is billed: free grants first (earliest expiry
   first), then prepaid (earliest expiry first), up to the overage credits
   and each grant's remaining balance. Only grants usable in the period count:
   granted by its last day and not expiring before it ends. **The one
   valuation rule: a drawn credit is worth the period's average overage
   price**, i.e. the overage lines' total divided by the overage credits. The
   grants together take ``overage total × drawn ÷ overage credits`` off the
   bill (rounded once); each grant's line is its share. A customer can check
   it with one division, it is the same for every charge model, and it can
   never raise a bill or be worth more than the overage it covers: a grant
   that covers all the overage makes it 0.00, one that covers 1% takes 1% off
   it. (Treating grants as extra allowance instead would bill
   ``model(overage − drawn)``, which with volume tiers can cost *more* than
   without the grant, with package pricing can save nothing, and with
   graduated tiers values a credit at the cheapest tier.) Grants never pay for
   base fees, seats or outcomes. ``credit_value`` does not enter the amounts.
   The invoice lists each grant's opening, drawn and closing balance; pass the
   closing balances as the next period's ``grant_balances``.
6. **Outcomes** (``outcomes``): per outcome type and attribution, count × the
   plan's money price; reversals are separate negative lines at the same price.
   (Outcome credits in the price book are for budgets, not for the invoice.)
7. **Seats** (``seats``): ``seat_fee`` × active seats (the period's maximum
   ``seats`` meter quantity), when the version has a seat fee.
8. **Discount** (``discount``, negative): ``discount_percent`` of the
   *usage-based lines* — overage, credits_applied and outcomes (reversals
   included) — when their sum is positive. Base fee, seats and the
   commitment true-up are never discounted: they are negotiated amounts.
9. **Commitment true-up** (``commitment_true_up``): if the usage-based lines
   plus the discount fall short of ``minimum_commitment``, the gap is billed,
   so the customer pays at least the commitment for usage (base fee and seats
   are on top).
10. **Credit note** (``credit_note``). No line but an outcome reversal or a
    late adjustment is ever negative beyond what it takes off a charge of the
    same invoice (grants cover at most the overage, the discount at most the
    usage-based lines). So a total falls below zero only when reversals of
    outcomes billed in earlier periods, or negative late adjustments, exceed
    the period's charges; the invoice then carries a credit note for the
    negative total that lists those lines as the reason. A negative total
    without a credit note cannot be produced.
11. **Refused reversals** (``refused``) are listed on the invoice of their
    period with the reason and credit nothing (see
    :mod:`meterstream.pricing.reversals`).

**Rounding — the one rule.** Every amount is computed at full ``Decimal``
precision, and each invoice line is rounded *once*, half-up to the currency's
minor unit (:func:`meterstream.pricing.money.round_money`). Three kinds of line are
derived from lines already rounded, so they are exact differences or a single
rounding of rounded figures: the credits_applied lines are steps in the
rounded cumulative share of the rounded overage lines (so they add up to
``round(overage total × drawn ÷ overage)``; one may differ by a cent from
rounding its own quantity × unit price); the discount is the percentage
of the sum of the rounded usage-based lines, rounded once; the true-up is the
commitment minus rounded figures. ``subtotal`` is the sum of the lines before
discount and true-up, and ``total`` is the sum of all lines, so the lines
always add up to the total the customer sees. ``usage.cost_to_serve`` is
rounded the same way and ``margin`` is ``total − cost_to_serve``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from meterstream.clock import utc_now
from meterstream.periods import next_period, previous_period
from meterstream.pricing.charges import ChargeModel
from meterstream.pricing.money import round_money
from meterstream.pricing.plans import (
    Catalog,
    CreditGrant,
    GrantKind,
    PlanError,
    PlanVersion,
    Segment,
)
from meterstream.schemas.events import Attribution, Meter
from meterstream.schemas.records import RatedUsage

ZERO = Decimal(0)
HUNDRED = Decimal(100)

LineKind = Literal[
    "base_fee",
    "base_fee_advance",
    "base_fee_adjustment",
    "included_usage",
    "overage",
    "usage_charge",
    "credits_applied",
    "outcomes",
    "seats",
    "discount",
    "commitment_true_up",
    "late_adjustment",
]

#: The lines an enterprise discount applies to, and the commitment is measured against.
USAGE_BASED_KINDS: frozenset[str] = frozenset({"overage", "usage_charge", "credits_applied", "outcomes"})

Count = Annotated[int, Field(ge=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the usage aggregate -----------------------------------------------------------------------


class OutcomeCount(_Frozen):
    """Outcomes of one type and attribution, and reversals of them, rated by one plan version."""

    outcome_type: str
    attribution: Attribution
    #: ``price_book_version`` of the rated rows; "" if unknown (priced at the period's version).
    plan_version: str = ""
    count: Count = 0
    reversals: Count = 0


class MeterSubtotal(_Frozen):
    """Credits and cost to serve for one meter and model, for display and margin analysis."""

    meter: str
    model: str = ""
    events: Count = 0
    credits: Decimal = ZERO
    cost_to_serve: Decimal = ZERO
    #: The largest single ``quantity`` of the meter's events (the ``max`` measure of a charge).
    max_quantity: Decimal = ZERO
    #: The sum of the meter's events' ``quantity`` (the ``sum`` measure of a charge).
    sum_quantity: Decimal = ZERO


class VersionUsage(_Frozen):
    """Usage credits and active seats rated under one plan version (to split a period at a plan change)."""

    plan_version: str
    credits: Decimal = ZERO
    active_seats: Annotated[Decimal, Field(ge=0)] = ZERO
    by_meter: tuple[MeterSubtotal, ...] = ()


class PeriodUsage(_Frozen):
    """What one customer used in one period: everything an invoice needs, nothing per event.

    Both the stream store and an offline file can produce it. From the
    ``usage_rated`` table it is, per customer and period (with ``FINAL`` so a
    resent event counts once)::

        credits        = sum(credits)        WHERE kind = 'usage'
        cost_to_serve  = sum(cost_to_serve)                        -- usage and outcomes
        active_seats   = max(quantity)       WHERE kind = 'usage' AND meter = 'seats'
        outcomes       = GROUP BY outcome_type, attribution, price_book_version
                         countIf(NOT endsWith(rule, ':reversal')), countIf(endsWith(rule, ':reversal'))
        by_meter       = GROUP BY meter, model WHERE kind = 'usage'
    """

    customer_id: str | None = None
    period: str | None = None
    #: Usage credits (kind == "usage"); outcome rows' credits are not counted.
    credits: Decimal = ZERO
    cost_to_serve: Decimal = ZERO
    active_seats: Annotated[Decimal, Field(ge=0)] = ZERO
    outcomes: tuple[OutcomeCount, ...] = ()
    by_meter: tuple[MeterSubtotal, ...] = ()
    #: Usage per plan version that rated it; needed only when a plan change splits the period.
    by_version: tuple[VersionUsage, ...] = ()

    @classmethod
    def from_rated(cls, rows: Iterable[RatedUsage]) -> PeriodUsage:
        """Aggregate rated rows of one customer and period; a repeated ``event_id`` counts once."""
        seen: set[str] = set()
        customers: set[str] = set()
        periods: set[str] = set()
        credits = cost = seats = ZERO
        outcomes: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        meters: dict[tuple[str, str], list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO, ZERO, ZERO])
        versions: dict[str, list[Decimal]] = defaultdict(lambda: [ZERO, ZERO])
        version_meters: dict[tuple[str, str, str], list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO, ZERO, ZERO])
        for row in rows:
            if row.event_id in seen:
                continue  # at-least-once delivery: the same id is billed once
            seen.add(row.event_id)
            customers.add(row.customer_id)
            periods.add(row.period)
            cost += row.cost_to_serve
            if row.kind == "outcome":
                counts = outcomes[(row.outcome_type, row.attribution, row.price_book_version)]
                counts[1 if row.rule.endswith(":reversal") else 0] += 1
                continue
            credits += row.credits
            per_version = versions[row.price_book_version]
            per_version[0] += row.credits
            if row.meter == Meter.SEATS.value:
                per_version[1] = max(per_version[1], row.quantity)
            for subtotal in (meters[(row.meter, row.model)], version_meters[(row.price_book_version, row.meter, row.model)]):
                subtotal[0] += 1
                subtotal[1] += row.credits
                subtotal[2] += row.cost_to_serve
                subtotal[3] = max(subtotal[3], row.quantity)
                subtotal[4] += row.quantity
            if row.meter == Meter.SEATS.value:
                seats = max(seats, row.quantity)
        if len(customers) > 1 or len(periods) > 1:
            raise ValueError(
                f"rated rows mix customers {sorted(customers)} or periods {sorted(periods)}; "
                "an invoice aggregate is for one customer and one period"
            )
        return cls(
            customer_id=next(iter(customers), None),
            period=next(iter(periods), None),
            credits=credits,
            cost_to_serve=cost,
            active_seats=seats,
            outcomes=tuple(
                OutcomeCount(outcome_type=t, attribution=Attribution(a), plan_version=v, count=n, reversals=r)
                for (t, a, v), (n, r) in sorted(outcomes.items())
            ),
            by_meter=tuple(
                MeterSubtotal(meter=m, model=model, events=int(n), credits=c, cost_to_serve=k, max_quantity=q,
                              sum_quantity=s)  # fmt: skip
                for (m, model), (n, c, k, q, s) in sorted(meters.items())
            ),
            by_version=tuple(
                VersionUsage(
                    plan_version=v, credits=c, active_seats=seats_max,
                    by_meter=tuple(
                        MeterSubtotal(meter=m, model=model, events=int(n), credits=mc, cost_to_serve=k, max_quantity=q,
                                      sum_quantity=s)
                        for (vv, m, model), (n, mc, k, q, s) in sorted(version_meters.items())
                        if vv == v
                    ),
                )  # fmt: skip
                for v, (c, seats_max) in sorted(versions.items())
            ),
        )


# --- the invoice ---------------------------------------------------------------------------------


class InvoiceLine(_Frozen):
    """One line; ``amount`` is rounded, ``quantity × unit_price`` is the unrounded amount when both are set."""

    kind: LineKind
    description: str
    quantity: Decimal | None = None
    unit_price: Decimal | None = None
    amount: Decimal


class GrantDraw(_Frozen):
    """What one credit grant did in this period."""

    grant_id: str
    kind: GrantKind
    expires: date | None = None
    usable: bool
    opening_credits: Decimal
    drawn_credits: Decimal
    closing_credits: Decimal


class UsageSummary(_Frozen):
    credits_used: Decimal
    included_credits: Decimal
    included_used: Decimal
    overage_credits: Decimal
    #: Overage credits paid for by grants.
    grant_credits_applied: Decimal
    #: Overage credits billed: ``overage_credits − grant_credits_applied``.
    billed_overage_credits: Decimal
    active_seats: Decimal
    cost_to_serve: Decimal
    margin: Decimal


class CreditNote(_Frozen):
    """Why an invoice's total is negative: the amount owed to the customer and the lines behind it."""

    amount: Decimal
    reason: str


class RefusedEvent(_Frozen):
    """An event kept but not billed (an unmatched or repeated reversal), with the reason."""

    event_id: str
    reason: str


class InvoiceSegment(_Frozen):
    """A part of the period billed on one plan version and one set of terms: [start, end)."""

    start: datetime
    end: datetime
    plan_id: str
    plan_version: str
    discount_percent: Decimal


class Invoice(_Frozen):
    """An invoice or a preview of one; ``model_dump_json()`` writes Decimals as strings."""

    customer_id: str
    period: str
    period_start: datetime
    period_end: datetime
    plan_id: str
    #: The version of the last part of the period; ``plan_versions`` lists every one billed.
    plan_version: str
    plan_versions: tuple[str, ...] = ()
    segments: tuple[InvoiceSegment, ...] = ()
    currency: str
    #: preview while the period is open, final once it has ended, issued once closed and stored.
    status: Literal["preview", "final", "issued"]
    as_of: datetime
    lines: tuple[InvoiceLine, ...]
    subtotal: Decimal
    total: Decimal
    usage: UsageSummary
    grants: tuple[GrantDraw, ...] = ()
    by_meter: tuple[MeterSubtotal, ...] = ()
    credit_note: CreditNote | None = None
    refused: tuple[RefusedEvent, ...] = ()
    #: Set when the period is closed (``meterstream close-period``): the stored record.
    invoice_number: str = ""
    issued_at: datetime | None = None
    #: sha256 of the catalog the invoice was computed with (:func:`catalog_fingerprint`).
    catalog_fingerprint: str = ""

    def closing_grant_balances(self) -> dict[str, Decimal]:
        """Each grant's remaining credits: the next period's ``grant_balances``."""
        return {g.grant_id: g.closing_credits for g in self.grants}


class InvoiceError(ValueError):
    """The usage cannot be invoiced as given (wrong customer or period, a price missing from the plan)."""


# --- computing it --------------------------------------------------------------------------------


def _num(value: Decimal) -> str:
    """A quantity for a description: thousands separators, no exponent, no trailing zeros."""
    return f"{value.normalize():,f}"


def _draw_order(grant: CreditGrant) -> tuple[int, date]:
    # Free credits first (they are use-it-or-lose-it), then prepaid; soonest expiry first.
    return (0 if grant.kind is GrantKind.FREE else 1, grant.expires or date.max)


def _draw_grants(
    grants: tuple[CreditGrant, ...],
    period: str,
    overage: Decimal,
    balances: Mapping[str, Decimal] | None,
    end: datetime | None = None,
) -> list[GrantDraw]:
    """Draw grants against the overage credits in the documented order; report every grant."""
    order = sorted(range(len(grants)), key=lambda i: (*_draw_order(grants[i]), i))
    needed = overage
    draws: dict[int, GrantDraw] = {}
    for index in order:
        grant = grants[index]
        opening = grant.credits if balances is None else balances.get(grant.id, grant.credits)
        opening = max(opening, ZERO)
        usable = grant.usable_for(period, end)
        drawn = min(opening, needed) if usable else ZERO
        needed -= drawn
        draws[index] = GrantDraw(
            grant_id=grant.id,
            kind=grant.kind,
            expires=grant.expires,
            usable=usable,
            opening_credits=opening,
            drawn_credits=drawn,
            closing_credits=opening - drawn,
        )
    return [draws[i] for i in order]


def _base_fee_line(kind: LineKind, label: str, segment: Segment, period_days: int, currency: str) -> InvoiceLine:
    """A base fee for a segment, prorated by its days (the one proration rule)."""
    fee = segment.version.base_fee
    whole = segment.days == period_days
    part = "" if whole else f", {segment.start.date()} to {(segment.end - timedelta(days=1)).date()} ({segment.days}/{period_days} days)"
    fraction = Decimal(segment.days) / Decimal(period_days)
    return InvoiceLine(
        kind=kind,
        description=f"{label}{part}",
        quantity=Decimal(1) if whole else fraction,
        unit_price=fee,
        amount=round_money(fee * fraction, currency),
    )


def _in_advance_lines(
    catalog: Catalog,
    customer_id: str,
    period: str,
    segments: Sequence[Segment],
    previous: Invoice | None,
    currency: str,
) -> list[InvoiceLine]:
    """Base fees billed in advance (``base_fee_timing: in_advance``; module docstring, rule 2)."""
    lines: list[InvoiceLine] = []
    start, end = catalog.billing_bounds(customer_id, period)
    days = (end - start).days
    own = [
        _base_fee_line("base_fee", f"Base fee, {period}", seg, days, currency)
        for seg in segments
        if seg.version.base_fee and seg.version.base_fee_timing == "in_advance"
    ]
    earlier = previous_period(period)
    try:
        first_period = not catalog.segments(customer_id, earlier)
    except PlanError:
        first_period = True
    if first_period:
        lines += [line.model_copy(update={"description": line.description + " (first period)"}) for line in own]
    elif own or previous is not None:
        actual = _sum(own)
        billed = (
            _sum(line for line in previous.lines if line.kind == "base_fee_advance") if previous is not None else actual
        )
        if actual != billed:
            lines.append(
                InvoiceLine(
                    kind="base_fee_adjustment",
                    description=f"Base fee adjustment, {period}: {_money(actual)} due, {_money(billed)} billed in advance",
                    amount=actual - billed,
                )
            )
    upcoming = next_period(period)
    next_start, next_end = catalog.billing_bounds(customer_id, upcoming)
    next_days = (next_end - next_start).days
    try:
        next_segments = catalog.segments(customer_id, upcoming)
    except PlanError:
        next_segments = ()
    lines += [
        _base_fee_line("base_fee_advance", f"Base fee in advance, {upcoming}", seg, next_days, currency)
        for seg in next_segments
        if seg.version.base_fee and seg.version.base_fee_timing == "in_advance"
    ]
    return lines


def _split_usage(
    usage: PeriodUsage, segments: Sequence[Segment]
) -> list[tuple[Decimal, Decimal, tuple[MeterSubtotal, ...]]]:
    """(credits, active seats) per segment: by the plan version that rated them when the period is split."""
    if len(segments) <= 1:
        return [(usage.credits, usage.active_seats, usage.by_meter)] * len(segments)
    if not usage.by_version and usage.credits:
        raise InvoiceError("the period is split by a plan change, but the usage is not split by plan version")
    by_version = {v.plan_version: v for v in usage.by_version}
    known = {seg.version.version for seg in segments}
    unknown = set(by_version) - known
    if unknown:
        raise InvoiceError(f"usage rated under {sorted(unknown)}, which bill no part of this period")
    out = []
    for seg in segments:
        part = by_version.get(seg.version.version)
        out.append((part.credits, part.active_seats, part.by_meter) if part else (ZERO, ZERO, ()))
    return out


def _outcomes_of_segment(usage: PeriodUsage, segments: Sequence[Segment], index: int) -> PeriodUsage:
    """The outcomes a segment bills: those its version rated; the last segment also takes the rest
    (e.g. reversals of outcomes billed under an earlier version, priced at that version)."""
    if len(segments) <= 1:
        return usage
    mine = segments[index].version.version
    others = {seg.version.version for i, seg in enumerate(segments) if i != index}
    last = index == len(segments) - 1
    kept = tuple(oc for oc in usage.outcomes if oc.plan_version == mine or (last and oc.plan_version not in others))
    return PeriodUsage(outcomes=kept)


def _merge_draws(per_segment: list[list[GrantDraw]]) -> list[GrantDraw]:
    """One draw per grant for the period: opening of the first part, drawn in all, closing of the last."""
    if not per_segment:
        return []
    merged = []
    for draws in zip(*per_segment, strict=True):
        first, last = draws[0], draws[-1]
        merged.append(
            first.model_copy(
                update={
                    "usable": any(d.usable for d in draws),
                    "drawn_credits": sum((d.drawn_credits for d in draws), ZERO),
                    "closing_credits": last.closing_credits,
                }
            )
        )
    return merged


def _usage_charge_lines(
    version: PlanVersion, meters: Sequence[MeterSubtotal], part: str, currency: str
) -> list[InvoiceLine]:
    """One line per band of each of the version's own charges, on its meter's measure."""
    lines = []
    for charge in version.charges:
        mine = [m for m in meters if m.meter == charge.meter]
        if charge.measure == "events":
            quantity = Decimal(sum(m.events for m in mine))
        elif charge.measure == "credits":
            quantity = max(sum((m.credits for m in mine), ZERO), ZERO)
        elif charge.measure == "sum":
            quantity = max(sum((m.sum_quantity for m in mine), ZERO), ZERO)
        else:
            quantity = max((m.max_quantity for m in mine), default=ZERO)
        result = charge.charge(quantity)
        free = f", {_num(charge.free_units)} free" if charge.free_units else ""
        head = f"{charge.name}{part}: {_num(quantity)} {charge.measure} of {charge.meter}{free}"
        if not result.bands:
            lines.append(InvoiceLine(kind="usage_charge", description=head, quantity=quantity, amount=round_money(ZERO, currency)))
        for band in result.bands:
            if band.label == "floor":
                text = f"{head}, volume pricing, never less than the top of a tier below"
            elif band.start == band.end and band.quantity == 1 and charge.model != "package":
                text = f"{head}, flat fee of the tier above {_num(band.start)}"
            elif charge.model == "package":
                text = f"{head}, {_num(band.quantity)} package(s) of {_num(charge.package_size or ZERO)}"
            elif charge.model == "graduated":
                text = f"{head}, {_num(band.start)}–{_num(band.end)}"
            else:
                text = head
            lines.append(
                InvoiceLine(
                    kind="usage_charge", description=text, quantity=band.quantity, unit_price=band.unit_price,
                    amount=round_money(band.amount, currency),
                )  # fmt: skip
            )
    return lines


def _overage_lines(overage_model: ChargeModel, overage: Decimal, currency: str) -> list[InvoiceLine]:
    charge = overage_model.charge(overage)
    lines = []
    for band in charge.bands:
        if band.label == "floor":
            text = f"Overage: {_num(band.end)} credits at volume pricing, never less than the top of a tier below"
        elif overage_model.model == "package":
            size = _num(overage_model.package_size or ZERO)
            text = f"Overage: {_num(band.quantity)} started package(s) of {size} credits"
        elif overage_model.model == "volume":
            text = f"Overage: {_num(band.quantity)} credits, all at the tier reached"
        elif overage_model.model == "graduated":
            text = f"Overage credits {_num(band.start)}–{_num(band.end)}"
        else:
            text = f"Overage: {_num(band.quantity)} credits"
        lines.append(
            InvoiceLine(
                kind="overage",
                description=text,
                quantity=band.quantity,
                unit_price=band.unit_price,
                amount=round_money(band.amount, currency),
            )
        )
    return lines


def _credit_lines(
    overage_lines: Sequence[InvoiceLine], overage: Decimal, draws: list[GrantDraw], currency: str
) -> list[InvoiceLine]:
    """Value drawn credits at the period's average overage price (module docstring, rule 5).

    ``billed_overage`` is the sum of the rounded overage lines; the grants together take
    ``billed_overage × drawn ÷ overage`` off it, rounded once, and each grant's line is
    its step in that cumulative figure, so the lines add up exactly.
    """
    lines: list[InvoiceLine] = []
    if not overage:
        return lines
    billed_overage = _sum(overage_lines)
    average = billed_overage / overage
    cumulative = ZERO
    credited = ZERO
    for draw in draws:
        if not draw.drawn_credits:
            continue
        cumulative += draw.drawn_credits
        reaches = round_money(billed_overage * cumulative / overage, currency)
        label = f"{draw.kind.value.capitalize()} credits ({draw.grant_id})"
        lines.append(
            InvoiceLine(
                kind="credits_applied",
                description=f"{label}: {_num(draw.drawn_credits)} at the average overage price",
                quantity=-draw.drawn_credits,
                unit_price=average,
                amount=credited - reaches,
            )
        )
        credited = reaches
    return lines


def _outcome_lines(
    usage: PeriodUsage, period_version: PlanVersion, catalog: Catalog, currency: str
) -> list[InvoiceLine]:
    counts: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    versions: dict[str, PlanVersion] = {period_version.version: period_version}
    for oc in usage.outcomes:
        version = (catalog.version_named(oc.plan_version) if oc.plan_version else None) or period_version
        versions[version.version] = version
        entry = counts[(oc.outcome_type, oc.attribution.value, version.version)]
        entry[0] += oc.count
        entry[1] += oc.reversals
    lines = []
    for (outcome_type, attribution, version_name), (count, reversals) in sorted(counts.items()):
        try:
            price = versions[version_name].outcome_price(outcome_type, attribution)
        except ValueError as exc:
            raise InvoiceError(str(exc)) from None
        label = f"{outcome_type} ({attribution.replace('_', ' ')})"
        if version_name != period_version.version:
            label += f", rated under {version_name}"
        for quantity, text in ((count, f"Outcomes: {label}"), (-reversals, f"Outcome reversals: {label}")):
            if quantity:
                lines.append(
                    InvoiceLine(
                        kind="outcomes",
                        description=text,
                        quantity=Decimal(quantity),
                        unit_price=price,
                        amount=round_money(quantity * price, currency),
                    )
                )
    return lines


def _sum(lines: Iterable[InvoiceLine]) -> Decimal:
    return sum((line.amount for line in lines), ZERO)


def compute_invoice(
    customer_id: str,
    period: str,
    usage: PeriodUsage,
    catalog: Catalog,
    *,
    as_of: datetime | None = None,
    grant_balances: Mapping[str, Decimal] | None = None,
    adjustments: Sequence[InvoiceLine] = (),
    refused: Sequence[RefusedEvent] = (),
    previous: Invoice | None = None,
) -> Invoice:
    """The invoice for ``customer_id`` in ``period`` ("YYYY-MM", UTC), by the rules in the module docstring.

    ``adjustments`` are flagged lines for late usage of periods already closed
    (see :func:`late_adjustment`); they are added after the commitment true-up,
    neither discounted nor counted toward the commitment again.

    ``previous`` is the customer's invoice for the period before (issued or computed): the
    base fee it billed in advance for this period is what this one adjusts (rule 2).

    ``as_of`` (default: now) decides the status: "final" once the period has
    ended, else "preview". ``grant_balances`` are the grants' remaining credits
    at the start of the period (the previous invoice's
    :meth:`Invoice.closing_grant_balances`); ``None`` means every grant is whole.
    """
    start, end = catalog.billing_bounds(customer_id, period)
    if usage.customer_id is not None and usage.customer_id != customer_id:
        raise InvoiceError(f"usage is for customer {usage.customer_id!r}, not {customer_id!r}")
    if usage.period is not None and usage.period != period:
        raise InvoiceError(f"usage is for period {usage.period}, not {period}")
    as_of = utc_now() if as_of is None else as_of
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise ValueError("as_of must be timezone-aware")

    customer = catalog.customer(customer_id)
    currency = catalog.currency
    try:
        segments = catalog.segments(customer_id, period)
    except PlanError as exc:
        raise InvoiceError(str(exc)) from None
    if not segments:
        if usage.credits or usage.outcomes:
            raise InvoiceError(f"customer {customer_id!r} has usage in {period} but no subscription in it")
        segments = ()
    credits_of = _split_usage(usage, segments)
    period_days = (end - start).days

    lines: list[InvoiceLine] = []
    balances = dict(grant_balances) if grant_balances is not None else None
    all_draws: list[list[GrantDraw]] = []
    included_total = included_used_total = overage_total = ZERO
    for index, segment in enumerate(segments):
        version = segment.version
        fraction = Decimal(segment.days) / Decimal(period_days)
        whole = segment.days == period_days
        part = "" if whole else f", {segment.start.date()} to {(segment.end - timedelta(days=1)).date()}"
        prorated = "" if whole else f" ({segment.days}/{period_days} days)"
        seg_lines: list[InvoiceLine] = []
        if version.base_fee and version.base_fee_timing == "in_arrears":
            seg_lines.append(_base_fee_line("base_fee", f"Base fee, {period}", segment, period_days, currency))
        credits, seats, meters = credits_of[index]
        charged = {charge.meter for charge in version.charges}
        # A meter with its own charge is billed by it, not from the credits pool.
        credits -= sum((m.credits for m in meters if m.meter in charged), ZERO)
        used = max(credits, ZERO)
        allowance = version.included_credits * fraction
        included_used = min(used, allowance)
        overage = used - included_used
        included_total += allowance
        included_used_total += included_used
        overage_total += overage
        if version.included_credits:
            seg_lines.append(
                InvoiceLine(
                    kind="included_usage",
                    description=f"Included credits{part}: {_num(included_used)} of {_num(allowance)} used",
                    quantity=included_used,
                    unit_price=ZERO,
                    amount=round_money(ZERO, currency),
                )
            )
        overage_lines = _overage_lines(version.overage, overage, currency)
        seg_lines += overage_lines
        draws = _draw_grants(customer.grants, period, overage, balances, end)
        balances = {d.grant_id: d.closing_credits for d in draws}
        all_draws.append(draws)
        seg_lines += _credit_lines(overage_lines, overage, draws, currency)
        seg_lines += _usage_charge_lines(version, meters, part, currency)
        outcomes = _outcomes_of_segment(usage, segments, index)
        seg_lines += _outcome_lines(outcomes, version, catalog, currency)
        if version.seat_fee:
            seg_lines.append(
                InvoiceLine(
                    kind="seats",
                    description=f"Seats{part}: {_num(seats)} active (maximum){prorated}",
                    quantity=seats * fraction if not whole else seats,
                    unit_price=version.seat_fee,
                    amount=round_money(seats * version.seat_fee * fraction, currency),
                )
            )
        usage_based = _sum(line for line in seg_lines if line.kind in USAGE_BASED_KINDS)
        discount = ZERO
        if segment.discount_percent and usage_based > 0:
            discount = -round_money(usage_based * segment.discount_percent / HUNDRED, currency)
            seg_lines.append(
                InvoiceLine(
                    kind="discount",
                    description=f"Discount {_num(segment.discount_percent)}% of usage-based charges {_money(usage_based)}",
                    amount=discount,
                )
            )
        committed_usage = usage_based + discount
        commitment = version.minimum_commitment * fraction
        # No commitment, no true-up: reversals below zero are a credit, not a shortfall to bill.
        if commitment and committed_usage < commitment:
            seg_lines.append(
                InvoiceLine(
                    kind="commitment_true_up",
                    description=(
                        f"Commitment true-up{part}: {_money(round_money(commitment, currency))} minimum{prorated}, "
                        f"usage-based {_money(committed_usage)}"
                    ),
                    amount=round_money(commitment - committed_usage, currency),
                )
            )
        lines += seg_lines
    lines += _in_advance_lines(catalog, customer_id, period, segments, previous, currency)
    subtotal = _sum(line for line in lines if line.kind not in ("discount", "commitment_true_up"))
    draws = _merge_draws(all_draws)
    last = segments[-1] if segments else None
    plan_id = last.plan_id if last else customer.plan
    version_names = tuple(dict.fromkeys(seg.version.version for seg in segments))
    lines.extend(adjustments)
    total = _sum(lines)
    credit_note = None
    if total < 0:
        credited = [
            line for line in lines
            if line.amount < 0 and line.kind in ("outcomes", "late_adjustment", "base_fee_adjustment")
        ]  # fmt: skip
        credit_note = CreditNote(
            amount=total,
            reason="credits exceed this period's charges: "
            + "; ".join(f"{line.description} {_money(line.amount)}" for line in credited),
        )

    cost_to_serve = round_money(usage.cost_to_serve, currency)
    granted = sum((d.drawn_credits for d in draws), ZERO)
    return Invoice(
        customer_id=customer_id,
        period=period,
        period_start=start,
        period_end=end,
        plan_id=plan_id,
        plan_version=version_names[-1] if version_names else "",
        plan_versions=version_names,
        segments=tuple(
            InvoiceSegment(start=seg.start, end=seg.end, plan_id=seg.plan_id, plan_version=seg.version.version,
                           discount_percent=seg.discount_percent)  # fmt: skip
            for seg in segments
        ),
        currency=currency,
        status="final" if as_of >= end else "preview",
        as_of=as_of,
        lines=tuple(lines),
        subtotal=subtotal,
        total=total,
        usage=UsageSummary(
            credits_used=usage.credits,
            included_credits=included_total,
            included_used=included_used_total,
            overage_credits=overage_total,
            grant_credits_applied=granted,
            billed_overage_credits=overage_total - granted,
            active_seats=usage.active_seats,
            cost_to_serve=cost_to_serve,
            margin=total - cost_to_serve,
        ),
        grants=tuple(draws),
        by_meter=usage.by_meter,
        credit_note=credit_note,
        refused=tuple(refused),
    )


def catalog_fingerprint(catalog: Catalog) -> str:
    """sha256 of everything in the catalog that prices (plans, versions, price books, assignments)."""
    return hashlib.sha256(catalog.model_dump_json().encode()).hexdigest()


def issue(invoice: Invoice, catalog: Catalog, *, invoice_number: str, issued_at: datetime) -> Invoice:
    """The invoice as issued: a final invoice stamped with its number, time and catalog fingerprint."""
    if invoice.status == "preview" or issued_at < invoice.period_end:
        raise InvoiceError(f"the invoice for {invoice.period} cannot be issued before the period ends")
    return invoice.model_copy(
        update={
            "status": "issued",
            "invoice_number": invoice_number,
            "issued_at": issued_at,
            "catalog_fingerprint": catalog_fingerprint(catalog),
        }
    )


def late_adjustment(closed_period: str, before: Invoice, after: Invoice, events: int, credits: Decimal) -> InvoiceLine:
    """A flagged line for usage that arrived after ``closed_period`` closed.

    The closed invoice is never rewritten: the amount is what that invoice
    would total with the late usage (``after``) minus what it totalled without
    it (``before``), so every rule of the closed period (its plan version,
    allowance, tiers, discount, commitment) prices the late usage.
    """
    return InvoiceLine(
        kind="late_adjustment",
        description=(
            f"Late usage for {closed_period} (closed): {events} events, {_num(credits)} credits; "
            f"{closed_period} invoice {_money(before.total)} -> {_money(after.total)}"
        ),
        quantity=Decimal(events),
        amount=after.total - before.total,
    )


# --- plain text ----------------------------------------------------------------------------------


def _money(amount: Decimal) -> str:
    return f"{amount:,f}"


def render_invoice_text(invoice: Invoice) -> str:
    """A readable plain-text invoice: header, one row per line, totals, usage and grants."""
    width = 108
    last_day = (invoice.period_end - timedelta(days=1)).date()
    if invoice.status == "issued" and invoice.issued_at is not None:
        title = f"INVOICE {invoice.invoice_number} (issued {invoice.issued_at:%Y-%m-%d %H:%M} UTC)"
    else:
        title = "INVOICE" if invoice.status == "final" else "INVOICE PREVIEW (period not closed)"
    out = [
        title,
        f"Customer: {invoice.customer_id}",
        f"Period:   {invoice.period} ({invoice.period_start.date()} to {last_day}, UTC)",
        f"Plan:     {invoice.plan_id} (version {invoice.plan_version})",
        f"Currency: {invoice.currency}    As of: {invoice.as_of.isoformat()}",
        "",
        f"{'Description':<66}{'Quantity':>14}{'Unit price':>12}{'Amount':>16}",
        "-" * width,
    ]

    def row(label: str, quantity: str, unit: str, amount: str) -> str:
        # A long description is never cut (a dispute needs all of it): it pushes its row wider.
        return f"{label:<65} {quantity:>14}{unit:>12}{amount:>16}"

    for line in invoice.lines:
        quantity = "" if line.quantity is None else _num(line.quantity)
        unit = "" if line.unit_price is None else _money(line.unit_price)
        out.append(row(line.description, quantity, unit, _money(line.amount)))
    out += [
        "-" * width,
        row("Subtotal", "", "", _money(invoice.subtotal)),
        row(f"Total ({invoice.currency})", "", "", _money(invoice.total)),
        "",
        "Usage (usage credits: usage events; outcomes are priced per outcome above)",
        f"  Usage credits used:      {_num(invoice.usage.credits_used)}",
        f"  Included in plan:        {_num(invoice.usage.included_credits)}",
        f"  Overage credits:         {_num(invoice.usage.overage_credits)}",
        f"    paid by credit grants: {_num(invoice.usage.grant_credits_applied)}",
        f"    billed credits:        {_num(invoice.usage.billed_overage_credits)}",
    ]
    if invoice.credit_note is not None:
        out += ["", f"CREDIT NOTE {_money(invoice.credit_note.amount)} {invoice.currency}: {invoice.credit_note.reason}"]
    if invoice.refused:
        out += ["", "Refused (kept, not billed)"]
        out += [f"  {r.event_id}: {r.reason}" for r in invoice.refused]
    if invoice.usage.active_seats:
        out.append(f"  Active seats:            {_num(invoice.usage.active_seats)}")
    if invoice.grants:
        out += [
            "",
            "Credit grants (credits)",
            f"  {'grant':<20}{'kind':<10}{'expires':<12}{'opening':>14}{'drawn':>14}{'closing':>14}",
        ]
        for g in invoice.grants:
            expires = str(g.expires) if g.expires else "never"
            note = "" if g.usable else "  (not usable this period)"
            out.append(
                f"  {g.grant_id:<20}{g.kind.value:<10}{expires:<12}{_num(g.opening_credits):>14}"
                f"{_num(g.drawn_credits):>14}{_num(g.closing_credits):>14}{note}"
            )
    if invoice.by_meter:
        out += ["", "Usage credits by meter", f"  {'meter':<12}{'model':<32}{'events':>10}{'usage credits':>20}"]
        for m in invoice.by_meter:
            out.append(f"  {m.meter:<12}{m.model or '-':<32}{m.events:>10}{_num(m.credits):>20}")
    return "\n".join(out) + "\n"
