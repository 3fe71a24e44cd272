"""Integrity properties of invoices (issue 14), as hypothesis tests over random plans, tiers, grants
and usage: a grant never raises a total; adding usage never lowers one; any batching or order of a
period's events gives the same invoice; reversals need a billed outcome, reverse it at most once
and at the price it was billed; a negative total always carries a credit note."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from meterstream.billing import invoices_from_rated, rate_events
from meterstream.budgets import BudgetBook
from meterstream.pricing.invoice import Invoice, InvoiceLine, OutcomeCount, PeriodUsage, compute_invoice
from meterstream.pricing.plans import Catalog, parse_catalog
from meterstream.pricing.reversals import match_reversals
from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.stream_processors.processing import BatchProcessor, InboundMessage, MonthToDate

D = Decimal
AFTER = datetime(2030, 1, 1, tzinfo=timezone.utc)
T0 = datetime(2025, 2, 3, 12, tzinfo=timezone.utc)
PERIOD = "2025-02"


def book(version: str, outcome_price: str = "1") -> dict[str, Any]:
    return {
        "version": version,
        "meters": {"requests": {"credits_per_unit": "1", "cost_per_unit": "0.001"}},
        "outcomes": {"resolved_ticket": {"ai_only": outcome_price, "human_assisted": "0"}},
    }


def catalog_of(version: dict[str, Any], customer: dict[str, Any] | None = None, **extra: Any) -> Catalog:
    first = {"version": "v1", "effective_from": "2025-01-01", "price_book": book("v1"), **version}
    return parse_catalog(
        {
            "currency": "USD",
            "plans": {"p": {"versions": [first, *extra.get("later", [])]}},
            "customers": {"acme": {"plan": "p", **(customer or {})}},
        }
    )


# -- strategies ------------------------------------------------------------------------------------

prices = st.decimals(min_value=0, max_value=D("0.5"), places=4)


@st.composite
def tier_lists(draw: st.DrawFn, falling: bool = False) -> list[dict[str, Any]]:
    bounds = sorted(set(draw(st.lists(st.integers(min_value=1, max_value=300_000), min_size=0, max_size=3))))
    unit_prices = draw(st.lists(prices, min_size=len(bounds) + 1, max_size=len(bounds) + 1))
    if falling:
        unit_prices = sorted(unit_prices, reverse=True)
    flat_fees = draw(st.lists(st.sampled_from(["0", "0", "25", "7.505"]), min_size=len(bounds) + 1, max_size=len(bounds) + 1))
    return [
        {"up_to": str(bound) if i < len(bounds) else None, "unit_price": str(price), "flat_fee": fee}
        for i, (bound, price, fee) in enumerate(zip([*bounds, None], unit_prices, flat_fees, strict=True))
    ]


@st.composite
def overage_models(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["per_unit", "graduated", "volume", "package"]))
    if kind == "per_unit":
        return {"model": kind, "unit_price": str(draw(prices))}
    if kind == "package":
        size = draw(st.integers(min_value=1, max_value=5000))
        return {"model": kind, "package_size": str(size), "package_price": str(draw(prices) * 100)}
    return {"model": kind, "tiers": draw(tier_lists())}


@st.composite
def plan_versions(draw: st.DrawFn, falling_volume: bool = False) -> dict[str, Any]:
    overage = {"model": "volume", "tiers": draw(tier_lists(falling=True))} if falling_volume else draw(overage_models())
    return {
        "overage": overage,
        "base_fee": str(draw(st.sampled_from([D(0), D("99.995"), D(500)]))),
        "included_credits": str(draw(st.sampled_from([D(0), D("1234.5"), D(50000)]))),
        "minimum_commitment": str(draw(st.sampled_from([D(0), D(750), D("3000.005")]))),
        "seat_fee": str(draw(st.sampled_from([D(0), D("12.345")]))),
        "outcome_prices": {"resolved_ticket": {"ai_only": "0.90", "human_assisted": "0.10"}},
    }


grants = st.lists(
    st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["free", "prepaid"]),
            "credits": st.integers(min_value=1, max_value=200_000).map(str),
            "granted_on": st.sampled_from(["2025-01-01", "2025-02-05"]),
            "expires": st.sampled_from([None, "2025-02-10", "2025-12-31"]),
        }
    ),
    max_size=3,
)
discounts = st.sampled_from(["0", "10", "33.3333", "100"])
credit_amounts = st.decimals(min_value=0, max_value=400_000, places=4)


def usage(credits: Decimal, outcomes: int = 0, reversals: int = 0, seats: int = 0) -> PeriodUsage:
    counts = (OutcomeCount(outcome_type="resolved_ticket", attribution="ai_only", count=outcomes, reversals=reversals),)
    return PeriodUsage(credits=credits, active_seats=D(seats), outcomes=counts if outcomes or reversals else ())


# -- a grant never raises a total ------------------------------------------------------------------


@given(plan_versions(), grants, discounts, credit_amounts, st.integers(0, 50), st.integers(0, 5))
def test_a_grant_never_raises_a_total(
    version: dict[str, Any], grant_list: list[dict[str, Any]], discount: str, credits: Decimal, outcomes: int, seats: int
) -> None:
    used = usage(credits, outcomes, seats=seats)
    without = compute_invoice("acme", PERIOD, used, catalog_of(version, {"discount_percent": discount}), as_of=AFTER)
    with_grants = compute_invoice(
        "acme", PERIOD, used, catalog_of(version, {"discount_percent": discount, "grants": grant_list}), as_of=AFTER
    )
    assert with_grants.total <= without.total
    # One rule: the grants take overage total × drawn ÷ overage off, rounded once.
    overage_total = sum((line.amount for line in with_grants.lines if line.kind == "overage"), D(0))
    applied = -sum((line.amount for line in with_grants.lines if line.kind == "credits_applied"), D(0))
    drawn, overage = with_grants.usage.grant_credits_applied, with_grants.usage.overage_credits
    assert applied == ((overage_total * drawn / overage).quantize(D("0.01"), "ROUND_HALF_UP") if overage else 0)


# -- adding usage never lowers a total -------------------------------------------------------------


def overage_charge(invoice: Invoice) -> Decimal:
    """What the overage lines bill (before grants, discount and commitment)."""
    return sum((line.amount for line in invoice.lines if line.kind == "overage"), D(0))


def volume_reference(overage: Decimal, tiers: list[dict[str, Any]]) -> tuple[int, Decimal]:
    """The tier table read by hand: (index of the tier the overage reaches, what it bills, rounded per line)."""
    for index, tier in enumerate(tiers):
        if tier["up_to"] is None or overage <= D(tier["up_to"]):
            cents = D("0.01")
            units = (overage * D(tier["unit_price"])).quantize(cents, "ROUND_HALF_UP")
            flat = D(tier.get("flat_fee", "0")) if overage else D(0)
            return index, units + flat.quantize(cents, "ROUND_HALF_UP")
    raise AssertionError("the last tier is unbounded")


def near_a_boundary(data: st.DataObject, version: dict[str, Any], credits: Decimal, more: Decimal) -> tuple[Decimal, Decimal]:
    """Often move the usage just below a tier boundary and add a little: where volume tiers can fall."""
    bounds = [D(t["up_to"]) for t in version["overage"].get("tiers") or [] if t["up_to"] is not None]
    if not bounds or not data.draw(st.booleans()):
        return credits, more
    boundary = D(version["included_credits"]) + data.draw(st.sampled_from(bounds))
    below = data.draw(st.decimals(min_value=0, max_value=min(boundary, D(50)), places=2))
    return boundary - below, below + data.draw(st.decimals(min_value=D("0.01"), max_value=D(100), places=2))


@given(
    st.one_of(plan_versions(), plan_versions(falling_volume=True)), grants, discounts, credit_amounts, credit_amounts,
    st.integers(0, 30), st.integers(0, 30), st.integers(0, 5), st.integers(0, 5), st.data(),
)  # fmt: skip
@settings(max_examples=300)
def test_adding_usage_never_lowers_a_total(
    version: dict[str, Any], grant_list: list[dict[str, Any]], discount: str, credits: Decimal, more: Decimal,
    outcomes: int, more_outcomes: int, seats: int, more_seats: int, data: st.DataObject,
) -> None:  # fmt: skip
    """Every model, random tiers (volume prices falling too), grants, discounts, commitments, seats, outcomes.

    More usage never lowers a total, with one documented exception (docs/billing.md, "Adding usage
    never lowers a total"): volume tiers, where the total may fall only when the overage crosses a
    tier boundary into a cheaper tier, and by no more than the overage charge falls -- which is
    exactly what the tier table says the two quantities cost.
    """
    credits, more = near_a_boundary(data, version, credits, more)
    catalog = catalog_of(version, {"discount_percent": discount, "grants": grant_list})
    before = compute_invoice("acme", PERIOD, usage(credits, outcomes, seats=seats), catalog, as_of=AFTER)
    after = compute_invoice(
        "acme", PERIOD, usage(credits + more, outcomes + more_outcomes, seats=seats + more_seats), catalog, as_of=AFTER
    )
    overage = version["overage"]
    if overage["model"] != "volume":
        assert after.total >= before.total
        return
    tier_before, charge_before = volume_reference(before.usage.overage_credits, overage["tiers"])
    tier_after, charge_after = volume_reference(after.usage.overage_credits, overage["tiers"])
    # The overage lines are the tier table, to the cent.
    assert (overage_charge(before), overage_charge(after)) == (charge_before, charge_after)
    if tier_before == tier_after:
        # Within a tier volume pricing is monotone like every other model.
        assert charge_after >= charge_before and after.total >= before.total
    # A decrease of the total needs a boundary crossed into a cheaper tier, and is at most the overage's fall.
    if after.total < before.total:
        event("volume: the total fell at a tier boundary")
        assert tier_after > tier_before and charge_after < charge_before
        assert before.total - after.total <= charge_before - charge_after


@given(
    st.one_of(tier_lists(), tier_lists(falling=True)), credit_amounts, credit_amounts, st.sampled_from([D(0), D(500)]),
    st.data(),
)  # fmt: skip
@settings(max_examples=200)
def test_a_volume_decrease_is_exactly_the_tier_tables(
    tiers: list[dict[str, Any]], credits: Decimal, more: Decimal, base_fee: Decimal, data: st.DataObject
) -> None:
    # A plain volume plan (no grants, discount or commitment): the total moves by exactly what the
    # tier table says the overage costs before and after, up or down.
    version = {"overage": {"model": "volume", "tiers": tiers}, "base_fee": str(base_fee), "included_credits": "0"}
    credits, more = near_a_boundary(data, version, credits, more)
    catalog = catalog_of(version)
    before = compute_invoice("acme", PERIOD, usage(credits), catalog, as_of=AFTER)
    after = compute_invoice("acme", PERIOD, usage(credits + more), catalog, as_of=AFTER)
    tier_before, charge_before = volume_reference(credits, tiers)
    tier_after, charge_after = volume_reference(credits + more, tiers)
    assert after.total - before.total == charge_after - charge_before
    if after.total < before.total:
        event("plain volume plan: the total fell at a tier boundary")
        assert tier_after > tier_before  # only ever at a boundary


@given(
    plan_versions(falling_volume=True), grants, discounts, credit_amounts, credit_amounts,
    st.integers(0, 30), st.integers(0, 30), st.integers(0, 5), st.integers(0, 5), st.data(),
)  # fmt: skip
@settings(max_examples=200)
def test_with_a_volume_floor_adding_usage_never_lowers_a_total(
    version: dict[str, Any], grant_list: list[dict[str, Any]], discount: str, credits: Decimal, more: Decimal,
    outcomes: int, more_outcomes: int, seats: int, more_seats: int, data: st.DataObject,
) -> None:  # fmt: skip
    # The opt-in monotone variant (volume_floor: true): no exception at all, boundaries included.
    version = {**version, "overage": {**version["overage"], "volume_floor": True}}
    credits, more = near_a_boundary(data, version, credits, more)
    catalog = catalog_of(version, {"discount_percent": discount, "grants": grant_list})
    before = compute_invoice("acme", PERIOD, usage(credits, outcomes, seats=seats), catalog, as_of=AFTER)
    after = compute_invoice(
        "acme", PERIOD, usage(credits + more, outcomes + more_outcomes, seats=seats + more_seats), catalog, as_of=AFTER
    )
    assert overage_charge(after) >= overage_charge(before)
    assert after.total >= before.total
    # The floor is the highest top of a tier below, or the volume price when that is more.
    tiers = version["overage"]["tiers"]
    quantity = after.usage.overage_credits
    tops = [D(t["up_to"]) * D(t["unit_price"]) + D(t["flat_fee"]) for t in tiers if t["up_to"] and D(t["up_to"]) < quantity]
    reached = next(t for t in tiers if t["up_to"] is None or quantity <= D(t["up_to"]))
    exact = max([quantity * D(reached["unit_price"]) + (D(reached["flat_fee"]) if quantity else D(0)), *tops])
    assert overage_charge(after) == exact.quantize(D("0.01"), "ROUND_HALF_UP")


def test_volume_cliff_is_the_documented_exception() -> None:
    # PRICING.md's volume row: every unit at the price of the tier the total reaches. 5,000 units
    # cost $400.00 and 6,000 cost $300.00; that is what volume pricing means, so it is the one
    # model where more usage can cost less (docs/billing.md says so).
    tiers = [{"up_to": "1000", "unit_price": "0.10"}, {"up_to": "5000", "unit_price": "0.08"},
             {"up_to": None, "unit_price": "0.05"}]  # fmt: skip
    catalog = catalog_of({"overage": {"model": "volume", "tiers": tiers}})
    totals = [compute_invoice("acme", PERIOD, usage(D(n)), catalog, as_of=AFTER).total for n in (5000, 5001, 6000)]
    assert totals == [D("400.00"), D("250.05"), D("300.00")]
    # The opt-in volume_floor: never less than the top of a tier below (5,000 × 0.08 = 400.00).
    floored = catalog_of({"overage": {"model": "volume", "tiers": tiers, "volume_floor": True}})
    totals = [compute_invoice("acme", PERIOD, usage(D(n)), floored, as_of=AFTER).total for n in (5000, 5001, 6000, 8001)]
    assert totals == [D("400.00"), D("400.00"), D("400.00"), D("400.05")]


# -- no negative total without a credit note -------------------------------------------------------


@given(plan_versions(), grants, discounts, credit_amounts, st.integers(0, 20), st.integers(0, 40),
       st.lists(st.decimals(min_value=-500, max_value=500, places=2), max_size=2))  # fmt: skip
def test_a_negative_total_always_has_a_credit_note(
    version: dict[str, Any], grant_list: list[dict[str, Any]], discount: str, credits: Decimal,
    outcomes: int, reversals: int, late: list[Decimal],
) -> None:  # fmt: skip
    catalog = catalog_of(version, {"discount_percent": discount, "grants": grant_list})
    adjustments = [InvoiceLine(kind="late_adjustment", description="late", amount=a) for a in late]
    invoice = compute_invoice(
        "acme", PERIOD, usage(credits, outcomes, reversals), catalog, as_of=AFTER, adjustments=adjustments
    )
    if invoice.total < 0:
        assert invoice.credit_note is not None and invoice.credit_note.amount == invoice.total
        assert "reversals" in invoice.credit_note.reason or "late" in invoice.credit_note.reason.lower()
        # Only reversals and late adjustments can take a total below zero.
        assert reversals > 0 or any(a < 0 for a in late)
    else:
        assert invoice.credit_note is None
    # Everything but reversals and adjustments together is never negative.
    rest = sum(
        (line.amount for line in invoice.lines if not (line.kind == "late_adjustment" or line.amount < 0 and line.kind == "outcomes")),
        D(0),
    )
    assert rest >= 0


# -- reversals ---------------------------------------------------------------------------------------


def outcome(event_id: str, at: datetime = T0, reversal_of: str | None = None, **kw: Any) -> OutcomeEvent:
    return OutcomeEvent(
        event_id=event_id, customer_id=kw.pop("customer_id", "acme"), occurred_at=at,
        outcome_type="resolved_ticket", attribution=kw.pop("attribution", "ai_only"), reversal_of=reversal_of,
    )  # fmt: skip


def requests(event_id: str, quantity: int, at: datetime = T0) -> UsageEvent:
    return UsageEvent(event_id=event_id, customer_id="acme", occurred_at=at, meter="requests", quantity=quantity)


PRICED = {"overage": {"model": "per_unit", "unit_price": "0"}, "outcome_prices": {"resolved_ticket": {"ai_only": "1.00"}}}


def test_the_reported_case_one_outcome_three_reversals() -> None:
    # 1 outcome at 1.00 and 3 reversals used to bill −5.00 ... now the first reverses it, the others are refused.
    catalog = catalog_of(PRICED)
    events = [
        outcome("o1"),
        outcome("r1", T0 + timedelta(hours=1), reversal_of="o1"),
        outcome("r2", T0 + timedelta(hours=2), reversal_of="o1"),
        outcome("r3", T0 + timedelta(hours=3), reversal_of="nope"),
    ]
    refused: list[Any] = []
    rated, errors = rate_events(catalog, events, refused=refused)
    assert errors == []
    assert {r.event_id: r.reason for r in refused} == {
        "r2": "outcome 'o1' was already reversed by 'r1'",
        "r3": "reversal_of 'nope': no billed outcome with that id for customer 'acme'",
    }
    [invoice] = invoices_from_rated(catalog, rated, as_of=AFTER, refused=refused)
    assert invoice.total == D("0.00")
    assert [r.event_id for r in invoice.refused] == ["r2", "r3"]  # kept on the invoice, credited nothing
    # Without a refused list they are reported as errors (``meterstream rate`` exits 2).
    assert len(rate_events(catalog, events)[1]) == 2


def test_a_reversal_is_credited_at_the_price_it_was_billed() -> None:
    # The outcome is billed under v1 at 1.00; from the 10th, v2 prices it at 3.00. A reversal on the
    # 20th credits 1.00, not 3.00, and keeps the outcome's attribution.
    later = [{"version": "v2", "effective_from": "2025-02-10", "price_book": book("v2", "7"),
              "overage": {"model": "per_unit", "unit_price": "0"},
              "outcome_prices": {"resolved_ticket": {"ai_only": "3.00", "human_assisted": "2.00"}}}]  # fmt: skip
    catalog = catalog_of(PRICED, later=later)
    events = [outcome("o1"), outcome("r1", datetime(2025, 2, 20, tzinfo=timezone.utc), reversal_of="o1",
                                     attribution="human_assisted")]  # fmt: skip
    rated, errors = rate_events(catalog, events)
    assert errors == []
    reversal = next(r for r in rated if r.event_id == "r1")
    assert (reversal.price_book_version, reversal.attribution, reversal.credits) == ("v1", "ai_only", D(-1))
    [invoice] = invoices_from_rated(catalog, rated, as_of=AFTER)
    assert [line.amount for line in invoice.lines if line.kind == "outcomes"] == [D("1.00"), D("-1.00")]


def test_a_reversal_before_its_outcome_or_of_a_reversal_is_refused() -> None:
    catalog = catalog_of(PRICED)
    events = [outcome("o1", T0), outcome("early", T0 - timedelta(hours=1), reversal_of="o1"),
              outcome("r1", T0 + timedelta(hours=1), reversal_of="o1"),
              outcome("rr", T0 + timedelta(hours=2), reversal_of="r1")]  # fmt: skip
    refused: list[Any] = []
    rate_events(catalog, events, refused=refused)
    reasons = {r.event_id: r.reason for r in refused}
    assert reasons["early"].startswith("reversal at 2025-02-03T11:00:00+00:00 precedes outcome 'o1'")
    assert reasons["rr"] == "reversal_of 'r1': no billed outcome with that id for customer 'acme'"
    assert set(reasons) == {"early", "rr"}


def test_a_reversal_of_an_outcome_billed_in_an_earlier_period_is_credited_with_a_credit_note() -> None:
    catalog = catalog_of(PRICED)
    events = [outcome("o1", datetime(2025, 1, 30, tzinfo=timezone.utc)),
              outcome("r1", T0, reversal_of="o1")]  # fmt: skip
    rated, errors = rate_events(catalog, events)
    assert errors == []
    january, february = invoices_from_rated(catalog, rated, as_of=AFTER)
    assert (january.total, february.total) == (D("1.00"), D("-1.00"))
    assert february.credit_note is not None and february.credit_note.amount == D("-1.00")
    assert "reversals" in february.credit_note.reason and january.credit_note is None


# -- batching and order ------------------------------------------------------------------------------


@st.composite
def event_sets(draw: st.DrawFn) -> list[UsageEvent | OutcomeEvent]:
    n_usage = draw(st.integers(0, 12))
    events: list[UsageEvent | OutcomeEvent] = [
        requests(f"u{i}", draw(st.integers(1, 40_000)), T0 + timedelta(minutes=draw(st.integers(0, 30_000))))
        for i in range(n_usage)
    ]
    n_outcomes = draw(st.integers(0, 6))
    for i in range(n_outcomes):
        events.append(outcome(f"o{i}", T0 + timedelta(minutes=i)))
    for j in range(draw(st.integers(0, 6))):
        target = f"o{draw(st.integers(0, n_outcomes))}"  # o{n_outcomes} does not exist
        events.append(outcome(f"r{j}", T0 + timedelta(hours=2, minutes=j), reversal_of=target))
    # Resends: the same id again counts once.
    events += draw(st.lists(st.sampled_from(events), max_size=3)) if events else []
    return events


def causal_shuffle(events: list[UsageEvent | OutcomeEvent], rng: random.Random) -> list[UsageEvent | OutcomeEvent]:
    """Any order in which a reversal arrives after the outcome it names (the stream's condition)."""
    shuffled = events[:]
    rng.shuffle(shuffled)
    outcomes = [e for e in shuffled if not (isinstance(e, OutcomeEvent) and e.reversal_of)]
    for reversal in (e for e in shuffled if isinstance(e, OutcomeEvent) and e.reversal_of):
        after = max((i for i, e in enumerate(outcomes) if e.event_id == reversal.reversal_of), default=-1)
        outcomes.insert(rng.randint(after + 1, len(outcomes)), reversal)
    return outcomes


def stream(catalog: Catalog, events: list[UsageEvent | OutcomeEvent], cuts: list[int]) -> tuple[list[Any], set[str]]:
    processor = BatchProcessor(catalog, BudgetBook())
    rated: list[Any] = []
    refused: set[str] = set()
    messages = [
        InboundMessage("outcome" if isinstance(e, OutcomeEvent) else "usage", e.model_dump_json().encode(), "t", 0, i)
        for i, e in enumerate(events)
    ]
    edges = [0, *sorted(c % (len(messages) + 1) for c in cuts), len(messages)]
    for lo, hi in zip(edges, edges[1:], strict=False):
        result = processor.process(messages[lo:hi], lambda key: MonthToDate(), now=AFTER)
        processor.commit(result)
        rated += result.rated
        # A refused reversal is dead-lettered each time it is sent (it was never accepted).
        refused |= {OutcomeEvent.model_validate_json(d.raw).event_id for d in result.dead_letters}
    return rated, refused


@settings(max_examples=60, deadline=None)
@given(plan_versions(), grants, event_sets(), st.randoms(use_true_random=False), st.lists(st.integers(0, 100), max_size=4))
def test_batches_and_order_never_change_the_invoice(
    version: dict[str, Any], grant_list: list[dict[str, Any]], events: list[Any], rng: random.Random, cuts: list[int]
) -> None:
    version = {**version, "outcome_prices": {"resolved_ticket": {"ai_only": "0.90", "human_assisted": "0.10"}}}
    catalog = catalog_of(version, {"grants": grant_list})
    offline_refused: list[Any] = []
    reference = invoices_from_rated(catalog, rate_events(catalog, events, refused=offline_refused)[0], as_of=AFTER)

    # Offline, any order at all.
    shuffled = events[:]
    rng.shuffle(shuffled)
    assert invoices_from_rated(catalog, rate_events(catalog, shuffled)[0], as_of=AFTER) == reference

    # The stream, in batches cut anywhere, in any order where a reversal follows its outcome.
    rated, refused = stream(catalog, causal_shuffle(events, rng), cuts)
    assert invoices_from_rated(catalog, rated, as_of=AFTER) == reference
    # Of two reversals of one outcome the stream accepts the first to arrive, offline the earliest;
    # either way one is credited (at the same price) and the other refused.
    assert len(refused) == len(offline_refused)


def test_match_reversals_does_not_depend_on_order() -> None:
    catalog = catalog_of(PRICED)
    events = [outcome("o1"), outcome("r2", T0 + timedelta(hours=2), reversal_of="o1"),
              outcome("r1", T0 + timedelta(hours=1), reversal_of="o1")]  # fmt: skip
    pairs = [(e, catalog.rate(e)) for e in events]
    for order in (pairs, pairs[::-1]):
        rows, refused = match_reversals(order)
        assert [r.event_id for r in refused] == ["r2"]  # the earliest reversal is the one accepted
