"""The customer-visible web API without processes: tokens, views, and the routes on a fake store."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from meterstream.budgets import Budget, BudgetBook
from meterstream.config import ClickHouseSettings, Settings
from meterstream.storage.clickhouse import StoreError
from meterstream.web.server import PathOnlyAccessLogger, create_app
from meterstream.web.store import CustomerQueries
from meterstream.web.tokens import (
    ReloadingTokenBook,
    TokenFileError,
    new_token,
    parse_token_book,
    token_hash,
)
from meterstream.web.views import burn_down_view, enforcement_state, usage_view, usage_window

NOW = datetime(2026, 11, 16, 12, 30, tzinfo=timezone.utc)  # half way through November, to the second


# -- tokens -------------------------------------------------------------------------------------


def test_tokens_resolve_by_hash_and_plaintext_keys_are_refused_without_echoing_them():
    token = new_token()
    book = parse_token_book(f'"{token_hash(token)}": acme\n', "t.yaml")
    assert book.customer_for(token) == "acme"
    assert book.customer_for(token + "x") is None and book.customer_for("") is None

    with pytest.raises(TokenFileError) as refused:
        parse_token_book(f"{token}: acme\n", "t.yaml")
    assert token not in str(refused.value) and "entry 1" in str(refused.value)
    with pytest.raises(TokenFileError, match="customer_id"):
        parse_token_book(f'"{token_hash(token)}": "has space"\n', "t.yaml")
    with pytest.raises(TokenFileError) as bad_yaml:
        parse_token_book(f'"{token_hash(token)}": [acme\n', "t.yaml")
    assert token_hash(token) not in str(bad_yaml.value)


def test_a_changed_tokens_file_is_reread_and_a_broken_one_refuses_everything(tmp_path):
    a, b = new_token(), new_token()
    path = tmp_path / "tokens.yaml"
    path.write_text(f'"{token_hash(a)}": acme\n')
    book = ReloadingTokenBook(path)
    assert book.customer_for(a) == "acme" and book.customer_for(b) is None

    path.write_text(f'"{token_hash(b)}": globex\n')  # a revoked, b issued
    os.utime(path, ns=(1, 1))
    assert book.customer_for(a) is None and book.customer_for(b) == "globex"

    path.write_text("not: [valid\n")
    os.utime(path, ns=(2, 2))
    assert book.customer_for(b) is None


# -- views ---------------------------------------------------------------------------------------


def _row(start: str, credits: str, cost: str = "0", events: int = 1, outcome: str = "0") -> dict[str, Any]:
    return {"bucket_start": start, "events": events, "usage_credits": Decimal(credits),
            "outcome_credits": Decimal(outcome), "cost_to_serve": Decimal(cost)}  # fmt: skip


def test_usage_view_is_zero_filled_and_its_totals_are_exact():
    window = usage_window(NOW, 3, "day")
    assert [s.day for s in window.starts] == [14, 15, 16]
    assert (window.since.day, window.until.day) == (14, 17)
    rows = [_row("2026-11-14 00:00:00", "0.1", "0.000001"), _row("2026-11-16 00:00:00", "0.2", "0.000002", 3)]
    view = usage_view("acme", window, rows, show_cost=True)
    assert [p["usage_credits"] for p in view["series"]] == ["0.1", "0", "0.2"]
    assert view["totals"] == {"events": 4, "usage_credits": "0.3", "outcome_credits": "0", "cost_to_serve": "0.000003"}
    assert "cost_to_serve" not in usage_view("acme", window, rows, show_cost=False)["totals"]

    hourly = usage_window(NOW, 1, "hour")
    assert len(hourly.starts) == 24 and hourly.starts[-1] == datetime(2026, 11, 16, 12, tzinfo=timezone.utc)


def test_burn_down_projects_month_to_date_spend_linearly():
    budget = Budget(monthly_credits=Decimal("100"), thresholds=(50, 80, 100))
    rows = [_row("2026-11-01 00:00:00", "10"), _row("2026-11-16 00:00:00", "18.5", outcome="2")]
    view = burn_down_view("acme", "2026-11", NOW, rows, budget, show_cost=False)
    # A budget counts usage and outcome credits.
    assert view["month_to_date"] == {"events": 2, "usage_credits": "28.5", "outcome_credits": "2", "budget_credits": "30.5"}
    assert view["used_percent"] == "30.5" and view["budget"]["unit"] == "credits"
    assert [(t["percent"], t["reached"]) for t in view["thresholds"]] == [(50, False), (80, False), (100, False)]
    assert len(view["days"]) == 16 and view["days"][-1]["cumulative_budget_credits"] == "30.5"
    # 15.5 of 30 days elapsed: 30.5 x 30 / 15.520833... (12:30 on the 16th) = 58.95...
    elapsed = Decimal((NOW - datetime(2026, 11, 1, tzinfo=timezone.utc)).total_seconds())
    expected = (Decimal("30.5") * Decimal(30 * 86400) / elapsed).quantize(Decimal("0.01"))
    assert view["projection"]["month_end_budget_credits"] == str(expected)
    assert view["budget_reached"] is False and view["projection"]["exhausted_at"] is None

    fast = burn_down_view("acme", "2026-11", NOW, [_row("2026-11-16 00:00:00", "80")], budget, show_cost=False)
    assert fast["projection"]["exhausted_at"].startswith("2026-11-20")  # 100/80 of 15.52 days
    spent = burn_down_view("acme", "2026-11", NOW, [_row("2026-11-02 00:00:00", "100")], budget, show_cost=False)
    assert spent["budget_reached"] is True and spent["thresholds"][-1]["reached"] is True

    # The projection means nothing on the 1st: none until 72 hours into the month.
    early = datetime(2026, 11, 3, 23, 59, tzinfo=timezone.utc)
    first = burn_down_view("acme", "2026-11", early, [_row("2026-11-01 00:00:00", "34.4")], budget, show_cost=False)
    assert first["projection"] is None and "72 hours" in first["projection_rule"]
    assert first["used_percent"] == "34.4"
    later = burn_down_view("acme", "2026-11", datetime(2026, 11, 4, tzinfo=timezone.utc),
                           [_row("2026-11-01 00:00:00", "30")], budget, show_cost=False)  # fmt: skip
    assert later["projection"]["month_end_budget_credits"] == "300"  # 30 in 3 of 30 days

    # A budget set in money is shown in money: $1,500 = 150,000 credits at 0.01.
    money = Budget(monthly_credits=Decimal("150000"), monthly_amount=Decimal("1500"), thresholds=(50, 80, 100))
    dollars = burn_down_view("acme", "2026-11", NOW, [_row("2026-11-02 00:00:00", "51234.5")], money, show_cost=False)
    assert dollars["budget"] == {"unit": "money", "monthly_credits": "150000", "monthly_amount": "1500",
                                 "currency": "USD", "thresholds": [50, 80, 100], "action": "alert"}  # fmt: skip
    assert dollars["month_to_date"]["spent_amount"] == "512.345" and dollars["used_percent"] == "34.2"
    assert dollars["thresholds"][0]["amount"] == "750"

    unbudgeted = burn_down_view("acme", "2026-11", NOW, rows, None, show_cost=False)
    assert unbudgeted["budget"] is None and unbudgeted["thresholds"] == []


def _alert(threshold: int, action: str = "alert") -> dict[str, Any]:
    return {"threshold_percent": threshold, "action": action, "crossed_at": NOW,
            "spent_credits": Decimal(threshold), "budget_credits": Decimal(100)}  # fmt: skip


@pytest.mark.parametrize(
    ("alerts", "state"),
    [
        ([], "ok"),
        ([_alert(50), _alert(80)], "warn"),
        ([_alert(50), _alert(80), _alert(100, "alert")], "warn"),  # an alert-only budget restricts nothing
        ([_alert(50), _alert(100, "downgrade")], "downgrade"),
        ([_alert(50), _alert(100, "block")], "block"),
        ([_alert(100, "block"), _alert(120, "downgrade")], "block"),  # the most severe wins
    ],
)
def test_enforcement_state_is_derived_from_the_alerts(alerts, state):
    assert enforcement_state(alerts)[0] == state


# -- routes --------------------------------------------------------------------------------------


class FakeQueries:
    """Records what the server asked for; answers one fixed row per customer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, str]]] = []

    async def __call__(self, name: str, customer: str, **params: str) -> list[dict[str, Any]]:
        self.calls.append((name, customer, params))
        if name == "customer_budget_alerts":
            return [_alert(50), _alert(100, "block")] if customer == "acme" else []
        return [_row("2026-11-16 00:00:00", "12.5" if customer == "acme" else "99", "0.25")]


A, B = new_token(), new_token()


def _client(queries: FakeQueries, settings: Settings | None = None) -> TestClient:
    tokens = parse_token_book(f'"{token_hash(A)}": acme\n"{token_hash(B)}": globex\n', "t.yaml")
    budgets = BudgetBook(customers={"acme": Budget(monthly_credits=Decimal("25"), action="block")})
    app = create_app(settings or Settings(), tokens, queries, budgets, clock=lambda: NOW)
    return TestClient(TestServer(app))


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_every_api_route_needs_a_valid_token():
    async def scenario() -> None:
        async with _client(FakeQueries()) as client:
            for path in ("/api/v1/me", "/api/v1/customers/acme/usage", "/api/v1/customers/acme/budget",
                         "/api/v1/customers/acme/enforcement", "/api/v1/nothing"):  # fmt: skip
                missing = await client.get(path)
                assert missing.status == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
                for header in (f"Bearer {A}x", f"Basic {A}", "Bearer ", A):
                    assert (await client.get(path, headers={"Authorization": header})).status == 401

    _run(scenario())


def test_a_token_reads_only_its_own_customer():
    queries = FakeQueries()

    async def scenario() -> None:
        async with _client(queries) as client:
            auth = {"Authorization": f"Bearer {A}"}
            me = await (await client.get("/api/v1/me", headers=auth)).json()
            assert me["customer_id"] == "acme" and me["period"] == "2026-11"
            for view in ("usage", "budget", "enforcement"):
                for other in ("globex", "nobody", "acme%2F..", "ACME"):
                    denied = await client.get(f"/api/v1/customers/{other}/{view}", headers=auth)
                    assert denied.status == 403, (other, view)
                    assert "globex" not in await denied.text()
                ok = await client.get(f"/api/v1/customers/acme/{view}", headers=auth)
                assert ok.status == 200
                assert "globex" not in await ok.text() and "99" not in await ok.text()
            budget = await (await client.get("/api/v1/customers/acme/budget", headers=auth)).json()
            assert budget["month_to_date"]["budget_credits"] == "12.5" and budget["budget"]["monthly_credits"] == "25"
            assert budget["used_percent"] == "50"
            state = await (await client.get("/api/v1/customers/acme/enforcement", headers=auth)).json()
            assert state["state"] == "block" and state["derived_from"] == "budget_alerts"

    _run(scenario())
    assert queries.calls and {customer for _, customer, _ in queries.calls} == {"acme"}
    assert all("customer" not in params for _, _, params in queries.calls)  # bound by the store layer only


def test_customer_ids_with_slashes_and_colons_route_percent_encoded_or_not():
    token = new_token()
    tokens = parse_token_book(f'"{token_hash(token)}": "org/team:1@x"\n', "t.yaml")
    app = create_app(Settings(), tokens, FakeQueries(), BudgetBook(), clock=lambda: NOW)

    async def scenario() -> None:
        async with TestClient(TestServer(app)) as client:
            auth = {"Authorization": f"Bearer {token}"}
            for path in ("org%2Fteam%3A1%40x", "org/team:1@x"):  # what the page's encodeURIComponent sends, and raw
                url = URL(f"/api/v1/customers/{path}/budget", encoded=True)
                response = await client.get(url, headers=auth)
                assert response.status == 200 and (await response.json())["customer_id"] == "org/team:1@x"
            assert (await client.get("/api/v1/customers/org/budget", headers=auth)).status == 403

    _run(scenario())


def test_usage_parameters_are_checked_and_cost_can_be_hidden():
    settings = Settings().model_copy(update={"web": Settings().web.model_copy(update={"show_cost_to_serve": False})})

    async def scenario() -> None:
        async with _client(FakeQueries(), settings) as client:
            auth = {"Authorization": f"Bearer {A}"}
            base = "/api/v1/customers/acme/usage"
            for query in ("bucket=week", "days=0", "days=93", "days=x", "bucket=hour&days=15"):
                assert (await client.get(f"{base}?{query}", headers=auth)).status == 400, query
            view = await (await client.get(f"{base}?bucket=hour&days=2", headers=auth)).json()
            assert len(view["series"]) == 48 and "cost_to_serve" not in view["totals"]
            assert view["totals"]["usage_credits"] == "12.5"

    _run(scenario())


def test_the_page_is_served_with_a_strict_content_security_policy():
    async def scenario() -> None:
        async with _client(FakeQueries()) as client:
            page = await client.get("/")
            assert page.status == 200 and "/static/app.js" in await page.text()
            assert "script-src 'self'" in page.headers["Content-Security-Policy"]
            script = await client.get("/static/app.js")
            assert script.status == 200 and "BigInt" in await script.text()
            assert (await client.get("/static/../tokens.py")).status in (403, 404)
            assert (await client.get("/healthz")).status == 200

    _run(scenario())


def test_a_store_outage_is_a_503_without_details():
    class Down(FakeQueries):
        async def __call__(self, name: str, customer: str, **params: str) -> list[dict[str, Any]]:
            raise StoreError("cannot open the ClickHouse server: secret-host:8123")

    async def scenario() -> None:
        async with _client(Down()) as client:
            response = await client.get("/api/v1/customers/acme/budget", headers={"Authorization": f"Bearer {A}"})
            assert response.status == 503 and "secret-host" not in await response.text()

    _run(scenario())


def test_the_access_log_never_holds_a_query_string(caplog):
    class Request:
        remote, method, path = "127.0.0.1", "GET", "/api/v1/me"

    class Response:
        status = 200

    logger = logging.getLogger("test.access")
    with caplog.at_level(logging.INFO, logger="test.access"):
        PathOnlyAccessLogger(logger, "").log(Request(), Response(), 0.01)  # type: ignore[arg-type]
    assert caplog.messages == ["127.0.0.1 GET /api/v1/me 200 10.0 ms"]


def test_customer_queries_bind_the_customer_and_report_an_unreachable_store():
    # Nothing listens on port 1: the query is refused with a StoreError, the API answers 503.
    queries = CustomerQueries(ClickHouseSettings(dsn="http://u:p@127.0.0.1:1/"), timeout=1)
    with pytest.raises(ValueError, match="does not bind a customer"):
        _run(queries("margin", "acme", period="2026-11"))
    with pytest.raises(ValueError, match="required"):
        _run(queries("customer_budget_alerts", "", period="2026-11"))
    with pytest.raises(StoreError, match=r"cannot open http://127.0.0.1:1: .* is unavailable"):
        _run(queries("customer_budget_alerts", "acme", period="2026-11"))


def test_tokens_expire_and_can_be_limited_to_meters():
    expired, scoped, lasting = new_token(), new_token(), new_token()
    tokens = parse_token_book(
        f'"{token_hash(expired)}": {{customer: acme, expires: "2026-11-16T12:00:00Z"}}\n'
        f'"{token_hash(scoped)}": {{customer: acme, expires: "2026-12-01T00:00:00Z", meters: [tokens, documents]}}\n'
        f'"{token_hash(lasting)}": {{customer: acme, expires: "2026-11-16T12:30:01Z"}}\n',
        "t.yaml",
    )
    with pytest.raises(TokenFileError, match="meters"):
        parse_token_book(f'"{token_hash(expired)}": {{customer: acme, meters: [nope]}}\n', "t.yaml")
    with pytest.raises(TokenFileError, match="timezone"):
        parse_token_book(f'"{token_hash(expired)}": {{customer: acme, expires: "2027-01-01T00:00:00"}}\n', "t.yaml")
    queries = FakeQueries()
    app = create_app(Settings(), tokens, queries, BudgetBook(), clock=lambda: NOW)

    async def scenario() -> None:
        async with TestClient(TestServer(app)) as client:
            def get(path: str, token: str):
                return client.get(path, headers={"Authorization": f"Bearer {token}"})

            gone = await get("/api/v1/me", expired)
            assert gone.status == 401 and "expired" in (await gone.json())["error"]
            assert (await get("/api/v1/me", lasting)).status == 200  # 1 second left
            me = await (await get("/api/v1/me", scoped)).json()
            assert me["meters"] == ["documents", "tokens"] and me["token_expires"] == "2026-12-01T00:00:00Z"
            assert (await get("/api/v1/customers/acme/usage", scoped)).status == 200
            assert queries.calls[-1][2]["meters"] == "documents,tokens"
            for money in ("budget", "invoice", "invoices", "enforcement"):
                assert (await get(f"/api/v1/customers/acme/{money}", scoped)).status == 403, money

    _run(scenario())
