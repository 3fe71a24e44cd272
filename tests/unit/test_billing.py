"""The billing layer's pure parts: periods, grant carry-over, the offline reader, revenue allocation."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from meterstream.billing import (
    allocate_revenue,
    group_margin,
    invoices_from_rated,
    period_usage_from_aggregates,
    periods_between,
    rate_events,
    read_events,
)
from meterstream.pricing.invoice import PeriodUsage
from meterstream.pricing.plans import load_catalog, parse_catalog
from meterstream.schemas.events import UsageEvent

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plans.yaml"


def test_periods_roll_over_the_year():
    assert periods_between("2026-11", "2027-02") == ["2026-11", "2026-12", "2027-01", "2027-02"]
    assert periods_between("2026-11", "2026-11") == ["2026-11"]


def _catalog_with_prepaid(credits: str = "1000", granted_on: str = "2026-10-01"):
    return parse_catalog(
        {
            "currency": "USD",
            "default_plan": "p",
            "plans": {"p": {"versions": [{
                "version": "p-1", "effective_from": "2026-01-01", "price_book": "default",
                "base_fee": "0", "included_credits": "0",
                "overage": {"model": "per_unit", "unit_price": "0.01"},
            }]}},  # fmt: skip
            "customers": {"acme": {"plan": "p", "grants": [{"kind": "prepaid", "credits": credits, "granted_on": granted_on}]}},
        }
    )


def _tokens(event_id: str, when: datetime, input_tokens: int) -> UsageEvent:
    # gpt-4o input: 0.5 credits per 1K tokens
    return UsageEvent(event_id=event_id, customer_id="acme", occurred_at=when, model="gpt-4o", input_tokens=input_tokens)


def test_prepaid_credits_are_drawn_down_across_periods_not_reused():
    catalog = _catalog_with_prepaid("1000")
    events = [
        _tokens("oct", datetime(2026, 10, 5, tzinfo=timezone.utc), 1_600_000),  # 800 credits
        _tokens("nov", datetime(2026, 11, 5, tzinfo=timezone.utc), 1_600_000),  # 800 credits
    ]
    rated, errors = rate_events(catalog, events)
    assert errors == []
    october, november = invoices_from_rated(catalog, rated)
    assert october.total == Decimal("0.00")  # all 800 paid by the grant
    # 200 credits left for November: 600 billed at 0.01
    assert november.total == Decimal("6.00")
    [only_november] = invoices_from_rated(catalog, rated, period="2026-11")
    assert only_november.total == november.total


def test_a_grant_added_later_is_never_spent_on_earlier_periods():
    # A top-up bought on 20 November: October is billed in full, November draws it.
    catalog = _catalog_with_prepaid("1000", granted_on="2026-11-20")
    events = [
        _tokens("oct", datetime(2026, 10, 5, tzinfo=timezone.utc), 1_600_000),  # 800 credits
        _tokens("nov", datetime(2026, 11, 5, tzinfo=timezone.utc), 1_600_000),  # 800 credits
    ]
    rated, errors = rate_events(catalog, events)
    assert errors == []
    october, november = invoices_from_rated(catalog, rated)
    assert october.total == Decimal("8.00") and [g.drawn_credits for g in october.grants] == [Decimal(0)]
    assert november.total == Decimal("0.00") and [g.drawn_credits for g in november.grants] == [Decimal(800)]
    assert november.grants[0].opening_credits == Decimal(1000)


def test_offline_rating_counts_a_resent_event_once():
    catalog = load_catalog()
    event = _tokens("same", datetime(2026, 11, 5, tzinfo=timezone.utc), 1000)
    rated, _ = rate_events(catalog, [event, event])
    assert len(rated) == 1


def test_unpriceable_events_are_reported_not_dropped_silently():
    catalog = load_catalog()
    unknown = UsageEvent(event_id="u1", customer_id="acme", occurred_at=datetime(2026, 11, 5, tzinfo=timezone.utc),
                         model="no-such-model", input_tokens=5)  # fmt: skip
    rated, errors = rate_events(catalog, [unknown])
    assert rated == [] and len(errors) == 1 and "no-such-model" in errors[0]


def test_read_events_reports_bad_lines_by_number(tmp_path):
    path = tmp_path / "events.jsonl"
    good = _tokens("g1", datetime(2026, 11, 5, tzinfo=timezone.utc), 10).model_dump_json()
    outcome = (
        '{"type": "outcome", "event_id": "o1", "customer_id": "acme", "occurred_at": "2026-11-05T00:00:00Z",'
        ' "outcome_type": "resolved_ticket", "attribution": "ai_only"}'
    )
    path.write_text(f"{good}\n\n{{\"event_id\": 1}}\n{outcome}\n")
    events, bad = read_events(path)
    assert [e.event_id for e in events] == ["g1", "o1"]
    assert [b.line for b in bad] == [3]
    assert "event_id" in bad[0].reason


def test_store_aggregates_build_the_same_usage_as_rated_rows():
    catalog = load_catalog(EXAMPLES)
    when = datetime(2026, 11, 5, tzinfo=timezone.utc)
    rows = [catalog.rate(_tokens(f"e{i}", when, 1000 * (i + 1))) for i in range(3)]
    aggregates = [
        {
            "kind": "usage", "meter": "tokens", "model": "gpt-4o", "outcome_type": "", "attribution": "",
            "plan_version": rows[0].price_book_version, "is_reversal": 0, "events": 3,
            "credits": sum((r.credits for r in rows), Decimal(0)),
            "cost_to_serve": sum((r.cost_to_serve for r in rows), Decimal(0)), "max_quantity": Decimal(0),
            "sum_quantity": sum((r.quantity for r in rows), Decimal(0)),
        }
    ]  # fmt: skip
    assert period_usage_from_aggregates("acme", "2026-11", aggregates) == PeriodUsage.from_rated(rows)


def test_revenue_is_allocated_by_credits_and_adds_up():
    class FakeInvoice:
        total = Decimal("100.00")
        lines = ()

    rows = [
        {"customer_id": "a", "workflow_id": "w1", "model": "m1", "events": 1, "credits": Decimal(1), "cost_to_serve": Decimal("1")},
        {"customer_id": "a", "workflow_id": "w2", "model": "m2", "events": 1, "credits": Decimal(3), "cost_to_serve": Decimal("2")},
    ]  # fmt: skip
    allocated = allocate_revenue(rows, {"a": FakeInvoice()})
    assert [r.revenue for r in allocated] == [Decimal(25), Decimal(75)]
    [by_customer] = group_margin(allocated, "customer")
    assert (by_customer.revenue, by_customer.cost_to_serve, by_customer.margin) == (100, 3, 97)


@pytest.mark.parametrize("by", ["customer", "workflow", "model"])
def test_group_margin_keys(by):
    class FakeInvoice:
        total = Decimal("10")
        lines = ()

    rows = [{"customer_id": "a", "workflow_id": "", "model": "m", "events": 2, "credits": Decimal(1),
             "cost_to_serve": Decimal(1)}]  # fmt: skip
    [row] = group_margin(allocate_revenue(rows, {"a": FakeInvoice()}), by)
    key = {"customer": row.customer_id, "workflow": row.workflow_id, "model": row.model}[by]
    assert key == {"customer": "a", "workflow": "(none)", "model": "m"}[by]
    assert (row.events, row.revenue, row.cost_to_serve) == (2, Decimal(10), Decimal(1))
