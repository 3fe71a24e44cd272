"""Invoices: PRICING.md's hybrid example to the cent, grants, discounts, commitments, outcomes,
seats, versions, the rounding rule, and properties that keep totals honest."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.pricing.invoice import (
    USAGE_BASED_KINDS,
    Invoice,
    InvoiceError,
    OutcomeCount,
    PeriodUsage,
    compute_invoice,
    render_invoice_text,
)
from meterstream.pricing.plans import Catalog, UnknownCustomerError, load_catalog, parse_catalog
from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.schemas.records import RatedUsage

D = Decimal
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plans.yaml"
AFTER = datetime(2030, 1, 1, tzinfo=timezone.utc)  # as_of after every period used here: final invoices
GRADUATED = {
    "model": "graduated",
    "tiers": [{"up_to": "100000", "unit_price": "0.012"}, {"up_to": None, "unit_price": "0.010"}],
}

#: PRICING.md "Hybrid plans": $500/month, 50,000 credits included, then $0.012 for the next
#: 100,000 credits and $0.010 beyond. A second version starts mid-March 2025.
HYBRID: dict[str, Any] = {
    "currency": "USD",
    "plans": {
        "growth": {
            "versions": [
                {
                    "version": "growth-2025-01",
                    "effective_from": "2025-01-01",
                    "base_fee": "500",
                    "included_credits": "50000",
                    "overage": GRADUATED,
                    "credit_value": "0.01",
                    "outcome_prices": {"resolved_ticket": {"ai_only": "0.90", "human_assisted": "0.00"}},
                },
                {
                    "version": "growth-2025-03-15",
                    "effective_from": "2025-03-15",
                    "base_fee": "900",
                    "included_credits": "10000",
                    "overage": {"model": "per_unit", "unit_price": "0.05"},
                    "outcome_prices": {"resolved_ticket": {"ai_only": "1.50", "human_assisted": "0.25"}},
                },
            ]
        }
    },
    "customers": {"acme": {"plan": "growth"}},
}


def make_catalog(customer: dict[str, Any] | None = None, **version_changes: Any) -> Catalog:
    """The hybrid catalog; ``version_changes`` edit its first version, ``customer`` replaces acme's entry."""
    data = copy.deepcopy(HYBRID)
    data["plans"]["growth"]["versions"][0].update(version_changes)
    if customer is not None:
        data["customers"]["acme"] = {"plan": "growth", **customer}
    return parse_catalog(data)


def invoice_for(
    credits: str | int | Decimal, catalog: Catalog | None = None, period: str = "2025-02", **kw: Any
) -> Invoice:
    usage = kw.pop("usage", None) or PeriodUsage(credits=D(credits))
    return compute_invoice("acme", period, usage, catalog or make_catalog(), as_of=kw.pop("as_of", AFTER), **kw)


def amounts(invoice: Invoice, kind: str) -> list[Decimal]:
    return [line.amount for line in invoice.lines if line.kind == kind]


def lines_sum(invoice: Invoice) -> Decimal:
    return sum((line.amount for line in invoice.lines), D(0))


# --- PRICING.md ------------------------------------------------------------------------------------


def test_pricing_md_hybrid_example_is_2000_exactly() -> None:
    invoice = invoice_for(180_000)
    assert invoice.total == D("2000.00")
    assert str(invoice.total) == "2000.00"
    assert amounts(invoice, "base_fee") == [D("500.00")]
    assert amounts(invoice, "overage") == [D("1200.00"), D("300.00")]
    overage = [line for line in invoice.lines if line.kind == "overage"]
    assert [(line.quantity, line.unit_price) for line in overage] == [(D(100000), D("0.012")), (D(30000), D("0.010"))]
    included = next(line for line in invoice.lines if line.kind == "included_usage")
    assert (included.quantity, included.amount) == (D(50000), D("0.00"))
    assert (invoice.usage.credits_used, invoice.usage.included_credits, invoice.usage.overage_credits) == (
        D(180000),
        D(50000),
        D(130000),
    )
    assert (invoice.plan_id, invoice.plan_version, invoice.currency, invoice.status) == (
        "growth",
        "growth-2025-01",
        "USD",
        "final",
    )


def test_usage_within_the_allowance_pays_the_base_fee_only() -> None:
    invoice = invoice_for(20_000)
    assert invoice.total == D("500.00")
    assert amounts(invoice, "overage") == []


def test_example_catalog_invoice_for_acme() -> None:
    # acme: the growth-2026-11 version (PRICING.md's plan), 10% discount, a free and a prepaid grant.
    catalog = load_catalog(EXAMPLE)
    invoice = compute_invoice("acme", "2026-11", PeriodUsage(credits=D(180000)), catalog, as_of=AFTER)
    # 130,000 overage credits cost 1,500.00 (average 1,500/130,000); 25,000 paid by grants at that average:
    # 5,000 free -> 57.69; 25,000 cumulative -> 288.46, so the prepaid line is 230.77. Billed 1,211.54.
    assert amounts(invoice, "credits_applied") == [D("-57.69"), D("-230.77")]
    assert amounts(invoice, "discount") == [D("-121.15")]
    assert invoice.total == D("500.00") + D("1211.54") - D("121.15")


# --- commitments -------------------------------------------------------------------------------------


def test_usage_below_the_commitment_is_trued_up_to_it() -> None:
    catalog = make_catalog(base_fee="0", included_credits="0", minimum_commitment="1000")
    invoice = invoice_for(50_000, catalog)  # 50,000 × 0.012 = 600.00 of usage
    assert amounts(invoice, "overage") == [D("600.00")]
    assert amounts(invoice, "commitment_true_up") == [D("400.00")]
    assert invoice.total == D("1000.00")
    assert invoice.subtotal == D("600.00")


def test_usage_above_the_commitment_has_no_true_up() -> None:
    catalog = make_catalog(base_fee="0", included_credits="0", minimum_commitment="1000")
    invoice = invoice_for(100_000, catalog)
    assert amounts(invoice, "commitment_true_up") == []
    assert invoice.total == D("1200.00")


def test_commitment_is_measured_after_discount_and_excludes_the_base_fee() -> None:
    catalog = make_catalog(customer={"discount_percent": "10"}, minimum_commitment="1000")
    invoice = invoice_for(150_000, catalog)  # 1,200.00 overage, −120.00 discount: 1,080.00 ≥ 1,000
    assert amounts(invoice, "commitment_true_up") == []
    invoice = invoice_for(130_000, catalog)  # 960.00 overage, −96.00: 864.00 → true-up 136.00
    assert amounts(invoice, "commitment_true_up") == [D("136.00")]
    assert invoice.total == D("500.00") + D("1000.00")


# --- grants ------------------------------------------------------------------------------------------


def test_prepaid_credits_reduce_the_overage_billed() -> None:
    catalog = make_catalog(customer={"grants": [{"kind": "prepaid", "credits": "20000", "granted_on": "2025-01-01"}]})
    invoice = invoice_for(180_000, catalog)
    # 130,000 overage credits cost 1,500.00; 20,000 prepaid at the average: 1,500 × 20,000 / 130,000 = 230.77.
    assert amounts(invoice, "credits_applied") == [D("-230.77")]
    assert invoice.total == D("500.00") + D("1500.00") - D("230.77")
    assert (invoice.usage.grant_credits_applied, invoice.usage.billed_overage_credits) == (D(20000), D(110000))
    (draw,) = invoice.grants
    assert (draw.opening_credits, draw.drawn_credits, draw.closing_credits) == (D(20000), D(20000), D(0))


def test_credits_applied_are_valued_at_the_average_overage_price() -> None:
    catalog = make_catalog(customer={"grants": [{"kind": "prepaid", "credits": "40000", "granted_on": "2025-01-01"}]})
    invoice = invoice_for(180_000, catalog)
    (applied,) = [line for line in invoice.lines if line.kind == "credits_applied"]
    # Not the cheapest tier (0.010) nor the first (0.012): 1,500.00 / 130,000 credits each.
    assert (applied.quantity, applied.unit_price, applied.amount) == (
        D(-40000), D("1500.00") / D(130000), D("-461.54")
    )
    assert invoice.total == D("500.00") + D("1500.00") - D("461.54")


def test_free_credits_expiring_before_the_period_ends_are_ignored() -> None:
    grants = [{"kind": "free", "credits": "30000", "granted_on": "2025-01-01", "expires": "2025-02-27"}]
    invoice = invoice_for(180_000, make_catalog(customer={"grants": grants}))
    assert amounts(invoice, "credits_applied") == []
    assert invoice.total == D("2000.00")
    assert invoice.grants[0].usable is False
    # Expiring on the last day of the period still counts.
    grants[0]["expires"] = "2025-02-28"
    assert invoice_for(180_000, make_catalog(customer={"grants": grants})).total == D("2000.00") - D("346.15")


def test_free_credits_are_drawn_before_prepaid() -> None:
    grants = [{"id": "paid", "kind": "prepaid", "credits": "50000", "granted_on": "2025-01-01"}, {"id": "gift", "kind": "free", "credits": "10000", "granted_on": "2025-01-01"}]
    invoice = invoice_for(80_000, make_catalog(customer={"grants": grants}))  # 30,000 overage credits
    drawn = {g.grant_id: g.drawn_credits for g in invoice.grants}
    assert drawn == {"gift": D(10000), "paid": D(20000)}
    assert invoice.total == D("500.00")


def test_grant_balances_carry_forward_to_the_next_period() -> None:
    catalog = make_catalog(customer={"grants": [{"id": "p", "kind": "prepaid", "credits": "50000", "granted_on": "2025-01-01"}]})
    january = invoice_for(90_000, catalog, period="2025-01")  # 40,000 overage: all prepaid
    assert january.total == D("500.00")
    assert january.closing_grant_balances() == {"p": D(10000)}
    february = invoice_for(90_000, catalog, period="2025-02", grant_balances=january.closing_grant_balances())
    assert february.total == D("500.00") + D(30000) * D("0.012")
    assert february.closing_grant_balances() == {"p": D(0)}


def test_grants_do_not_touch_usage_within_the_allowance() -> None:
    catalog = make_catalog(customer={"grants": [{"kind": "prepaid", "credits": "1000", "granted_on": "2025-01-01"}]})
    invoice = invoice_for(10_000, catalog)
    assert invoice.grants[0].drawn_credits == 0 and invoice.total == D("500.00")


def test_grants_against_volume_overage_never_raise_the_bill() -> None:
    volume = {"model": "volume", "tiers": GRADUATED["tiers"]}
    catalog = make_catalog(overage=volume, customer={"grants": [{"kind": "prepaid", "credits": "40000", "granted_on": "2025-01-01"}]})
    invoice = invoice_for(180_000, catalog)
    # 130,000 at 0.010 = 1,300.00. As extra allowance the grant would bill 90,000 at the 0.012 tier
    # (1,080.00, a credit of only 220.00); at the average price it takes 40,000 × 0.010 = 400.00 off.
    assert amounts(invoice, "overage") == [D("1300.00")]
    (applied,) = [line for line in invoice.lines if line.kind == "credits_applied"]
    assert (applied.quantity, applied.unit_price, applied.amount) == (D(-40000), D("0.01"), D("-400.00"))
    assert invoice.total == D("1400.00")


def test_issue_14_volume_grant_of_one_credit_lowers_the_bill() -> None:
    # The reported case: 100,001 overage credits on volume tiers and a 1-credit prepaid grant.
    tiers = [{"up_to": "100000", "unit_price": "0.0015"}, {"up_to": None, "unit_price": "0.0010"}]
    plan = {"model": "volume", "tiers": tiers}
    without = invoice_for(100_001, make_catalog(overage=plan, base_fee="0", included_credits="0"))
    catalog = make_catalog(overage=plan, base_fee="0", included_credits="0",
                           customer={"grants": [{"kind": "prepaid", "credits": "1", "granted_on": "2025-01-01"}]})  # fmt: skip
    with_grant = invoice_for(100_001, catalog)
    assert without.total == D("100.00")
    assert with_grant.total <= without.total
    assert with_grant.total == D("100.00")  # 1 credit at 0.001 rounds to 0.00 off


# --- discount ------------------------------------------------------------------------------------------


def test_discount_applies_to_usage_based_lines_only() -> None:
    catalog = make_catalog(customer={"discount_percent": "10"}, seat_fee="20")
    usage = PeriodUsage(
        credits=D(180000),
        active_seats=D(5),
        outcomes=(OutcomeCount(outcome_type="resolved_ticket", attribution="ai_only", count=100),),
    )
    invoice = invoice_for(0, catalog, usage=usage)
    # Usage-based: overage 1,500.00 + outcomes 90.00 = 1,590.00; base fee and seats are not discounted.
    assert amounts(invoice, "discount") == [D("-159.00")]
    assert invoice.subtotal == D("500.00") + D("1590.00") + D("100.00")
    assert invoice.total == invoice.subtotal - D("159.00")


def test_discount_is_rounded_half_up_once() -> None:
    catalog = make_catalog(customer={"discount_percent": "12.5"}, base_fee="0", included_credits="0")
    invoice = invoice_for(1, catalog)  # 0.012 → 0.01 overage; 12.5% of 0.01 = 0.00125 → 0.00
    assert amounts(invoice, "overage") == [D("0.01")]
    assert amounts(invoice, "discount") == [D("0.00")] or amounts(invoice, "discount") == [D("-0.00")]
    invoice = invoice_for(1000, catalog)  # 12.00; 12.5% = 1.50
    assert amounts(invoice, "discount") == [D("-1.50")]


def test_no_discount_line_when_usage_based_charges_are_not_positive() -> None:
    invoice = invoice_for(10_000, make_catalog(customer={"discount_percent": "10"}))
    assert amounts(invoice, "discount") == []


# --- outcomes and seats ----------------------------------------------------------------------------------


def test_outcomes_by_attribution_with_reversals_credited() -> None:
    usage = PeriodUsage(
        credits=D(0),
        outcomes=(
            OutcomeCount(outcome_type="resolved_ticket", attribution="ai_only", count=100, reversals=4),
            OutcomeCount(outcome_type="resolved_ticket", attribution="human_assisted", count=30),
        ),
    )
    invoice = invoice_for(0, usage=usage)
    outcome_lines = [(line.quantity, line.unit_price, line.amount) for line in invoice.lines if line.kind == "outcomes"]
    assert outcome_lines == [
        (D(100), D("0.90"), D("90.00")),
        (D(-4), D("0.90"), D("-3.60")),
        (D(30), D("0.00"), D("0.00")),
    ]
    assert invoice.total == D("500.00") + D("86.40")


def test_outcomes_are_priced_by_the_version_that_rated_them() -> None:
    usage = PeriodUsage(
        outcomes=(
            OutcomeCount(
                outcome_type="resolved_ticket", attribution="ai_only", plan_version="growth-2025-01", count=10
            ),
            OutcomeCount(
                outcome_type="resolved_ticket", attribution="ai_only", plan_version="growth-2025-03-15", count=10
            ),
        )
    )
    invoice = invoice_for(0, period="2025-03", usage=usage)
    assert amounts(invoice, "outcomes") == [D("9.00"), D("15.00")]
    assert "rated under growth-2025-03-15" in invoice.lines[-1].description


def test_an_outcome_the_plan_does_not_price_is_an_error() -> None:
    usage = PeriodUsage(outcomes=(OutcomeCount(outcome_type="refund", attribution="ai_only", count=1),))
    with pytest.raises(InvoiceError, match="no outcome price for 'refund'"):
        invoice_for(0, usage=usage)


def test_seat_fee_times_the_periods_peak_seats() -> None:
    invoice = invoice_for(0, make_catalog(seat_fee="25"), usage=PeriodUsage(active_seats=D(12)))
    assert [(line.quantity, line.unit_price, line.amount) for line in invoice.lines if line.kind == "seats"] == [
        (D(12), D("25"), D("300.00"))
    ]
    assert invoice.total == D("800.00")


# --- versions -------------------------------------------------------------------------------------------


def test_a_version_effective_mid_month_does_not_change_that_months_charges() -> None:
    march = invoice_for(180_000, period="2025-03")
    assert (march.plan_version, march.total) == ("growth-2025-01", D("2000.00"))
    april = invoice_for(180_000, period="2025-04")
    assert (april.plan_version, april.total) == ("growth-2025-03-15", D("900.00") + D(170000) * D("0.05"))


def test_events_either_side_of_a_price_change_are_rated_then_invoiced_on_the_period_version(
    make_usage: Callable[..., UsageEvent],
) -> None:
    data = copy.deepcopy(HYBRID)
    data["plans"]["growth"]["versions"][1]["price_book"] = {
        "models": {
            "large-model": {
                "provider": "example",
                "credits_per_1k": {"input": "0.5", "output": "2.0"},
                "cost_per_1m": {"input": "2.50", "output": "10.00"},
            }
        }
    }
    data["plans"]["growth"]["versions"][0]["price_book"] = {
        "models": {
            "large-model": data["plans"]["growth"]["versions"][1]["price_book"]["models"]["large-model"]
            | {"credits_per_1k": {"input": "0.25", "output": "1.0"}}
        }
    }
    # next_period (the default): the whole of March, events included, is on the version at its start.
    catalog = parse_catalog(data)
    before = catalog.rate(make_usage(event_id="e1", occurred_at=datetime(2025, 3, 10, tzinfo=timezone.utc)))
    after = catalog.rate(make_usage(event_id="e2", occurred_at=datetime(2025, 3, 20, tzinfo=timezone.utc)))
    assert (before.credits, after.credits) == (D(6), D(6))
    invoice = compute_invoice("acme", "2025-03", PeriodUsage.from_rated([before, after]), catalog, as_of=AFTER)
    assert invoice.plan_versions == ("growth-2025-01",)
    assert invoice.usage.credits_used == D(12)
    assert invoice.total == D("500.00")
    assert invoice.usage.cost_to_serve == D("0.12")

    # immediate: the new rate card and the new period charges from the 15th, fixed fees by the day.
    data["customers"]["acme"]["change_rule"] = "immediate"
    catalog = parse_catalog(data)
    before = catalog.rate(make_usage(event_id="e1", occurred_at=datetime(2025, 3, 10, tzinfo=timezone.utc)))
    after = catalog.rate(make_usage(event_id="e2", occurred_at=datetime(2025, 3, 20, tzinfo=timezone.utc)))
    assert (before.credits, after.credits) == (D(6), D(12))
    invoice = compute_invoice("acme", "2025-03", PeriodUsage.from_rated([before, after]), catalog, as_of=AFTER)
    assert invoice.plan_versions == ("growth-2025-01", "growth-2025-03-15")
    # 500 × 14/31 = 225.81 and 900 × 17/31 = 493.55; 12 credits are within 10,000 × 17/31.
    assert amounts(invoice, "base_fee") == [D("225.81"), D("493.55")]
    assert invoice.total == D("719.36")


# --- status, errors, output ------------------------------------------------------------------------------


def test_status_is_preview_until_the_period_ends() -> None:
    assert invoice_for(0, as_of=datetime(2025, 2, 27, tzinfo=timezone.utc)).status == "preview"
    assert invoice_for(0, as_of=datetime(2025, 3, 1, tzinfo=timezone.utc)).status == "final"


def test_usage_for_another_customer_or_period_is_refused() -> None:
    with pytest.raises(InvoiceError, match="customer 'globex'"):
        invoice_for(0, usage=PeriodUsage(customer_id="globex", period="2025-02"))
    with pytest.raises(InvoiceError, match="period 2025-01"):
        invoice_for(0, usage=PeriodUsage(customer_id="acme", period="2025-01"))


def test_unknown_customer() -> None:
    with pytest.raises(UnknownCustomerError):
        compute_invoice("nobody", "2025-02", PeriodUsage(), make_catalog(), as_of=AFTER)


def test_invoice_json_has_decimals_as_strings_and_round_trips() -> None:
    catalog = make_catalog(customer={"grants": [{"kind": "prepaid", "credits": "20000", "granted_on": "2025-01-01"}], "discount_percent": "10"})
    invoice = invoice_for(180_000, catalog)
    data = json.loads(invoice.model_dump_json())
    assert data["total"] == "1642.31"  # 500 + (1,500 − 230.77) − 126.92
    assert data["lines"][0]["amount"] == "500.00"
    assert all(isinstance(line["amount"], str) for line in data["lines"])
    assert Invoice.model_validate_json(invoice.model_dump_json()) == invoice


def test_margin_is_total_minus_cost_to_serve() -> None:
    invoice = invoice_for(0, usage=PeriodUsage(credits=D(180000), cost_to_serve=D("812.344")))
    assert invoice.usage.cost_to_serve == D("812.34")
    assert invoice.usage.margin == D("1187.66")


def test_render_invoice_text() -> None:
    catalog = make_catalog(customer={"grants": [{"id": "pp", "kind": "prepaid", "credits": "20000", "granted_on": "2025-01-01"}]})
    text = render_invoice_text(invoice_for(180_000, catalog))
    assert "INVOICE\n" in text and "Customer: acme" in text and "growth-2025-01" in text
    assert "Overage credits 0–100,000" in text and "1,200.00" in text
    assert "Prepaid credits (pp): 20,000 at the average overage price" in text
    assert text.splitlines()[-1] != ""  # no trailing blank line
    total_line = next(line for line in text.splitlines() if line.startswith("Total (USD)"))
    assert total_line.endswith("1,769.23")
    preview = render_invoice_text(invoice_for(0, as_of=datetime(2025, 2, 1, tzinfo=timezone.utc)))
    assert preview.startswith("INVOICE PREVIEW")


def test_lines_are_rounded_half_up_and_the_total_is_their_sum() -> None:
    # Each of three outcome lines is 0.005 exactly: each rounds up to 0.01, so the total is 0.03,
    # not round(0.015) = 0.02.
    data = copy.deepcopy(HYBRID)
    version = data["plans"]["growth"]["versions"][0]
    version.update(base_fee="0", outcome_prices={t: {"ai_only": "0.005"} for t in ("a", "b", "c")})
    usage = PeriodUsage(outcomes=tuple(OutcomeCount(outcome_type=t, attribution="ai_only", count=1) for t in "abc"))
    invoice = invoice_for(0, parse_catalog(data), usage=usage)
    assert amounts(invoice, "outcomes") == [D("0.01")] * 3
    assert invoice.total == D("0.03")


def test_zero_decimal_currency_rounds_to_whole_units() -> None:
    data = copy.deepcopy(HYBRID)
    data["currency"] = "JPY"
    for version in data["plans"]["growth"]["versions"]:
        version["price_book"] = {"currency": "JPY"}
    data["plans"]["growth"]["versions"][0].update(base_fee="5000", overage={"model": "per_unit", "unit_price": "1.5"})
    invoice = invoice_for(50_003, parse_catalog(data))  # 3 × 1.5 = 4.5 → 5
    assert amounts(invoice, "overage") == [D(5)]
    assert invoice.total == D(5005)


# --- PeriodUsage.from_rated ---------------------------------------------------------------------------------

T = datetime(2025, 2, 10, tzinfo=timezone.utc)


def rated(event_id: str, credits: str | Decimal = "0", **fields: Any) -> RatedUsage:
    base: dict[str, Any] = {
        "event_id": event_id,
        "kind": "usage",
        "customer_id": "acme",
        "occurred_at": T,
        "period": "2025-02",
        "meter": "tokens",
        "model": "large-model",
        "credits": D(credits),
        "cost_to_serve": D("0.01"),
        "price_book_version": "growth-2025-01",
        "rule": "tokens:large-model",
    }
    base.update(fields)
    return RatedUsage(**base)


def test_from_rated_counts_outcomes_and_ignores_their_credits(
    book: Any, make_outcome: Callable[..., OutcomeEvent]
) -> None:
    from meterstream.pricing.rating import rate_event

    outcome = rate_event(make_outcome(event_id="o1", outcome_type="resolved_ticket", occurred_at=T), book)
    reversal = rate_event(
        make_outcome(event_id="o2", outcome_type="resolved_ticket", occurred_at=T, reversal_of="o1"), book
    )
    assert outcome.credits == D(90)  # the price book's outcome credits...
    usage = PeriodUsage.from_rated([rated("u1", "100"), outcome, reversal])
    assert usage.credits == D(100)  # ...are not usage credits
    assert usage.outcomes == (
        OutcomeCount(
            outcome_type="resolved_ticket", attribution="ai_only", plan_version="test-book-1", count=1, reversals=1
        ),
    )
    assert (usage.customer_id, usage.period) == ("acme", "2025-02")


def test_from_rated_takes_the_peak_seats_and_subtotals_by_meter() -> None:
    rows = [
        rated("s1", meter="seats", model="", quantity=D(4), rule="meter:seats"),
        rated("s2", meter="seats", model="", quantity=D(9), rule="meter:seats"),
        rated("s3", meter="seats", model="", quantity=D(7), rule="meter:seats"),
        rated("t1", "2.5"),
        rated("t2", "3.5"),
    ]
    usage = PeriodUsage.from_rated(rows)
    assert usage.active_seats == D(9)
    assert usage.credits == D(6)
    assert usage.cost_to_serve == D("0.05")
    tokens = next(m for m in usage.by_meter if m.meter == "tokens")
    assert (tokens.model, tokens.events, tokens.credits) == ("large-model", 2, D(6))


def test_from_rated_counts_a_repeated_event_once() -> None:
    assert PeriodUsage.from_rated([rated("u1", "5"), rated("u1", "5")]).credits == D(5)


def test_from_rated_refuses_mixed_customers_or_periods() -> None:
    with pytest.raises(ValueError, match="one customer and one period"):
        PeriodUsage.from_rated([rated("a", customer_id="acme"), rated("b", customer_id="globex")])
    with pytest.raises(ValueError, match="one customer and one period"):
        PeriodUsage.from_rated([rated("a"), rated("b", period="2025-03")])


def test_from_rated_of_nothing_is_empty_usage() -> None:
    usage = PeriodUsage.from_rated([])
    assert usage == PeriodUsage()
    assert invoice_for(0, usage=usage).total == D("500.00")


# --- properties ---------------------------------------------------------------------------------------------

credit_amounts = st.decimals(min_value=0, max_value=400_000, places=6, allow_nan=False, allow_infinity=False)


@st.composite
def customers(draw: st.DrawFn) -> dict[str, Any]:
    grants = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "kind": st.sampled_from(["free", "prepaid"]),
                    "credits": st.integers(min_value=1, max_value=200_000).map(str),
                    "granted_on": st.sampled_from(["2025-01-01", "2025-02-05"]),
                    "expires": st.sampled_from([None, "2025-02-10", "2025-02-28", "2025-12-31"]),
                }
            ),
            max_size=3,
        )
    )
    discount = draw(st.sampled_from(["0", "5", "10", "12.5", "33.3333"]))
    return {"grants": grants, "discount_percent": discount}


@st.composite
def versions(draw: st.DrawFn) -> dict[str, Any]:
    overage = draw(
        st.sampled_from(
            [
                GRADUATED,
                {"model": "volume", "tiers": GRADUATED["tiers"]},
                {"model": "per_unit", "unit_price": "0.0137"},
                {"model": "package", "package_size": "1000", "package_price": "11.115"},
            ]
        )
    )
    return {
        "overage": overage,
        "base_fee": draw(st.sampled_from(["0", "500", "99.995"])),
        "included_credits": draw(st.sampled_from(["0", "50000", "1234.5"])),
        "minimum_commitment": draw(st.sampled_from(["0", "750", "3000.005"])),
        "seat_fee": draw(st.sampled_from(["0", "12.345"])),
    }


@given(
    customers(),
    versions(),
    credit_amounts,
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=50),
    st.integers(min_value=0, max_value=40),
)
def test_total_is_the_sum_of_rounded_lines(
    customer: dict[str, Any], version: dict[str, Any], credits: Decimal, outcomes: int, reversals: int, seats: int
) -> None:
    usage = PeriodUsage(
        credits=credits,
        active_seats=D(seats),
        outcomes=(
            OutcomeCount(outcome_type="resolved_ticket", attribution="ai_only", count=outcomes, reversals=reversals),
        ),
    )
    invoice = invoice_for(0, make_catalog(customer=customer, **version), usage=usage)
    assert invoice.total == lines_sum(invoice)
    assert invoice.subtotal == sum(
        (line.amount for line in invoice.lines if line.kind not in ("discount", "commitment_true_up")), D(0)
    )
    for line in invoice.lines:
        assert line.amount == line.amount.quantize(D("0.01"))
    usage_based = sum((line.amount for line in invoice.lines if line.kind in USAGE_BASED_KINDS), D(0))
    discount = sum((line.amount for line in invoice.lines if line.kind == "discount"), D(0))
    if D(version["minimum_commitment"]):  # without a commitment, reversals may take usage below zero
        assert usage_based + discount + sum(amounts(invoice, "commitment_true_up"), D(0)) >= D(
            version["minimum_commitment"]
        ).quantize(D("0.01"))
    assert invoice.usage.grant_credits_applied <= invoice.usage.overage_credits


@given(customers(), versions(), st.lists(credit_amounts, min_size=1, max_size=6), st.data())
def test_splitting_usage_across_events_never_changes_the_invoice(
    customer: dict[str, Any], version: dict[str, Any], row_credits: list[Decimal], data: st.DataObject
) -> None:
    rows = [rated(f"e{i}", credits) for i, credits in enumerate(row_credits)]
    # Split one row's credits into several rows that add up to it exactly.
    index = data.draw(st.integers(min_value=0, max_value=len(rows) - 1))
    whole = row_credits[index]
    cuts = sorted(data.draw(st.lists(st.decimals(min_value=0, max_value=whole, places=6), max_size=4)))
    edges = [D(0), *cuts, whole]
    pieces = [rated(f"e{index}-part{k}", hi - lo, cost_to_serve=D(0)) for k, (lo, hi) in enumerate(pairwise(edges))]
    pieces[0] = pieces[0].model_copy(update={"cost_to_serve": D("0.01")})
    split_rows = rows[:index] + pieces + rows[index + 1 :]

    catalog = make_catalog(customer=customer, **version)
    one = compute_invoice("acme", "2025-02", PeriodUsage.from_rated(rows), catalog, as_of=AFTER)
    many = compute_invoice("acme", "2025-02", PeriodUsage.from_rated(split_rows), catalog, as_of=AFTER)
    assert many.total == one.total
    assert many.lines == one.lines
    assert many.usage == one.usage


@given(customers(), versions(), credit_amounts)
def test_grants_are_valued_at_the_average_overage_price(
    customer: dict[str, Any], version: dict[str, Any], credits: Decimal
) -> None:
    # Exact to the cent: the credits applied are one rounding of overage total × drawn ÷ overage.
    invoice = invoice_for(credits, make_catalog(customer=customer, **version))
    overage_total = sum(amounts(invoice, "overage"), D(0))
    drawn, overage = invoice.usage.grant_credits_applied, invoice.usage.overage_credits
    expected = (overage_total * drawn / overage).quantize(D("0.01"), rounding="ROUND_HALF_UP") if overage else D(0)
    assert -sum(amounts(invoice, "credits_applied"), D(0)) == expected
    assert 0 <= expected <= overage_total
