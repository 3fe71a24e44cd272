"""An anniversary customer's budget state at worker start-up, from the store: its billing period,
not the calendar month (the SDK guard, the customer page and the alert outbox read the same label).

Between the 1st and its anchor day an anniversary customer is still in the billing period that
began last month; a start-up that published its state for the calendar month said "nothing
spent" to every guard while it was blocked."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meterstream.budgets import BudgetBook
from meterstream.pricing.plans import parse_catalog
from meterstream.producers import Decision
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import RawEvent
from meterstream.storage.clickhouse import open_store
from meterstream.stream_processors.alerts import current_states, missing_alerts

pytestmark = pytest.mark.store

CATALOG = parse_catalog(
    {
        "currency": "USD",
        "default_plan": "basic",
        "plans": {"basic": {"versions": [{
            "version": "basic-1", "effective_from": "2025-01-01",
            "price_book": {"meters": {"requests": {"credits_per_unit": "1"}}},
            "overage": {"model": "per_unit", "unit_price": "0.01"},
        }]}},  # fmt: skip
        "customers": {"wayne": {"plan": "basic", "effective_from": "2025-08-15", "billing_anchor": "anniversary"}},
    }
)
BUDGETS = BudgetBook.model_validate(
    {"customers": {"wayne": {"monthly_credits": "100", "action": "block", "thresholds": [50, 100]},
                   "acme": {"monthly_credits": "100", "action": "block", "thresholds": [50, 100]}}}  # fmt: skip
)
NOW = datetime(2026, 12, 2, 12, tzinfo=UTC)  # wayne's period 2026-11 runs 15 Nov - 15 Dec


@pytest.fixture
def store(clickhouse):
    store = open_store(clickhouse)
    events = [  # wayne: 70 in November (before its anchor: period 2026-10), 110 since the 15th
        ("w1", "wayne", datetime(2026, 11, 10, tzinfo=UTC), 70),
        ("w2", "wayne", datetime(2026, 11, 20, tzinfo=UTC), 60),
        ("w3", "wayne", datetime(2026, 12, 1, tzinfo=UTC), 50),
        # acme, by calendar month: 30 in November, 40 in December
        ("a1", "acme", datetime(2026, 11, 20, tzinfo=UTC), 30),
        ("a2", "acme", datetime(2026, 12, 1, tzinfo=UTC), 40),
    ]
    for offset, (event_id, customer, at, quantity) in enumerate(events):
        event = UsageEvent(event_id=event_id, customer_id=customer, occurred_at=at, meter="requests", quantity=quantity)
        rated = CATALOG.rate(event)
        raw = RawEvent(event_id, customer, "usage", at, rated.period, event.wire_bytes(), "usage.events", 0, offset)
        store.insert_batch([raw], [rated])
    yield store
    store.close()


def test_start_up_states_are_for_each_customers_billing_period(store):
    states = {s.customer_id: s for s in current_states(store, BUDGETS, NOW, billing_period=CATALOG.billing_period)}
    wayne, acme = states["wayne"], states["acme"]
    assert (wayne.period, wayne.spent_credits, wayne.decision) == ("2026-11", Decimal(110), Decision.BLOCK)
    assert (acme.period, acme.spent_credits, acme.decision) == ("2026-12", Decimal(40), Decision.OK)
    # The calendar month (the old rule) said wayne had spent nothing: every guard let it through.
    calendar = {s.customer_id: s for s in current_states(store, BUDGETS, NOW)}
    assert (calendar["wayne"].period, calendar["wayne"].spent_credits) == ("2026-12", Decimal(0))


def test_the_alert_outbox_looks_at_every_open_billing_period(store):
    periods = sorted(CATALOG.open_billing_periods(NOW))
    assert periods == ["2026-10", "2026-11", "2026-12"]  # wayne's previous period is labelled October
    missing = {(a.customer_id, a.period, a.threshold_percent) for a in missing_alerts(store, BUDGETS, periods, NOW)}
    assert missing == {("wayne", "2026-10", 50), ("wayne", "2026-11", 50), ("wayne", "2026-11", 100)}
    # This and last calendar month (the default) miss wayne's previous period.
    calendar = {(a.customer_id, a.period) for a in missing_alerts(store, BUDGETS, ["2026-11", "2026-12"], NOW)}
    assert ("wayne", "2026-10") not in calendar


def test_the_customer_page_shows_an_anniversary_customers_billing_period(store, clickhouse):
    """The page's budget, breakdown and invoice preview are for wayne's period 2026-11 (15 Nov -
    15 Dec) on 2 December, not for the calendar month (which held nothing of it)."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from meterstream.config import Settings
    from meterstream.web.server import create_app
    from meterstream.web.store import CustomerQueries
    from meterstream.web.tokens import TokenBook, TokenGrant, token_hash

    tokens = TokenBook({token_hash("wayne-token"): TokenGrant("wayne")})
    settings = Settings(clickhouse=clickhouse)

    async def fetch(path: str) -> dict:
        app = create_app(settings, tokens, CustomerQueries(clickhouse, 30), BUDGETS, clock=lambda: NOW, catalog=CATALOG)
        async with TestClient(TestServer(app)) as client:
            response = await client.get(path, headers={"Authorization": "Bearer wayne-token"})
            assert response.status == 200, await response.text()
            return await response.json()

    budget = asyncio.run(fetch("/api/v1/customers/wayne/budget"))
    assert (budget["period"], budget["period_start"], budget["period_end"]) == (
        "2026-11", "2026-11-15T00:00:00Z", "2026-12-15T00:00:00Z")  # fmt: skip
    assert budget["month_to_date"]["budget_credits"] == "110"
    assert asyncio.run(fetch("/api/v1/me"))["period"] == "2026-11"
    invoice = asyncio.run(fetch("/api/v1/customers/wayne/invoice"))
    assert invoice["period"] == "2026-11"
