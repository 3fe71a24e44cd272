"""Usage profiles and the threshold advisor against the real ClickHouse engine, on hand-made rated rows.

Every expected figure below is computed by hand in the comments, not by the engine.
chDB allows one data directory per process, so the tests share one session
directory and each gets a fresh database (as in test_storage.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from typer.testing import CliRunner

from meterstream import advisor
from meterstream.config import get_settings
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.records import RatedUsage
from meterstream.storage.clickhouse import open_store
from meterstream.storage.queries import saved_query

pytestmark = pytest.mark.store

PERIOD = "2025-10"
D = Decimal

# Growth: base 100, includes 30,000 credits, overage 0.01 per credit; everyone not listed is on it.
# Starter: no base fee, includes 1,000, overage 0.02, 1.50 per AI-only resolved ticket.
CATALOG = """
currency: USD
default_plan: growth
plans:
  growth:
    versions:
      - version: "growth-test-1"
        effective_from: "2025-01-01"
        base_fee: "100"
        included_credits: "30000"
        overage: {model: per_unit, unit_price: "0.01"}
  starter:
    versions:
      - version: "starter-test-1"
        effective_from: "2025-01-01"
        base_fee: "0"
        included_credits: "1000"
        overage: {model: per_unit, unit_price: "0.02"}
        outcome_prices:
          resolved_ticket: {ai_only: "1.50"}
customers:
  c6: {plan: starter}
"""


def _row(customer: str, event_id: str, *, period: str = PERIOD, kind: str = "usage", meter: str = "tokens",
         model: str = "", input_tokens: int = 0, output_tokens: int = 0, quantity: str = "0",
         credits: str = "0", cost: str = "0", outcome_type: str = "", attribution: str = "",
         reversal: bool = False) -> RatedUsage:  # fmt: skip
    version = "starter-test-1" if customer == "c6" else "growth-test-1"
    if kind == "outcome":
        rule = f"outcome:{outcome_type}:{attribution}" + (":reversal" if reversal else "")
    else:
        rule = f"{meter}:{model}" if model else meter
    return RatedUsage(
        event_id=event_id, kind=kind, customer_id=customer,
        occurred_at=datetime(int(period[:4]), int(period[5:]), 15, 12, tzinfo=timezone.utc), period=period,
        meter=meter if kind == "usage" else "", model=model, input_tokens=input_tokens,
        output_tokens=output_tokens, quantity=D(quantity), outcome_type=outcome_type, attribution=attribution,
        credits=D(credits), cost_to_serve=D(cost), price_book_version=version, rule=rule,
    )  # fmt: skip


#: Customers c1..c5 use 10k, 20k, 40k, 60k, 100k credits in PERIOD, costing 0.005 per credit to serve;
#: c6 (starter) uses 500 credits and has two resolved tickets, one of them reversed.
ROWS = [
    _row("c1", "e1", model="gpt-4o", input_tokens=8_000, output_tokens=2_000, credits="9000", cost="45"),
    _row("c1", "e2", meter="requests", quantity="50", credits="1000", cost="5"),
    _row("c2", "e3", model="gpt-4o", input_tokens=16_000, output_tokens=4_000, credits="20000", cost="100"),
    _row("c3", "e4", model="gpt-4o-mini", input_tokens=30_000, output_tokens=10_000, credits="40000", cost="200"),
    _row("c4", "e5", model="gpt-4o", input_tokens=40_000, output_tokens=10_000, credits="50000", cost="250"),
    _row("c4", "e6", meter="documents", quantity="5", credits="10000", cost="50"),
    _row("c5", "e7", model="gpt-4o", input_tokens=60_000, output_tokens=20_000, credits="100000", cost="500"),
    _row("c6", "e8", model="gpt-4o-mini", input_tokens=1_000, output_tokens=500, credits="500", cost="2.5"),
    _row("c6", "e9", kind="outcome", outcome_type="resolved_ticket", attribution="ai_only"),
    _row("c6", "e10", kind="outcome", outcome_type="resolved_ticket", attribution="ai_only"),
    _row("c6", "e11", kind="outcome", outcome_type="resolved_ticket", attribution="ai_only", reversal=True),
    # The month before: c1 and c2 were already customers (their cohort is 2025-09).
    _row("c1", "s1", period="2025-09", model="gpt-4o", input_tokens=1_000, credits="777", cost="1"),
    _row("c2", "s2", period="2025-09", model="gpt-4o", input_tokens=1_000, credits="888", cost="1"),
]


@pytest.fixture
def store(clickhouse):
    store = open_store(clickhouse)
    store.insert_batch([], ROWS)
    store.insert_batch([], ROWS[:2])  # resent: FINAL counts them once
    yield store
    store.close()


@pytest.fixture
def run_query(store):
    return lambda name, **params: store.query(saved_query(name), params)


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "plans.yaml"
    path.write_text(CATALOG)
    return load_catalog(path)


def _profile(profiles, group, metric):
    found = [p for p in profiles if p.group == group and p.metric == metric]
    assert len(found) == 1, (group, metric)
    return found[0]


def _quantiles(profile):
    return [profile.quantiles[50], profile.quantiles[75], profile.quantiles[90], profile.max]


def test_period_totals_give_each_customer_the_usage_its_invoice_reads(run_query):
    """customer_period_totals.sql is invoice_usage.sql for every customer at once; they must not drift."""
    from meterstream.billing import period_usage_from_aggregates

    usages = advisor.period_usages(advisor.rows_by_customer(run_query, PERIOD), PERIOD)
    assert sorted(usages) == ["c1", "c2", "c3", "c4", "c5", "c6"]
    for customer, usage in usages.items():
        rows = run_query("invoice_usage", customer=customer, period=PERIOD, late_until="").dicts()
        assert usage == period_usage_from_aggregates(customer, PERIOD, rows), customer
    assert usages["c1"].credits == 10_000  # e1 and e2 were written twice; FINAL counts them once


def test_usage_profiles_by_plan_match_hand_computed_nearest_ranks(run_query, catalog):
    profiles = advisor.profiles_from_store(run_query, PERIOD, advisor.plan_grouping(catalog))
    assert {p.group for p in profiles} == {"(all)", "growth", "starter"}
    # growth, n = 5: ranks ceil(.5*5)=3, ceil(.75*5)=4, ceil(.9*5)=5.
    credits = _profile(profiles, "growth", "usage_credits")  # 10k 20k 40k 60k 100k
    assert (credits.customers, credits.using) == (5, 5)
    assert _quantiles(credits) == [40_000, 60_000, 100_000, 100_000]
    # input + output tokens: 10k 20k 40k 50k 80k
    assert _quantiles(_profile(profiles, "growth", "tokens")) == [40_000, 50_000, 80_000, 80_000]
    # gpt-4o tokens; c3 used only gpt-4o-mini and counts as 0: 0 10k 20k 50k 80k
    gpt4o = _profile(profiles, "growth", "tokens:gpt-4o")
    assert (gpt4o.customers, gpt4o.using) == (5, 4)
    assert _quantiles(gpt4o) == [20_000, 50_000, 80_000, 80_000]
    # requests (c1: 50, counted once although resent) and documents (c4: 5): 0 0 0 0 x
    assert _quantiles(_profile(profiles, "growth", "requests")) == [0, 0, 50, 50]
    assert _quantiles(_profile(profiles, "growth", "documents")) == [0, 0, 5, 5]
    assert _quantiles(_profile(profiles, "growth", "cost_to_serve")) == [200, 300, 500, 500]
    # all six, n = 6: ranks 3, ceil(4.5)=5, ceil(5.4)=6 over 500 10k 20k 40k 60k 100k.
    assert _quantiles(_profile(profiles, "(all)", "usage_credits")) == [20_000, 60_000, 100_000, 100_000]
    # outcomes net of reversals: c6 has 2 - 1 = 1, everyone else 0.
    tickets = _profile(profiles, "(all)", "outcomes:resolved_ticket")
    assert (tickets.customers, tickets.using) == (6, 1)
    assert _quantiles(tickets) == [0, 0, 1, 1]
    assert _quantiles(_profile(profiles, "starter", "usage_credits")) == [500, 500, 500, 500]
    assert not [p for p in profiles if p.group == "growth" and p.metric.startswith("outcomes")]
    assert all(isinstance(v, Decimal) for p in profiles for v in p.quantiles.values())


def test_usage_profiles_by_first_seen_month(run_query):
    cohorts = advisor.first_periods(run_query, PERIOD)
    assert cohorts == {"c1": "2025-09", "c2": "2025-09", "c3": PERIOD, "c4": PERIOD, "c5": PERIOD, "c6": PERIOD}
    profiles = advisor.profiles_from_store(run_query, PERIOD, advisor.cohort_grouping(cohorts))
    # 2025-09 cohort, October credits 10k 20k (n=2: ranks 1, 2, 2); 2025-10: 500 40k 60k 100k (ranks 2, 3, 4).
    assert _quantiles(_profile(profiles, "2025-09", "usage_credits")) == [10_000, 20_000, 20_000, 20_000]
    assert _quantiles(_profile(profiles, "2025-10", "usage_credits")) == [40_000, 60_000, 100_000, 100_000]


def test_advisor_replays_the_period_as_computed_by_hand(run_query, catalog):
    advice = advisor.advice_from_store(run_query, catalog, PERIOD, plan_id="growth", percentile="75")
    # c6 is on starter in the catalog, so growth's customers are c1..c5.
    assert [r.customer_id for r in advice.rows] == ["c1", "c2", "c3", "c4", "c5"]
    assert advice.plan_version == "growth-test-1"
    # Within 30,000 included: 10k and 20k.
    assert advice.within_allowance == 2
    assert [r.within_allowance for r in advice.rows] == [True, True, False, False, False]
    # Revenue = 100 + 0.01 x (credits - 30,000) above the allowance:
    # 100, 100, 100 + 100 = 200, 100 + 300 = 400, 100 + 700 = 800.
    assert [r.revenue for r in advice.rows] == [100, 100, 200, 400, 800]
    assert [r.overage_credits for r in advice.rows] == [0, 0, 10_000, 30_000, 70_000]
    # Cost 0.005 per credit: 50, 100, 200, 300, 500; margin 50, 0, 0, 100, 300.
    assert [r.cost_to_serve for r in advice.rows] == [50, 100, 200, 300, 500]
    assert [r.margin for r in advice.rows] == [50, 0, 0, 100, 300]
    assert (advice.revenue, advice.cost_to_serve, advice.margin) == (1600, 1150, 450)
    # p75 by nearest rank: rank ceil(0.75 x 5) = 4 -> 60,000, which keeps 4 of 5 within.
    assert advice.allowance_at_percentile == 60_000
    assert advice.within_at_percentile == 4
    assert advice.credit_quantiles == {50: 40_000, 75: 60_000, 90: 100_000}
    body = advice.to_json()
    assert body["totals"] == {"revenue": "1600.00", "cost_to_serve": "1150.00", "margin": "450.00"}
    assert body["allowance_at_percentile"] == "60000"


def test_advisor_overrides_allowance_and_overage_rate(run_query, catalog):
    advice = advisor.advice_from_store(run_query, catalog, PERIOD, included="50000", overage_rate="0.02")
    assert advice.plan_id == "growth"  # the catalog's default plan
    assert advice.overrides == {"included": "50000", "overage rate": "0.02"}
    # Within 50,000: 10k 20k 40k. Revenue 100, 100, 100, 100 + 0.02 x 10,000 = 300, 100 + 0.02 x 50,000 = 1,100.
    assert advice.within_allowance == 3
    assert [r.revenue for r in advice.rows] == [100, 100, 100, 300, 1100]
    assert advice.revenue == 1700
    assert advice.margin == 1700 - 1150


def test_advisor_prices_outcomes_with_the_candidate_plan(run_query, catalog):
    advice = advisor.advice_from_store(run_query, catalog, PERIOD, plan_id="starter", all_customers=True,
                                       percentile="50")  # fmt: skip
    # Starter: included 1,000, then 0.02 per credit; c6 also has (2 - 1) tickets at 1.50.
    # c1 9,000 x 0.02 = 180; c2 19,000 -> 380; c3 39,000 -> 780; c4 59,000 -> 1,180; c5 99,000 -> 1,980; c6 1.50.
    assert [r.revenue for r in advice.rows] == [D("180"), D("380"), D("780"), D("1180"), D("1980"), D("1.50")]
    assert advice.revenue == D("4501.50")
    assert advice.cost_to_serve == D("1152.50")
    assert advice.within_allowance == 1
    # p50 of 500 10k 20k 40k 60k 100k: rank 3 -> 20,000, 3 of 6 within.
    assert (advice.allowance_at_percentile, advice.within_at_percentile) == (20_000, 3)


def test_advisor_chart_is_a_png(run_query, catalog, tmp_path):
    advice = advisor.advice_from_store(run_query, catalog, PERIOD, plan_id="growth")
    path = advisor.write_advice_chart(advice, tmp_path / "charts" / "advice.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1430, 616)  # 13 x 5.6 inches at 110 dpi
    assert 20_000 < len(data) < 2_000_000


@pytest.fixture
def cli(clickhouse, store, monkeypatch):
    """Run `meterstream` in this process against the test's database (chDB: one directory per process)."""
    from meterstream.cli import app

    monkeypatch.setenv("METERSTREAM_CLICKHOUSE__DSN", clickhouse.dsn.get_secret_value())
    monkeypatch.setenv("METERSTREAM_CLICKHOUSE__DATABASE", clickhouse.database)
    monkeypatch.setenv("COLUMNS", "200")
    get_settings.cache_clear()
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, list(args), catch_exceptions=False)
    get_settings.cache_clear()


def test_cli_advise_and_profile(cli, tmp_path):
    plans = tmp_path / "plans.yaml"
    plans.write_text(CATALOG)
    png = tmp_path / "advice.png"
    result = cli("advise", "--period", PERIOD, "--plan", str(plans), "--plan-id", "growth", "--percentile", "75",
                 "--png", str(png), "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["within_allowance"] == 2 and body["customers"] == 5
    assert [r["revenue"] for r in body["rows"]] == ["100.00", "100.00", "200.00", "400.00", "800.00"]
    assert body["totals"] == {"revenue": "1600.00", "cost_to_serve": "1150.00", "margin": "450.00"}
    assert body["allowance_at_percentile"] == "60000"
    assert png.read_bytes()[:4] == b"\x89PNG"

    table = cli("advise", "--period", PERIOD, "--plan", str(plans), "--included", "50000")
    assert table.exit_code == 0, table.output
    assert "Within the allowance of 50,000 credits: 3 of 5 customers" in table.stdout
    assert "Allowance at p75: 60,000 credits (4 of 5 customers within)" in table.stdout

    profile = cli("profile", "--period", PERIOD, "--plans", str(plans), "--json")
    assert profile.exit_code == 0, profile.output
    rows = json.loads(profile.stdout)
    assert rows["quantile_method"] == "nearest-rank"
    growth = next(p for p in rows["profiles"] if p["group"] == "growth" and p["metric"] == "usage_credits")
    assert (growth["p50"], growth["p75"], growth["p90"]) == ("40000", "60000", "100000")
    cohorts = cli("profile", "--period", PERIOD, "--by", "cohort")
    assert cohorts.exit_code == 0, cohorts.output
    assert "2025-09" in cohorts.stdout

    missing = cli("advise", "--period", PERIOD, "--plan", str(plans), "--plan-id", "nope")
    assert missing.exit_code == 1
    assert "unknown plan 'nope'" in missing.output
