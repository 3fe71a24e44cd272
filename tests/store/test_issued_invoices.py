"""Issued invoices as records (sql/008), against the real engine: closing a period stores its
invoices; `invoice` then returns exactly what was stored, whatever changed since (catalog, late
usage); corrections appear on the open period's invoice as flagged adjustments, priced with the catalog
the closed period was issued with (sql/009)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from meterstream.billing import invoice_from_store, invoices_to_issue
from meterstream.pricing.invoice import InvoiceError, catalog_fingerprint
from meterstream.pricing.plans import parse_catalog
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import RawEvent
from meterstream.storage.clickhouse import open_store
from meterstream.storage.issued import store_issued_invoice
from meterstream.storage.queries import saved_query

pytestmark = pytest.mark.store

GRACE = timedelta(days=3)
BOOK = {"meters": {"requests": {"credits_per_unit": "1"}}}
DATA = {
    "currency": "USD",
    "plans": {"p": {"versions": [{
        "version": "p-1", "effective_from": "2026-01-01", "price_book": BOOK, "base_fee": "100",
        "included_credits": "1000", "overage": {"model": "per_unit", "unit_price": "0.05"}}]}},
    "customers": {
        "acme": {"plan": "p", "grants": [{"id": "pp", "kind": "prepaid", "credits": "500", "granted_on": "2026-10-01"}]},
        "idle": {"plan": "p", "effective_from": "2026-10-16"},  # billed for October without any usage
    },
}  # fmt: skip


def _insert(store, catalog, event_id: str, at: datetime, quantity: int, billed_in: str = "") -> None:
    event = UsageEvent(event_id=event_id, customer_id="acme", occurred_at=at, meter="requests", quantity=quantity)
    rated = catalog.rate(event)
    if billed_in:
        rated = rated.model_copy(update={"billed_in": billed_in})
    raw = RawEvent(event_id, "acme", "usage", rated.occurred_at, rated.period, event.model_dump_json().encode(),
                   "usage.events", 0, abs(hash(event_id)) % 100_000)  # fmt: skip
    store.insert_batch([raw], [rated])


def test_a_closed_period_is_issued_once_and_never_changes(clickhouse) -> None:
    catalog = parse_catalog(DATA)
    store = open_store(clickhouse)

    def run(name: str, **params: str):
        return store.query(saved_query(name), params)

    try:
        _insert(store, catalog, "e1", datetime(2026, 10, 5, tzinfo=UTC), 2000)
        _insert(store, catalog, "e2", datetime(2026, 11, 5, tzinfo=UTC), 1200)

        with pytest.raises(InvoiceError, match="closes at 2026-11-04T00:00:00"):
            invoices_to_issue(run, catalog, "2026-10", now=datetime(2026, 11, 2, tzinfo=UTC), late_grace=GRACE)

        closed_at = datetime(2026, 11, 10, tzinfo=UTC)
        issued = invoices_to_issue(run, catalog, "2026-10", now=closed_at, late_grace=GRACE)
        # acme: 100 + (2,000 − 1,000) × 0.05 = 150.00, less 500 prepaid credits at 0.05 = 125.00.
        # idle: 100 × 16/31 = 51.61 (subscribed on the 16th).
        assert [(i.customer_id, i.total, i.invoice_number) for i in issued] == [
            ("acme", Decimal("125.00"), "INV-2026-10-acme"), ("idle", Decimal("51.61"), "INV-2026-10-idle"),
        ]  # fmt: skip
        with pytest.raises(ValueError, match="not issued with this catalog"):
            store_issued_invoice(store.client, issued[0], parse_catalog({**DATA, "customers": {}}))
        for invoice in issued:
            store_issued_invoice(store.client, invoice, catalog)
        (acme,) = [i for i in issued if i.customer_id == "acme"]
        assert (acme.status, acme.issued_at, acme.plan_versions) == ("issued", closed_at, ("p-1",))
        assert acme.catalog_fingerprint == catalog_fingerprint(catalog)
        assert invoices_to_issue(run, catalog, "2026-10", now=closed_at, late_grace=GRACE) == []  # once

        # The lines are stored too, and add up to the total.
        lines = store.query(
            "SELECT kind, amount FROM issued_invoice_lines WHERE customer_id = 'acme' ORDER BY line_no"
        ).rows
        assert [tuple(r) for r in lines] == [(line.kind, line.amount) for line in acme.lines]
        assert sum((r[1] for r in lines), Decimal(0)) == acme.total

        # Everything changes: the price doubles, the grant is removed, late October usage arrives.
        changed = copy.deepcopy(DATA)
        changed["plans"]["p"]["versions"][0]["overage"]["unit_price"] = "0.10"
        changed["customers"]["acme"]["grants"] = []
        new_catalog = parse_catalog(changed)
        _insert(store, new_catalog, "late", datetime(2026, 10, 30, tzinfo=UTC), 400, billed_in="2026-11")

        again = invoice_from_store(run, new_catalog, "acme", "2026-10", as_of=datetime(2027, 1, 1, tzinfo=UTC))
        assert again == acme  # exactly the record: lines, totals, versions, fingerprint, time
        # The correction is a flagged adjustment on the open period's invoice, priced as October was
        # issued (its catalog is kept with the record): 0.05 a credit and the 500-credit grant, not
        # today's 0.10 without it. October with the late 400 credits: 100 + 1,400 × 0.05 = 170.00,
        # less 500 prepaid credits at the average 0.05 = 145.00; issued 125.00: +20.00.
        assert store.query(saved_query("issued_invoice"), {"customer": "acme", "period": "2026-10"}).dicts()[0][
            "catalog_json"
        ] == catalog.model_dump_json()
        november = invoice_from_store(run, new_catalog, "acme", "2026-11", as_of=datetime(2026, 11, 20, tzinfo=UTC))
        (late,) = [line for line in november.lines if line.kind == "late_adjustment"]
        assert late.amount == Decimal("20.00")
        assert "2026-10 invoice 125.00 -> 145.00" in late.description
        # November's own usage is billed at today's price: 100 + (1,200 − 1,000) × 0.10 = 120.00.
        assert november.total == Decimal("120.00") + Decimal("20.00")
        assert november.status == "preview"
    finally:
        store.close()
