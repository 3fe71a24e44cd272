"""docs/billing.md's worked examples, to the cent, from the catalog written on that page."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import yaml

from meterstream.billing import invoices_from_rated, rate_events
from meterstream.pricing.invoice import PeriodUsage, compute_invoice
from meterstream.pricing.plans import Catalog, parse_catalog
from meterstream.schemas.events import UsageEvent

D = Decimal
DOC = (Path(__file__).resolve().parents[2] / "docs" / "billing.md").read_text()
AFTER = datetime(2030, 1, 1, tzinfo=timezone.utc)


def doc_catalog() -> Catalog:
    block = re.search(r"```yaml\n(.*?)```", DOC, re.S)
    assert block is not None
    return parse_catalog(yaml.load(block.group(1), Loader=yaml.BaseLoader), source="docs/billing.md")


def doc_total(after_heading: str) -> Decimal:
    """The bold total of the first table after ``after_heading`` in the page."""
    text = DOC[DOC.index(after_heading):]
    match = re.search(r"\| \*\*total\*\*[^|]*\| \| \*\*(-?[\d,.]+)\*\* \|", text)
    assert match is not None
    return D(match.group(1).replace(",", ""))


def _events(customer: str) -> list[UsageEvent]:
    def at(day: int) -> datetime:
        return datetime(2026, 11, day, 12, tzinfo=timezone.utc)

    def event(i: int, day: int, meter: str, quantity: int) -> UsageEvent:
        return UsageEvent(event_id=f"{customer}-{i}", customer_id=customer, occurred_at=at(day), meter=meter,
                          quantity=quantity)  # fmt: skip

    return [event(1, 3, "requests", 12_000), event(2, 14, "requests", 8_000), event(3, 5, "seats", 5),
            event(4, 15, "requests", 30_000), event(5, 30, "requests", 10_000), event(6, 20, "seats", 8)]  # fmt: skip


def test_a_change_on_the_15th_of_a_30_day_month_immediate() -> None:
    catalog = doc_catalog()
    rated = [catalog.rate(e) for e in _events("acme")]
    assert {r.price_book_version for r in rated if r.occurred_at.day < 15} == {"basic-1"}
    assert {r.price_book_version for r in rated if r.occurred_at.day >= 15} == {"pro-1"}
    [invoice] = invoices_from_rated(catalog, rated, as_of=AFTER)
    assert [(line.kind, line.amount) for line in invoice.lines] == [
        ("base_fee", D("140.00")), ("included_usage", D("0.00")), ("overage", D("306.67")), ("seats", D("23.33")),
        ("base_fee", D("320.00")), ("included_usage", D("0.00")), ("overage", D("240.00")), ("seats", D("85.33")),
    ]  # fmt: skip
    assert invoice.plan_versions == ("basic-1", "pro-1")
    assert invoice.total == D("1115.33") == doc_total("**acme, `immediate`**")


def test_the_same_change_from_the_next_period() -> None:
    catalog = doc_catalog()
    rated = [catalog.rate(e) for e in _events("globex")]
    assert {r.price_book_version for r in rated} == {"basic-1"}
    [invoice] = invoices_from_rated(catalog, rated, as_of=AFTER)
    assert invoice.total == D("1380.00") == doc_total("**globex, `next_period`**")
    december = compute_invoice("globex", "2026-12", PeriodUsage(), catalog, as_of=AFTER)
    assert (december.plan_id, december.total) == ("pro", D("600.00"))


def test_a_subscription_starting_mid_period_is_prorated() -> None:
    catalog = doc_catalog()
    invoice = compute_invoice("initech", "2026-11", PeriodUsage(active_seats=D(3)), catalog, as_of=AFTER)
    assert [line.amount for line in invoice.lines if line.kind in ("base_fee", "seats")] == [D("100.00"), D("10.00")]
    assert invoice.total == D("110.00") == doc_total("**initech** subscribes")
    assert compute_invoice("initech", "2026-10", PeriodUsage(), catalog, as_of=AFTER).total == D("0.00")


def test_the_grant_example() -> None:
    hybrid = parse_catalog(
        {"plans": {"growth": {"versions": [{
            "version": "g", "effective_from": "2025-01-01", "base_fee": "500", "included_credits": "50000",
            "overage": {"model": "graduated", "tiers": [{"up_to": "100000", "unit_price": "0.012"},
                                                        {"up_to": None, "unit_price": "0.010"}]}}]}},
         "customers": {"acme": {"plan": "growth", "grants": [{"kind": "prepaid", "credits": "20000", "granted_on": "2025-01-01"}]}}}
    )  # fmt: skip
    invoice = compute_invoice("acme", "2025-02", PeriodUsage(credits=D(180000)), hybrid, as_of=AFTER)
    assert [line.amount for line in invoice.lines if line.kind == "credits_applied"] == [D("-230.77")]
    assert invoice.total == D("1769.23")
    assert "**230.77**" in DOC and "**1,769.23**" in DOC


def test_several_charges_per_plan_version() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    catalog = parse_catalog(yaml.load(blocks[1], Loader=yaml.BaseLoader), source="docs/billing.md")
    events = [UsageEvent(event_id=f"r{i}", customer_id="hooli", occurred_at=datetime(2026, 11, 2, tzinfo=timezone.utc),
                         meter="requests", quantity=800) for i in range(10)]  # fmt: skip
    events += [UsageEvent(event_id=f"d{i}", customer_id="hooli", occurred_at=datetime(2026, 11, 3, tzinfo=timezone.utc),
                          meter="documents", quantity=1) for i in range(950)]  # fmt: skip
    events += [UsageEvent(event_id=f"a{i}", customer_id="hooli", occurred_at=datetime(2026, 11, 4, tzinfo=timezone.utc),
                          meter="actions", quantity=1) for i in range(1500)]  # fmt: skip
    [invoice] = invoices_from_rated(catalog, [catalog.rate(e) for e in events], as_of=AFTER)
    assert [(line.kind, line.amount) for line in invoice.lines] == [
        ("base_fee", D("200.00")), ("included_usage", D("0.00")), ("overage", D("30.00")),
        ("usage_charge", D("40.00")), ("usage_charge", D("20.00")), ("usage_charge", D("10.00")),
        ("usage_charge", D("5.00")), ("usage_charge", D("25.00")),
    ]  # fmt: skip
    assert invoice.usage.credits_used == D(11400) and invoice.usage.overage_credits == D(3000)
    assert invoice.total == D("330.00") == doc_total("**hooli** in November")


def test_volume_flat_fee_is_that_of_the_tier_reached() -> None:
    from meterstream.pricing.charges import volume

    tiers = [{"up_to": "1000", "unit_price": "0.02", "flat_fee": "10"}, {"up_to": None, "unit_price": "0.01", "flat_fee": "25"}]
    assert volume(D(1500), tiers).amount == D(1500) * D("0.01") + D(25)
    assert volume(D(0), tiers).amount == D(0)


def test_base_fee_in_advance_with_a_later_cancellation() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    data = yaml.load(blocks[2], Loader=yaml.BaseLoader)
    catalog = parse_catalog(data, source="docs/billing.md")
    november = compute_invoice("umbrella", "2026-11", PeriodUsage(), catalog, as_of=AFTER)
    assert [(line.kind, line.amount) for line in november.lines] == [
        ("base_fee", D("100.00")), ("base_fee_advance", D("300.00")),
    ]  # fmt: skip
    assert november.total == D("400.00") == doc_total("**umbrella, November 2026**")
    # Without a change December only bills January in advance.
    december = compute_invoice("umbrella", "2026-12", PeriodUsage(), catalog, as_of=AFTER, previous=november)
    assert [(line.kind, line.amount) for line in december.lines] == [("base_fee_advance", D("300.00"))]

    data["customers"]["umbrella"]["cancelled_from"] = "2026-12-11"
    cancelled = parse_catalog(data)
    december = compute_invoice("umbrella", "2026-12", PeriodUsage(), cancelled, as_of=AFTER, previous=november)
    assert [(line.kind, line.amount) for line in december.lines] == [("base_fee_adjustment", D("-203.23"))]
    assert december.total == D("-203.23") == doc_total("**umbrella, December 2026**")
    assert december.credit_note is not None and "Base fee adjustment" in december.credit_note.reason


def test_anniversary_periods() -> None:
    from meterstream.pricing.plans import anniversary_bounds

    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    catalog = parse_catalog(yaml.load(blocks[3], Loader=yaml.BaseLoader), source="docs/billing.md")

    def requests(event_id: str, day: datetime, quantity: int) -> UsageEvent:
        return UsageEvent(event_id=event_id, customer_id="wayne", occurred_at=day, meter="requests", quantity=quantity)

    rated = [catalog.rate(requests("a", datetime(2025, 11, 20, tzinfo=timezone.utc), 7000)),
             catalog.rate(requests("b", datetime(2025, 12, 10, tzinfo=timezone.utc), 5000)),
             catalog.rate(requests("c", datetime(2025, 11, 10, tzinfo=timezone.utc), 1))]  # fmt: skip
    assert [r.period for r in rated] == ["2025-11", "2025-11", "2025-10"]
    october, november = invoices_from_rated(catalog, rated, as_of=AFTER)
    assert (november.period_start, november.period_end) == (
        datetime(2025, 11, 15, tzinfo=timezone.utc), datetime(2025, 12, 15, tzinfo=timezone.utc)
    )
    assert november.total == D("340.00") == doc_total("**wayne, period 2025-11**")
    assert october.total == D("300.00")  # 15 October to 14 November, a whole period from the anchor
    # Anchored on the 31st: February's period starts on its last day.
    assert anniversary_bounds(31, "2027-02") == (
        datetime(2027, 2, 28, tzinfo=timezone.utc), datetime(2027, 3, 31, tzinfo=timezone.utc)
    )
    assert anniversary_bounds(31, "2027-01")[1] == datetime(2027, 2, 28, tzinfo=timezone.utc)


def test_the_worker_closes_an_anniversary_period_at_its_own_end() -> None:
    from meterstream.budgets import BudgetBook
    from meterstream.stream_processors.processing import BatchProcessor, InboundMessage, MonthToDate

    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    catalog = parse_catalog(yaml.load(blocks[3], Loader=yaml.BaseLoader), source="docs/billing.md")
    event = UsageEvent(event_id="x", customer_id="wayne", occurred_at=datetime(2025, 12, 10, tzinfo=timezone.utc),
                       meter="requests", quantity=5)  # fmt: skip
    message = InboundMessage("usage", event.model_dump_json().encode(), "usage.events", 0, 0)
    processor = BatchProcessor(catalog, BudgetBook())
    # 16 December: the calendar month 2025-11 closed on 4 December, wayne's period 2025-11 is still open.
    (row,) = processor.process([message], lambda key: MonthToDate(), now=datetime(2025, 12, 16, tzinfo=timezone.utc)).rated
    assert (row.period, row.billed_in) == ("2025-11", "")
    processor = BatchProcessor(catalog, BudgetBook())
    (row,) = processor.process([message], lambda key: MonthToDate(), now=datetime(2025, 12, 19, tzinfo=timezone.utc)).rated
    assert (row.period, row.billed_in) == ("2025-11", "2025-12")


def test_the_volume_exception_table() -> None:
    section = DOC[DOC.index("## Adding usage never lowers a total") :]
    section = section.split("\n## ")[0]
    plain, floored = section.split("volume_floor: true`:")
    rows = re.findall(r"^\| ([\d,]+) \| \w+ \| [^|]+ \| ([\d,.]+) \|$", plain, re.M)
    assert len(rows) == 3
    tiers = [{"up_to": "1000", "unit_price": "0.10"}, {"up_to": "5000", "unit_price": "0.08"},
             {"up_to": None, "unit_price": "0.05"}]  # fmt: skip
    catalog = parse_catalog({"plans": {"v": {"versions": [{"version": "vol", "effective_from": "2025-01-01",
                                                          "overage": {"model": "volume", "tiers": tiers}}]}},
                             "default_plan": "v"})  # fmt: skip
    for credits, total in rows:
        invoice = compute_invoice("x", "2025-02", PeriodUsage(credits=D(credits.replace(",", ""))), catalog, as_of=AFTER)
        assert invoice.total == D(total.replace(",", ""))
    floor_rows = re.findall(r"^\| ([\d,]+) \| \w+ \| [^|]+ \| ([\d,.]+) \|$", floored, re.M)
    assert len(floor_rows) == 3
    with_floor = parse_catalog({"plans": {"v": {"versions": [{"version": "vol", "effective_from": "2025-01-01",
                                "overage": {"model": "volume", "tiers": tiers, "volume_floor": True}}]}},
                                "default_plan": "v"})  # fmt: skip
    for credits, total in floor_rows:
        usage = PeriodUsage(credits=D(credits.replace(",", "")))
        assert compute_invoice("x", "2025-02", usage, with_floor, as_of=AFTER).total == D(total.replace(",", ""))


def test_the_sum_of_quantities_example() -> None:
    section = DOC[DOC.index("## Charges on the sum of quantities") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    catalog = parse_catalog(yaml.load(block.group(1), Loader=yaml.BaseLoader), source="docs/billing.md")

    def event(i: str, meter: str, quantity: int) -> UsageEvent:
        return UsageEvent(event_id=i, customer_id="pied-piper", occurred_at=datetime(2026, 11, 9, tzinfo=timezone.utc),
                          meter=meter, quantity=quantity)  # fmt: skip

    events = [event("d1", "documents", 400), event("d2", "documents", 900), event("d3", "documents", 1250),
              event("d3", "documents", 1250), event("r1", "requests", 2000)]  # fmt: skip
    rated, errors = rate_events(catalog, events)
    assert errors == []
    [invoice] = invoices_from_rated(catalog, rated, as_of=AFTER)
    assert [(line.kind, line.amount) for line in invoice.lines] == [
        ("base_fee", D("100.00")), ("included_usage", D("0.00")), ("usage_charge", D("15.50")),
    ]  # fmt: skip
    assert invoice.total == D("115.50") == doc_total("**pied-piper** in November")
