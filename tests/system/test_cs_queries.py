"""Customer-success queries, rollups and the dispute audit against the real ClickHouse engine.

One hand-made month (October 2026) of three customers, rated by a small catalog on
the shipped price book, written with ``ClickHouseStore.insert_batch`` into a fresh
database. Every expected figure is computed by hand in the comments below, from
the price book's rates (meterstream/data/price_book.yaml):

    gpt-4o       credits/1K: input 0.5, cached 0.25, output 2     cost/1M: 2.5, 1.25, 10
    gpt-4o-mini  credits/1K: input 0.03, cached 0.015, output 0.12  cost/1M: 0.15, 0.075, 0.6
    documents    2 credits and $0.004 per unit; seats 0; resolved_ticket 90 credits (ai_only), 0 (human)

chDB allows one data directory per process, so the in-process tests share one
session directory with a fresh database each (as test_storage.py does), and the
CLI runs in a subprocess after the test has closed its own connection.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from meterstream.config import ClickHouseSettings
from meterstream.cs import audit as cs_audit
from meterstream.cs import reports
from meterstream.pricing.plans import load_catalog, parse_catalog
from meterstream.schemas.events import Attribution, Meter, OutcomeEvent, UsageEvent
from meterstream.schemas.records import RawEvent
from meterstream.storage.clickhouse import (
    SQL_DIR,
    ClickHouseStore,
    _statements,
    connect,
    migrate,
    open_store,
)
from meterstream.storage.queries import saved_query

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PERIOD = "2026-10"
D = Decimal

# acme is on growth: base fee 100, 1,000 credits included, graduated overage (0.02 up to
# 500 overage credits, then 0.01), 10 per seat, 10% discount, a free grant of 200 credits.
# Everyone else is on pay as you go: 0.01 per credit.
CATALOG = """
currency: USD
default_plan: payg
plans:
  payg:
    versions:
      - version: "payg-test-1"
        effective_from: "2026-01-01"
        price_book: default
        overage: {model: per_unit, unit_price: "0.01"}
        outcome_prices:
          resolved_ticket: {ai_only: "0.90", human_assisted: "0.20"}
  growth:
    versions:
      - version: "growth-test-1"
        effective_from: "2026-01-01"
        price_book: default
        base_fee: "100"
        included_credits: "1000"
        overage:
          model: graduated
          tiers: [{up_to: "500", unit_price: "0.02"}, {up_to: null, unit_price: "0.01"}]
        seat_fee: "10"
        outcome_prices:
          resolved_ticket: {ai_only: "1.00", human_assisted: "0.25"}
customers:
  acme:
    plan: growth
    discount_percent: "10"
    grants: [{id: acme-free, kind: free, credits: "200", granted_on: "2026-10-01"}]
"""


def _at(day: int, hour: int, minute: int = 0, second: int = 0, ms: int = 0, month: int = 10) -> datetime:
    return datetime(2026, month, day, hour, minute, second, ms * 1000, tzinfo=timezone.utc)


def _tokens(event_id, customer, at, model, inp, cached, out, workflow=None, run=None) -> UsageEvent:
    return UsageEvent(event_id=event_id, customer_id=customer, occurred_at=at, model=model, input_tokens=inp,
                      cached_input_tokens=cached, output_tokens=out, workflow_id=workflow, run_id=run)  # fmt: skip


def _meter(event_id, customer, at, meter, quantity, workflow=None, run=None) -> UsageEvent:
    return UsageEvent(event_id=event_id, customer_id=customer, occurred_at=at, meter=meter,
                      quantity=D(quantity), workflow_id=workflow, run_id=run)  # fmt: skip


def _outcome(event_id, customer, at, attribution, run=None, reversal_of=None) -> OutcomeEvent:
    return OutcomeEvent(event_id=event_id, customer_id=customer, occurred_at=at, outcome_type="resolved_ticket",
                        attribution=attribution, run_id=run, reversal_of=reversal_of)  # fmt: skip


AI, HUMAN = Attribution.AI_ONLY, Attribution.HUMAN_ASSISTED
EVENTS = [
    # acme, the month before: run r2 started on 30 September.
    # 100,000 x 0.03 / 1K = 3 credits; 100,000 x 0.15 / 1M = $0.015
    _tokens("a0", "acme", _at(30, 23, 50, month=9), "gpt-4o-mini", 100_000, 0, 0, "research", "r2"),
    # seats: 7, then 9 -> 9 active seats
    _meter("a5", "acme", _at(1, 0), Meter.SEATS, "7"),
    # (60,000 x 0.5 + 40,000 x 0.25 + 20,000 x 2) / 1K = 80 credits; (150,000 + 50,000 + 200,000) / 1M = $0.40
    _tokens("a1", "acme", _at(3, 10, 15, 0, 250), "gpt-4o", 100_000, 40_000, 20_000, "support", "r1"),
    # (1,000,000 x 0.5 + 200,000 x 2) / 1K = 900 credits; (2,500,000 + 2,000,000) / 1M = $4.50
    _tokens("a2", "acme", _at(3, 10, 45), "gpt-4o", 1_000_000, 0, 200_000, "research", "r2"),
    # (1M x 0.03 + 1M x 0.015 + 500,000 x 0.12) / 1K = 105 credits; (150,000 + 75,000 + 300,000) / 1M = $0.525
    _tokens("a3", "acme", _at(4, 9), "gpt-4o-mini", 2_000_000, 1_000_000, 500_000, "support", "r1"),
    _outcome("o1", "acme", _at(4, 9, 30), AI, "r1"),  # 90 credits
    _outcome("o2", "acme", _at(4, 9, 31), HUMAN, "r1"),  # 0 credits
    # 100 documents: 200 credits, $0.40
    _meter("a4", "acme", _at(4, 12), Meter.DOCUMENTS, "100", "intake", "r3"),
    _outcome("o3", "acme", _at(5, 8), AI, "r2"),  # 90 credits
    _outcome("o4", "acme", _at(6, 8), AI, "r2", reversal_of="o3"),  # -90 credits
    _meter("a6", "acme", _at(15, 0), Meter.SEATS, "9"),
    _outcome("o5", "acme", _at(16, 8), AI),  # no run: 90 credits
    # globex, pay as you go.
    # 10,000 x 0.25 / 1K = 2.5 credits; 10,000 x 1.25 / 1M = $0.0125
    _tokens("g1", "globex", _at(10, 8, 5), "gpt-4o", 10_000, 10_000, 0, "support", "g-r1"),
    # (200,000 x 0.03 + 50,000 x 0.12) / 1K = 12 credits; (30,000 + 30,000) / 1M = $0.06
    _tokens("g2", "globex", _at(10, 8, 20), "gpt-4o-mini", 200_000, 0, 50_000, "support", "g-r1"),
    _outcome("go1", "globex", _at(10, 9), AI, "g-r1"),  # 90 credits
    # initech: (1,000 x 0.03 + 1,000 x 0.12) / 1K = 0.15 credits; (150 + 600) / 1M = $0.00075
    _tokens("i1", "initech", _at(20, 23, 59, 59, 999), "gpt-4o-mini", 1_000, 0, 1_000),
]
RESENT = ["g2"]  # inserted twice: a resend that reached ClickHouse

# acme's invoice, by hand:
#   usage credits 80 + 900 + 105 + 200 + 0 + 0 = 1,285; 1,000 included -> 285 overage credits
#   overage: 285 x 0.02 = 5.70; the free grant pays the top 200: -(5.70 - 85 x 0.02) = -4.00
#   outcomes: ai_only 3 (o1, o3, o5) x 1.00 = 3.00, 1 reversal (o4) = -1.00; human 1 (o2) x 0.25 = 0.25
#   seats: 9 x 10 = 90.00; base fee 100.00
#   discount 10% of (5.70 - 4.00 + 3.00 - 1.00 + 0.25 = 3.95) = 0.395 -> -0.40
#   total 100 + 5.70 - 4.00 + 2.25 + 90 - 0.40 = 193.55; cost to serve 0.4 + 4.5 + 0.525 + 0.4 = 5.825 -> 5.83
ACME_TOTAL = D("193.55")
# globex: 14.5 usage credits x 0.01 = 0.145 -> 0.15, one ai_only outcome 0.90 -> 1.05
GLOBEX_TOTAL = D("1.05")
# initech: 0.15 x 0.01 = 0.0015 -> 0.00
INITECH_TOTAL = D("0.00")


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "plans.yaml"
    path.write_text(CATALOG)
    return path


@pytest.fixture(scope="module")
def catalog(catalog_file):
    return load_catalog(catalog_file)


def _load(store: ClickHouseStore, catalog) -> None:
    rated = [catalog.rate(event) for event in EVENTS]
    raw = [
        RawEvent(
            e.event_id, e.customer_id, e.type, r.occurred_at, r.period, e.model_dump_json().encode(),
            f"{e.type}.events", 0, offset,
        )
        for offset, (e, r) in enumerate(zip(EVENTS, rated, strict=True))
    ]
    store.insert_batch(raw, rated)
    again = [i for i, e in enumerate(EVENTS) if e.event_id in RESENT]
    store.insert_batch([raw[i] for i in again], [rated[i] for i in again])


@pytest.fixture
def store(clickhouse, catalog):
    store = open_store(clickhouse)
    _load(store, catalog)
    yield store
    store.close()


def _runner(store: ClickHouseStore):
    def run(name: str, **params: str):
        return store.query(saved_query(name), params)

    return run


def _by(rows, *keys):
    return {tuple(row[k] for k in keys) if len(keys) > 1 else row[keys[0]]: row for row in rows}


# -- month to date and spend -------------------------------------------------------------------


def _counting(run):
    calls: list[str] = []

    def counted(name: str, **params: str):
        calls.append(name)
        return run(name, **params)

    return counted, calls


def test_month_to_date_usage_and_spend(store, catalog):
    run, calls = _counting(_runner(store))
    result = reports.month_to_date(run, catalog, PERIOD)
    assert result.problems == []
    # One query for the period's usage and every invoice, one for late adjustments, one per period whose
    # issued invoices matter (this one and the one before): no query per customer.
    assert calls == ["period_usage", "late_billed_customers", "issued_customers", "issued_customers"]
    rows = _by(result.rows, "customer_id")
    acme = rows["acme"]
    # 6 usage + 5 outcome rows; a0 is September's.
    assert acme["events"] == 11
    assert (acme["input_tokens"], acme["cached_input_tokens"], acme["output_tokens"]) == (
        3_100_000, 1_040_000, 720_000)  # fmt: skip
    # usage credits 1,285; outcome credits 90 + 0 + 90 - 90 + 90 = 180
    assert (acme["usage_credits"], acme["outcome_credits"]) == (D("1285"), D("180"))
    # billed credits: 285 overage less the 200 the free grant pays
    assert acme["billed_credits"] == D("85")
    assert acme["cost_to_serve"] == D("5.825")
    # gpt-4o and gpt-4o-mini: the documents, seats and outcome rows carry no model and are not one.
    assert acme["models"] == 2
    assert (acme["spend"], acme["plan_version"], acme["invoice_status"]) == (ACME_TOTAL, "growth-test-1", "final")
    # the resent g2 counts once: 2.5 + 12 + 90 credits, 0.0125 + 0.06 cost
    globex = rows["globex"]
    assert (globex["events"], globex["usage_credits"], globex["outcome_credits"], globex["cost_to_serve"]) == (
        3, D("14.5"), D("90"), D("0.0725"))  # fmt: skip
    assert globex["spend"] == GLOBEX_TOTAL and globex["billed_credits"] == D("14.5")
    assert (rows["initech"]["usage_credits"], rows["initech"]["spend"]) == (D("0.15"), INITECH_TOTAL)
    # The usage figures are month_to_date.sql's, row for row.
    plain = reports.month_to_date(_runner(store), None, PERIOD).rows
    assert [{k: r[k] for k in p} for r, p in zip(result.rows, plain, strict=True)] == plain
    assert [r["customer_id"] for r in result.rows] == ["acme", "globex", "initech"]


def test_the_one_query_invoices_are_the_invoices(store, catalog):
    """period_invoices gives every customer exactly invoice_from_store's invoice, line for line."""
    from meterstream.billing import group_by_customer, invoice_from_store, period_invoices

    run = _runner(store)
    as_of = datetime(2026, 10, 20, tzinfo=timezone.utc)  # mid-period: previews
    grouped = group_by_customer(run("period_usage", period=PERIOD, customer="").dicts())
    fast = period_invoices(run, catalog, PERIOD, grouped, as_of=as_of)
    assert sorted(fast) == ["acme", "globex", "initech"]
    for customer, invoice in fast.items():
        assert invoice == invoice_from_store(run, catalog, customer, PERIOD, as_of=as_of), customer
    # A grant dated in an earlier month (September for acme; every grant has a granted_on since issue 14):
    # the balances carry from there, read with one period_usage query per earlier month.
    undated = parse_catalog(yaml.safe_load(CATALOG.replace('granted_on: "2026-10-01"', 'granted_on: "2026-09-01"')))
    counted, calls = _counting(run)
    fast = period_invoices(counted, undated, PERIOD, grouped, as_of=as_of)
    assert "invoice_usage" not in calls and calls.count("period_usage") == 1  # September's, for every customer
    assert calls.count("issued_customers") <= 3  # October, September, August: once each
    for customer, invoice in fast.items():
        assert invoice == invoice_from_store(run, undated, customer, PERIOD, as_of=as_of), customer
    assert [g.opening_credits for g in fast["acme"].grants] == [D("200")]  # September had no overage


# -- top customers -----------------------------------------------------------------------------


def test_top_customers_by_cost(store):
    rows = reports.top_customers(_runner(store), PERIOD, limit=10).rows
    assert [(r["customer_id"], r["cost_to_serve"]) for r in rows] == [
        ("acme", D("5.825")), ("globex", D("0.0725")), ("initech", D("0.00075"))]  # fmt: skip
    total = D("5.825") + D("0.0725") + D("0.00075")
    assert rows[0]["cost_share"] == (D("5.825") / total).quantize(D("1e-18"), rounding="ROUND_DOWN")
    assert sum(r["cost_share"] for r in rows) == pytest.approx(D(1), abs=D("1e-15"))
    assert rows[0]["models"] == 2 and rows[1]["events"] == 3
    assert [r["customer_id"] for r in reports.top_customers(_runner(store), PERIOD, limit=2).rows] == ["acme", "globex"]


def test_top_customers_share_of_a_customer_costing_over_1000_dollars(clickhouse, catalog):
    """Decimal(38, 18) / Decimal(38, 18) wraps around in ClickHouse above ~$170: the share must not."""
    events = [
        # 100M input x 2.50 / 1M + 100M output x 10 / 1M = $1,250
        _tokens("big-1", "heavy", _at(2, 9), "gpt-4o", 100_000_000, 0, 100_000_000),
        # 10M output x 10 / 1M = $100
        _tokens("small-1", "light", _at(2, 10), "gpt-4o", 0, 0, 10_000_000),
    ]
    store = open_store(clickhouse)
    try:
        store.insert_batch([], [catalog.rate(e) for e in events])
        rows = _by(reports.top_customers(_runner(store), PERIOD).rows, "customer_id")
    finally:
        store.close()
    assert rows["heavy"]["cost_to_serve"] == D("1250")
    assert rows["heavy"]["cost_share"] == (D(1250) / D(1350)).quantize(D("1e-18"), rounding="ROUND_DOWN")  # 92.6%
    assert rows["light"]["cost_share"] == (D(100) / D(1350)).quantize(D("1e-18"), rounding="ROUND_DOWN")
    assert all(D(0) <= r["cost_share"] <= D(1) for r in rows.values())


# -- margin ------------------------------------------------------------------------------------


def test_margin_by_customer_is_the_invoice_total_less_cost(store, catalog):
    rows = _by(reports.margin(_runner(store), catalog, PERIOD, "customer").rows, "customer")
    assert rows["acme"]["revenue"] == ACME_TOTAL
    assert rows["acme"]["cost_to_serve"] == D("5.825")
    assert rows["acme"]["margin"] == ACME_TOTAL - D("5.825")
    assert rows["globex"]["revenue"] == GLOBEX_TOTAL
    by_workflow = reports.margin(_runner(store), catalog, PERIOD, "workflow").rows
    assert sum(r["cost_to_serve"] for r in by_workflow) == D("5.825") + D("0.0725") + D("0.00075")
    assert sum(r["revenue"] for r in by_workflow) == pytest.approx(ACME_TOTAL + GLOBEX_TOTAL, abs=D("1e-15"))


# -- cache savings -----------------------------------------------------------------------------


def test_cache_savings_in_cost_and_credits(store, catalog):
    result = reports.cache_savings(_runner(store), catalog, PERIOD)
    assert result.problems == []
    rows = _by(result.rows, "customer_id", "model")
    # globex g1: 10,000 cached x (2.50 - 1.25) / 1M = $0.0125; 10,000 x (0.5 - 0.25) / 1K = 2.5 credits
    g = rows[("globex", "gpt-4o")]
    assert (g["cached_input_tokens"], g["cost_saved"], g["usage_credits_saved"]) == (10_000, D("0.0125"), D("2.5"))
    assert g["hit_rate"] == 1 and g["cost_without_cache"] == D("0.025")
    # acme gpt-4o: 40,000 x 1.25 / 1M = $0.05; 40,000 x 0.25 / 1K = 10 credits; hit rate 40,000 / 1,100,000
    a4o = rows[("acme", "gpt-4o")]
    assert (a4o["events"], a4o["events_with_cache_hits"]) == (2, 1)
    assert (a4o["cost_saved"], a4o["usage_credits_saved"]) == (D("0.05"), D("10"))
    assert a4o["hit_rate"] == D(40_000) / D(1_100_000)
    # acme gpt-4o-mini (a3 only: a0 is September's): 1,000,000 x (0.15 - 0.075) / 1M = $0.075;
    # 1,000,000 x (0.03 - 0.015) / 1K = 15 credits
    amini = rows[("acme", "gpt-4o-mini")]
    assert (amini["cached_input_tokens"], amini["cost_saved"], amini["usage_credits_saved"]) == (1_000_000, D("0.075"), D("15"))
    assert rows[("globex", "gpt-4o-mini")]["cost_saved"] == 0
    by_customer = _by(reports.cache_savings(_runner(store), catalog, PERIOD, by="customer").rows, "customer_id")
    assert by_customer["acme"]["cost_saved"] == D("0.125") and by_customer["acme"]["usage_credits_saved"] == D("25")


def test_cache_savings_report_tokens_of_an_unknown_plan_version(store, catalog):
    other = load_catalog()  # the shipped pay-as-you-go catalog knows none of the test versions
    result = reports.cache_savings(_runner(store), other, PERIOD, customer="globex")
    assert _by(result.rows, "model")["gpt-4o"]["unvalued_cached_tokens"] == 10_000
    assert any("payg-test-1" in p for p in result.problems)


# -- cost per outcome --------------------------------------------------------------------------


def test_cost_per_outcome_shares_each_runs_usage_among_its_outcomes(store):
    rows = _by(reports.cost_per_outcome(_runner(store), PERIOD).rows, "outcome_type", "attribution")
    ai, human = rows[("resolved_ticket", "ai_only")], rows[("resolved_ticket", "human_assisted")]
    # ai_only: o1 (r1), o3 (r2), o5 (no run), go1 (g-r1); o4 reverses o3.
    assert (ai["outcomes"], ai["reversals"], ai["outcomes_with_usage"], ai["outcomes_without_usage"]) == (4, 1, 3, 1)
    assert ai["runs_with_usage"] == 3
    # r1 = a1 + a3 = $0.925 / 185 credits, shared by o1 and o2: 0.4625 / 92.5 each.
    # r2 = a2 + a0 (September) = $4.515 / 903 credits, o3 alone. g-r1 = g1 + g2 (once) = $0.0725 / 14.5.
    assert ai["cost_to_serve"] == D("0.4625") + D("4.515") + D("0.0725")  # 5.05
    assert ai["usage_credits"] == D("92.5") + D("903") + D("14.5")  # 1,010
    assert ai["cost_per_outcome"] == (D("5.05") / 3).quantize(D("1e-18"), rounding="ROUND_DOWN")
    assert ai["credits_per_outcome"] == (D("1010") / 3).quantize(D("1e-18"), rounding="ROUND_DOWN")
    assert (human["outcomes"], human["cost_to_serve"], human["cost_per_outcome"]) == (1, D("0.4625"), D("0.4625"))
    only_globex = reports.cost_per_outcome(_runner(store), PERIOD, customer="globex").rows
    assert [(r["outcomes"], r["cost_per_outcome"]) for r in only_globex] == [(1, D("0.0725"))]


# -- rollups -----------------------------------------------------------------------------------


def test_hourly_and_daily_rollups_are_exact_even_with_a_resent_event(store):
    run = _runner(store)
    hourly = reports.usage_series(run, "hourly", PERIOD, "acme", day="2026-10-03").rows
    assert [(r["hour"].hour, r["model"], r["workflow_id"], r["events"], r["usage_credits"], r["source"]) for r in hourly] == [
        (10, "gpt-4o", "research", 1, D("900"), "rollup"),
        (10, "gpt-4o", "support", 1, D("80"), "rollup"),
    ]  # fmt: skip
    # The rollup itself received g2 twice ...
    received = store.query(
        "SELECT sum(inserted_rows) AS n, uniqExactMerge(event_ids) AS ids FROM usage_daily "
        "WHERE customer_id = 'globex' AND model = 'gpt-4o-mini'"
    ).dicts()[0]
    assert (received["n"], received["ids"]) == (2, 1)
    # ... so globex is read from usage_rated FINAL, and the figures count it once.
    daily = _by(reports.usage_series(run, "daily", PERIOD, "globex").rows, "model")
    assert {r["source"] for r in daily.values()} == {"usage_rated"}
    assert (daily["gpt-4o-mini"]["events"], daily["gpt-4o-mini"]["usage_credits"]) == (1, D("12"))
    assert (daily[""]["meter"], daily[""]["outcome_credits"], daily[""]["usage_credits"]) == ("outcome", D("90"), 0)
    # Per customer, the rollups add up to the month-to-date totals read with FINAL.
    mtd = _by(run("month_to_date", period=PERIOD, customer="").dicts(), "customer_id")
    for grain in ("hourly", "daily"):
        rows = reports.usage_series(run, grain, PERIOD).rows
        for customer, expected in mtd.items():
            mine = [r for r in rows if r["customer_id"] == customer]
            for column in ("events", "input_tokens", "cached_input_tokens", "output_tokens", "usage_credits",
                           "outcome_credits", "cost_to_serve"):
                assert sum(r[column] for r in mine) == expected[column], (grain, customer, column)


def test_migrating_a_store_with_usage_backfills_the_rollups(clickhouse, catalog, tmp_path):
    before = tmp_path / "sql"
    before.mkdir()
    # The tables as they were before the rollups (with the later columns the code now writes).
    for path in sorted(SQL_DIR.glob("00[1236]_*.sql")):
        shutil.copy(path, before / path.name)
    client = connect(clickhouse)
    try:
        migrate(client, before)
        # usage_rated's batch columns (sql/010) the code now writes; 010 itself runs below, after 004
        # (it also sets the dedup window on the rollups).
        for statement in _statements((SQL_DIR / "010_insert_dedup.sql").read_text()):
            if "ADD COLUMN" in statement:
                client.command(statement)
        _load(ClickHouseStore(client), catalog)  # rows that predate the rollups
        assert "004_rollups.sql" in migrate(client)
        run = _runner(ClickHouseStore(client))
        daily = reports.usage_series(run, "daily", PERIOD, "acme").rows
        assert {r["source"] for r in daily} == {"rollup"}
        assert sum(r["usage_credits"] for r in daily) == D("1285")
        assert sum(r["outcome_credits"] for r in daily) == D("180")
        assert sum(r["events"] for r in daily) == 11
    finally:
        client.close()


# -- the dispute audit ---------------------------------------------------------------------------


def test_audit_reconciles_every_line_of_the_invoice(store, catalog):
    sink = io.StringIO()
    result = cs_audit.audit(_runner(store), catalog, "acme", PERIOD, sink=sink, page_size=3)
    assert result.reconciled, [c for c in result.checks if not c.reconciled]
    assert result.invoice.total == ACME_TOTAL
    checks = {c.line: c for c in result.checks}
    assert list(checks) == ["base_fee", "included_usage", "overage", "credits_applied", "outcomes", "seats",
                            "discount", "usage.credits_used", "usage.cost_to_serve"]  # fmt: skip
    assert (checks["base_fee"].invoice_amount, checks["base_fee"].rows) == (D("100.00"), 0)
    assert (checks["overage"].invoice_quantity, checks["overage"].invoice_amount) == (D("285"), D("5.70"))
    assert (checks["overage"].rows, checks["overage"].rows_credits) == (6, D("1285"))
    assert (checks["credits_applied"].invoice_quantity, checks["credits_applied"].invoice_amount) == (D("-200"), D("-4.00"))
    # 3 + 1 outcomes, 1 reversal: quantities 3 - 1 + 1 = 3; amount 3.00 - 1.00 + 0.25
    assert (checks["outcomes"].rows, checks["outcomes"].invoice_quantity, checks["outcomes"].invoice_amount) == (
        5, D("3"), D("2.25"))  # fmt: skip
    assert (checks["seats"].rows, checks["seats"].invoice_quantity, checks["seats"].invoice_amount) == (2, D("9"), D("90.00"))
    assert checks["discount"].invoice_amount == D("-0.40")
    assert checks["usage.cost_to_serve"].invoice_amount == D("5.83")
    assert result.stats.without_raw_event == 0
    rules = {(r["plan_version"], r["rule"]): r for r in result.by_rule()}
    assert (rules[("growth-test-1", "tokens:gpt-4o")]["usage_credits"],
            rules[("growth-test-1", "tokens:gpt-4o")]["outcome_credits"]) == (D("980"), 0)  # fmt: skip
    outcomes = [r for (_, rule), r in rules.items() if rule.startswith("outcome:")]
    assert outcomes and all(r["usage_credits"] == 0 for r in outcomes)
    assert sum(r["outcome_credits"] for r in outcomes) == result.stats.outcome_credits
    assert rules[("growth-test-1", "outcome:resolved_ticket:ai_only:reversal")]["rows"] == 1

    rows = list(csv.DictReader(io.StringIO(sink.getvalue())))
    assert list(rows[0]) == cs_audit.CSV_COLUMNS
    # All of acme's October rows, in time order, paged three at a time without gaps or repeats.
    assert [r["event_id"] for r in rows] == ["a5", "a1", "a2", "a3", "o1", "o2", "a4", "o3", "o4", "a6", "o5"]
    a1 = rows[1]
    assert (a1["occurred_at"], a1["credits"], a1["cost_to_serve"]) == (
        "2026-10-03T10:15:00.250Z", "80.000000000000000000", "0.400000000000000000")  # fmt: skip
    assert (a1["plan_version"], a1["rule"], a1["cached_input_tokens"]) == ("growth-test-1", "tokens:gpt-4o", "40000")
    assert json.loads(a1["raw_payload"])["event_id"] == "a1"
    assert sum(D(r["credits"]) for r in rows if r["kind"] == "usage") == result.invoice.usage.credits_used


def test_audit_of_one_line_exports_only_the_rows_behind_it(store, catalog):
    for line, expected in [("overage", ["a5", "a1", "a2", "a3", "a4", "a6"]), ("outcomes", ["o1", "o2", "o3", "o4", "o5"]),
                           ("seats", ["a5", "a6"]), ("base_fee", [])]:  # fmt: skip
        sink = io.StringIO()
        result = cs_audit.audit(_runner(store), catalog, "acme", PERIOD, line, sink)
        assert [r["event_id"] for r in csv.DictReader(io.StringIO(sink.getvalue()))] == expected, line
        assert result.reconciled and [c.line for c in result.checks] == [line]
    with pytest.raises(ValueError, match="unknown invoice line kind"):
        cs_audit.audit(_runner(store), catalog, "acme", PERIOD, "tip")


# -- the CLI faces (a subprocess: it opens the store itself) --------------------------------------


def _cli(clickhouse: ClickHouseSettings, catalog_file: Path, *args: str, columns: str | None = "250") -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "METERSTREAM_CLICKHOUSE__DSN": clickhouse.dsn.get_secret_value(),
        "METERSTREAM_CLICKHOUSE__DATABASE": clickhouse.database,
        "METERSTREAM_WORKER__PLANS_FILE": str(catalog_file),
    }
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run([sys.executable, "-m", "meterstream.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)  # fmt: skip


@pytest.fixture
def loaded(clickhouse, catalog):
    """A loaded store, closed again so that the CLI subprocess can open it."""
    store = open_store(clickhouse)
    _load(store, catalog)
    store.close()
    return clickhouse


def test_cli_usage_reports_as_table_json_and_csv(loaded, catalog_file):
    def ok(*args: str) -> str:
        result = _cli(loaded, catalog_file, *args)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    mtd = {r["customer_id"]: r for r in json.loads(ok("usage", "--period", PERIOD, "--json"))}
    assert (D(mtd["acme"]["usage_credits"]), D(mtd["acme"]["outcome_credits"]), D(mtd["acme"]["spend"])) == (
        D("1285"), D("180"), ACME_TOTAL)  # fmt: skip
    only = json.loads(ok("usage", "--period", PERIOD, "--customer", "globex", "--json", "--no-spend"))
    assert [(r["customer_id"], r["events"]) for r in only] == [("globex", 3)] and "spend" not in only[0]
    table = ok("usage", "--period", PERIOD)
    assert "acme" in table and "193.55" in table and "1,285.00" in table and "180.00" in table
    assert "usage credits:" in table and "billed credits:" in table  # what each word means
    assert f"Month-to-date usage and spend, {PERIOD}" in table
    bare = ok("usage", "--period", PERIOD, "--no-spend")  # the title says what the table holds
    assert f"Month-to-date usage, {PERIOD}" in bare and "spend" not in bare and "billed credits:" not in bare

    top = list(csv.DictReader(io.StringIO(ok("usage", "top-customers", "--period", PERIOD, "--limit", "2", "--csv"))))
    assert [(r["customer_id"], D(r["cost_to_serve"])) for r in top] == [("acme", D("5.825")), ("globex", D("0.0725"))]

    margin = json.loads(ok("usage", "margin", "--period", PERIOD, "--by", "customer", "--json"))
    assert json.loads(ok("margin", "--period", PERIOD, "--by", "customer", "--json")) == margin
    assert {r["customer"]: D(r["revenue"]) for r in margin} == {"acme": ACME_TOTAL, "globex": GLOBEX_TOTAL,
                                                                  "initech": INITECH_TOTAL}  # fmt: skip
    assert "Margin by model" in ok("usage", "margin", "--period", PERIOD, "--by", "model")

    savings = _by(json.loads(ok("usage", "cache-savings", "--period", PERIOD, "--json")), "customer_id", "model")
    assert D(savings[("globex", "gpt-4o")]["cost_saved"]) == D("0.0125")
    assert "cost saved" in ok("usage", "cache-savings", "--period", PERIOD, "--by", "customer")

    outcomes = list(csv.DictReader(io.StringIO(ok("usage", "cost-per-outcome", "--period", PERIOD, "--csv"))))
    assert {(r["attribution"], D(r["cost_to_serve"])) for r in outcomes} == {("ai_only", D("5.05")),
                                                                               ("human_assisted", D("0.4625"))}  # fmt: skip

    hourly = json.loads(ok("usage", "hourly", "--period", PERIOD, "--customer", "acme", "--day", "2026-10-03", "--json"))
    assert [(r["hour"], r["workflow_id"], r["events"]) for r in hourly] == [
        ("2026-10-03T10:00:00Z", "research", 1), ("2026-10-03T10:00:00Z", "support", 1)]  # fmt: skip
    daily = ok("usage", "daily", "--period", PERIOD, "--customer", "globex")
    assert "2026-10-10" in daily and "usage_rated FINAL" in daily

    bad = _cli(loaded, catalog_file, "usage", "hourly", "--period", PERIOD, "--day", "2026-11-01")
    assert bad.returncode != 0 and "not in --period" in bad.stderr


def test_cli_output_survives_a_pipe(loaded, catalog_file):
    """Piped (stdout is not a terminal, no COLUMNS): every value whole; JSON decimals never in exponent form."""
    for columns in (None, "80"):
        usage = _cli(loaded, catalog_file, "usage", "--period", PERIOD, columns=columns)
        assert usage.returncode == 0, usage.stderr
        assert "…" not in usage.stdout
        [acme] = [line for line in usage.stdout.splitlines() if "acme" in line]
        # the whole row on one line: ids, figures and the plan version a dispute needs
        for value in ("acme", "3,100,000", "1,040,000", "193.55", "growth-test-1", "final"):
            assert value in acme, (value, acme)
        assert "payg-test-1" in usage.stdout
        top = _cli(loaded, catalog_file, "usage", "top-customers", "--period", PERIOD, columns=columns)
        assert top.returncode == 0 and "…" not in top.stdout and "initech" in top.stdout
    text = _cli(loaded, catalog_file, "invoice", "--customer", "acme", "--period", PERIOD, columns=None)
    assert not [line for line in text.stdout.splitlines() if "…" in line], text.stdout
    assert "(acme-free)" in text.stdout and "growth-test-1" in text.stdout

    exponent = re.compile(r'"-?\d+(\.\d+)?[eE][-+]?\d+"')
    for customer in ("acme", "globex", "initech"):
        result = _cli(loaded, catalog_file, "invoice", "--customer", customer, "--period", PERIOD, "--json")
        assert result.returncode == 0, result.stderr
        invoice = json.loads(result.stdout)
        assert isinstance(invoice, dict) and invoice["customer_id"] == customer
        assert not exponent.search(result.stdout), result.stdout
    for args in (("usage", "--period", PERIOD, "--json"), ("usage", "top-customers", "--period", PERIOD, "--json"),
                 ("usage", "margin", "--period", PERIOD, "--json"), ("usage", "daily", "--period", PERIOD, "--json")):
        result = _cli(loaded, catalog_file, *args)
        assert result.returncode == 0 and not exponent.search(result.stdout), (args, result.stdout)


def test_cli_audit_is_reproducible_and_reconciles_with_the_invoice(loaded, catalog_file, tmp_path):
    invoice = _cli(loaded, catalog_file, "invoice", "--customer", "acme", "--period", PERIOD, "--json")
    assert invoice.returncode == 0, invoice.stderr
    inv = json.loads(invoice.stdout)  # one customer and period: an object
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    runs = [
        _cli(
            loaded, catalog_file, "audit", "--customer", "acme", "--period", PERIOD,
            "--csv", str(path), "--json", "--page-size", size,
        )
        for path, size in ((first, "4"), (second, "10000"))
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert first.read_bytes() == second.read_bytes()
    assert len(first.read_text().splitlines()) == 1 + 11
    summary = json.loads(runs[0].stdout)
    assert json.loads(runs[1].stdout)["lines"] == summary["lines"]
    assert summary["reconciled"] is True and D(summary["invoice_total"]) == D(inv["total"]) == ACME_TOTAL
    # Each line kind's amount is the invoice's, and the rows behind the usage lines add up to its credits used.
    amounts: dict[str, Decimal] = {}
    for line in inv["lines"]:
        amounts[line["kind"]] = amounts.get(line["kind"], D(0)) + D(line["amount"])
    audited = {c["line"]: c for c in summary["lines"]}
    assert {k: D(audited[k]["invoice_amount"]) for k in amounts} == amounts
    assert D(audited["overage"]["rows_credits"]) == D(inv["usage"]["credits_used"]) == D("1285")
    assert D(audited["usage.cost_to_serve"]["invoice_amount"]) == D(inv["usage"]["cost_to_serve"])

    table = _cli(loaded, catalog_file, "audit", "--customer", "acme", "--period", PERIOD, "--line", "overage")
    assert table.returncode == 0, table.stderr
    assert "reconciled" in table.stdout and "1,285" in table.stdout
    to_stdout = _cli(loaded, catalog_file, "audit", "--customer", "acme", "--period", PERIOD, "--line", "outcomes",
                     "--csv", "-")  # fmt: skip
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert [r["event_id"] for r in csv.DictReader(io.StringIO(to_stdout.stdout))] == ["o1", "o2", "o3", "o4", "o5"]
    unknown = _cli(loaded, catalog_file, "audit", "--customer", "acme", "--period", PERIOD, "--line", "tip")
    assert unknown.returncode != 0 and "--line must be one of" in unknown.stderr


# -- the commands beside a running worker (both on the one ClickHouse server) --------------------


def test_reports_and_audit_beside_the_running_worker(pipeline_factory, tmp_path):
    from datetime import timedelta

    from meterstream.clock import current_period, utc_now
    from meterstream.producers import MeterClient

    pipeline = pipeline_factory()
    # The first 12 seconds of a month would split the calls below over two periods: start them after.
    now = max(utc_now(), utc_now().replace(day=1, hour=0, minute=0, second=12)).replace(microsecond=0)
    period = current_period(lambda: now)
    with MeterClient(pipeline.kafka) as meter:
        for i in range(12):
            # Even calls fully cached: 10,000 x 0.25 / 1K = 2.5 credits, 10,000 x 1.25 / 1M = $0.0125;
            # odd ones uncached: 5 credits, $0.025. Total 45 credits, $0.225.
            meter.record_llm_call("cs-worker", "gpt-4o", input_tokens=10_000, output_tokens=0,
                                  cached_input_tokens=10_000 if i % 2 == 0 else 0, event_id=f"w{i}",
                                  run_id=f"run{i % 3}", workflow_id="support", occurred_at=now - timedelta(seconds=i))  # fmt: skip
        meter.record_outcome("cs-worker", "resolved_ticket", "ai_only", event_id="wo1", run_id="run0", occurred_at=now)
    pipeline.wait_processed(13)

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "meterstream.cli", *args], env={**pipeline.worker.env, "COLUMNS": "200"},
                                capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    [saving] = json.loads(cli("usage", "cache-savings", "--period", period, "--customer", "cs-worker", "--json"))
    # 6 x 10,000 cached tokens: 60,000 x (2.50 - 1.25) / 1M = $0.075 and 60,000 x (0.5 - 0.25) / 1K = 15 credits
    assert (D(saving["cost_saved"]), D(saving["usage_credits_saved"])) == (D("0.075"), D("15"))
    for grain in ("hourly", "daily"):
        rows = json.loads(cli("usage", grain, "--period", period, "--customer", "cs-worker", "--json"))
        assert sum(r["events"] for r in rows) == 13 and {r["source"] for r in rows} == {"rollup"}
        assert (sum(D(r["usage_credits"]) for r in rows), sum(D(r["outcome_credits"]) for r in rows)) == (D("45"), D("90"))
    # run0 = w0, w3, w6, w9: 2 x 0.0125 + 2 x 0.025 = $0.075 for its one outcome
    [outcome] = json.loads(cli("usage", "cost-per-outcome", "--period", period, "--customer", "cs-worker", "--json"))
    assert D(outcome["cost_per_outcome"]) == D("0.075")
    invoice = json.loads(cli("invoice", "--customer", "cs-worker", "--period", period, "--json"))
    assert D(invoice["total"]) == D("1.35")  # 45 x 0.01 + 0.90
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    summaries = [json.loads(cli("audit", "--customer", "cs-worker", "--period", period, "--csv", str(path),
                                "--page-size", size, "--json")) for path, size in ((first, "5"), (second, "100"))]  # fmt: skip
    assert first.read_bytes() == second.read_bytes() and len(first.read_text().splitlines()) == 14
    assert all(s["reconciled"] and D(s["invoice_total"]) == D("1.35") for s in summaries)
