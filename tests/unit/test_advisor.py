"""Quantiles, usage profiles and the threshold advisor without a store: hand-computed figures and properties."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream import advisor
from meterstream.advisor import AdvisorError, nearest_rank
from meterstream.pricing.invoice import PeriodUsage
from meterstream.pricing.plans import parse_catalog

D = Decimal
PERIOD = "2025-10"
CREDITS = [D(10_000), D(20_000), D(40_000), D(60_000), D(100_000)]


def _catalog(**growth: object):
    version = {"version": "growth-1", "effective_from": "2025-01-01", "base_fee": "100", "included_credits": "30000",
               "overage": {"model": "per_unit", "unit_price": "0.01"}, **growth}  # fmt: skip
    later = {"version": "growth-2", "effective_from": "2025-12-01", "base_fee": "200",
             "overage": {"model": "per_unit", "unit_price": "0.02"}}  # fmt: skip
    launch = {"version": "scale-1", "effective_from": "2026-03-01", "base_fee": "900",
              "overage": {"model": "per_unit", "unit_price": "0.005"}}  # fmt: skip
    plans = {
        "growth": {"versions": [version, later]},
        "scale": {"versions": [launch]},
        "starter": {"versions": [{**later, "version": "starter-1"}]},
    }
    # s1 has a discount and free credits on its own plan; a replay ignores both.
    s1 = {"plan": "starter", "discount_percent": "50", "grants": [{"kind": "free", "credits": "100000", "granted_on": "2025-01-01"}]}
    return parse_catalog({"default_plan": "growth", "plans": plans, "customers": {"s1": s1}})


# -- nearest rank --------------------------------------------------------------------------------


def test_nearest_rank_by_hand():
    # n = 5: rank = ceil(p/100 x 5): p50 -> 3, p75 -> 4, p90 -> 5, p20 -> 1, p21 -> 2, p100 -> 5.
    assert nearest_rank(CREDITS, 50) == 40_000
    assert nearest_rank(CREDITS, 75) == 60_000
    assert nearest_rank(CREDITS, 90) == 100_000
    assert nearest_rank(CREDITS, 20) == 10_000
    assert nearest_rank(CREDITS, "20.0001") == 20_000
    assert nearest_rank(CREDITS, 100) == 100_000
    assert nearest_rank(CREDITS, "0.001") == 10_000
    assert nearest_rank(reversed(CREDITS), 50) == 40_000  # order of input does not matter
    # n = 4: p50 -> rank 2 (no averaging of the two middle values), p75 -> rank 3.
    assert nearest_rank([D(1), D(2), D(3), D(4)], 50) == 2
    assert nearest_rank([D(1), D(2), D(3), D(4)], 75) == 3
    assert nearest_rank([D("7.25")], 90) == D("7.25")


@pytest.mark.parametrize("bad", [0, -1, "100.01", "abc", "NaN", "Infinity"])
def test_percentile_must_be_in_0_100(bad):
    with pytest.raises(AdvisorError, match="percentile"):
        nearest_rank(CREDITS, bad)


def test_no_values_have_no_percentile():
    with pytest.raises(AdvisorError, match="no values"):
        nearest_rank([], 50)


amounts = st.decimals(min_value=-1000, max_value=10**9, places=3, allow_nan=False, allow_infinity=False)
percentiles = st.decimals(min_value=D("0.001"), max_value=100, places=3)


@given(st.lists(amounts, min_size=1, max_size=60), percentiles)
def test_an_allowance_at_the_pth_percentile_keeps_at_least_p_percent_within(values, p):
    allowance = nearest_rank(values, p)
    assert allowance in values
    within = advisor.share_within(values, allowance)
    assert within * 100 >= p * len(values)
    # ...and it is the smallest such value: any lower allowance keeps fewer than p%.
    for lower in (v for v in values if v < allowance):
        assert advisor.share_within(values, lower) * 100 < p * len(values)


@given(st.lists(amounts, min_size=1, max_size=40), percentiles, percentiles)
def test_percentiles_are_monotone(values, p, q):
    low, high = sorted((p, q))
    assert nearest_rank(values, low) <= nearest_rank(values, high)


# -- metrics and profiles ------------------------------------------------------------------------


def _agg(kind="usage", meter="tokens", model="", *, events=1, credits="0", cost="0", inp=0, out=0, qty="0",
         max_qty="0", outcome_type="", reversal=False, version="growth-1"):  # fmt: skip
    return {"kind": kind, "meter": meter, "model": model, "outcome_type": outcome_type,
            "attribution": "ai_only" if kind == "outcome" else "", "plan_version": version, "is_reversal": reversal,
            "events": events, "credits": D(credits), "cost_to_serve": D(cost), "input_tokens": inp,
            "cached_input_tokens": 0, "output_tokens": out, "total_quantity": D(qty),
            "max_quantity": D(max_qty), "sum_quantity": D(qty)}  # fmt: skip


def test_customer_metrics_from_aggregate_rows():
    rows = [
        _agg(model="gpt-4o", credits="10.5", cost="1.25", inp=1000, out=200),
        _agg(model="gpt-4o", credits="1", cost="0.25", inp=100, out=0, version="growth-0"),  # another plan version
        _agg(model="gpt-4o-mini", credits="2", inp=50, out=50),
        _agg(meter="requests", credits="0.3", qty="30", max_qty="1", events=30),
        _agg(meter="seats", qty="12", max_qty="5", events=3),
        _agg(kind="outcome", meter="", outcome_type="resolved_ticket", events=4, credits="360", cost="0.5"),
        _agg(kind="outcome", meter="", outcome_type="resolved_ticket", events=1, reversal=True),
    ]
    assert advisor.customer_metrics(rows) == {
        "usage_credits": D("13.8"),  # usage only: 10.5 + 1 + 2 + 0.3
        "cost_to_serve": D("2.0"),  # 1.25 + 0.25 + 0.5
        "tokens": D(1400),  # 1200 + 100 + 100
        "tokens:gpt-4o": D(1300),
        "tokens:gpt-4o-mini": D(100),
        "requests": D(30),
        "seats": D(5),  # the period's maximum, as billed
        "outcomes:resolved_ticket": D(3),  # 4 - 1 reversal
    }
    assert list(advisor.customer_metrics(rows))[:3] == ["usage_credits", "cost_to_serve", "tokens"]


def test_profiles_count_a_missing_meter_as_zero_and_add_an_all_group():
    totals = {
        "a": {"usage_credits": D(10), "documents": D(4)},
        "b": {"usage_credits": D(30)},
        "c": {"usage_credits": D(20)},
        "d": {"usage_credits": D(99)},
    }
    profiles = advisor.usage_profiles(totals, lambda c: "x" if c in "abc" else "y")
    by_key = {(p.group, p.metric): p for p in profiles}
    assert [g for g, _ in by_key] == ["(all)", "(all)", "x", "x", "y"]
    docs = by_key[("x", "documents")]  # 0 0 4 over a, b, c: ranks 2, 3, 3
    assert (docs.customers, docs.using, docs.quantiles, docs.max) == (3, 1, {50: 0, 75: 4, 90: 4}, 4)
    assert by_key[("(all)", "usage_credits")].quantiles == {50: 20, 75: 30, 90: 99}  # 10 20 30 99: ranks 2, 3, 4
    assert by_key[("x", "usage_credits")].to_json() == {"group": "x", "metric": "usage_credits", "customers": 3, "using": 3,
                                                 "p50": "20", "p75": "30", "p90": "30", "max": "30"}  # fmt: skip
    one_group = advisor.usage_profiles(totals, lambda c: "everyone")
    assert {p.group for p in one_group} == {"everyone"}


def test_plan_and_cohort_grouping(tmp_path):
    catalog = _catalog()
    group = advisor.plan_grouping(catalog)
    assert (group("s1"), group("anyone")) == ("starter", "growth")
    only = {"version": "p-1", "effective_from": "2025-01-01", "overage": {"model": "per_unit", "unit_price": "0"}}
    no_default = parse_catalog({"plans": {"p": {"versions": [only]}}})
    assert advisor.plan_grouping(no_default)("anyone") == "(no plan)"
    cohorts = tmp_path / "cohorts.yaml"
    cohorts.write_text("acme: enterprise\nglobex: smb\n")
    group = advisor.cohort_grouping(advisor.load_cohorts(cohorts))
    assert (group("acme"), group("globex"), group("other")) == ("enterprise", "smb", "(no cohort)")
    cohorts.write_text("- just a list\n")
    with pytest.raises(AdvisorError, match="must map each customer_id"):
        advisor.load_cohorts(cohorts)
    with pytest.raises(AdvisorError, match="cannot read"):
        advisor.load_cohorts(tmp_path / "missing.yaml")


# -- the advisor ---------------------------------------------------------------------------------


def test_candidate_version_choice_and_overrides():
    catalog = _catalog()
    # In effect at the period start.
    assert advisor.candidate_version(catalog, "growth", PERIOD).version == "growth-1"
    assert advisor.candidate_version(catalog, "growth", "2026-01").version == "growth-2"
    # A plan that starts after the period (a new design): its first version, made effective for the period.
    scale = advisor.candidate_version(catalog, "scale", PERIOD)
    assert (scale.version, scale.effective_from) == ("scale-1", date(2025, 10, 1))
    named = advisor.candidate_version(
        catalog, "growth", PERIOD, version="growth-2", included=D(5), overage_rate=D("0.3")
    )
    assert (named.version, named.base_fee, named.included_credits) == ("growth-2", 200, 5)
    assert (named.overage.model, named.overage.unit_price) == ("per_unit", D("0.3"))
    with pytest.raises(AdvisorError, match="unknown plan 'nope'; plans: growth, scale, starter"):
        advisor.candidate_version(catalog, "nope", PERIOD)
    with pytest.raises(AdvisorError, match="no version 'growth-9'"):
        advisor.candidate_version(catalog, "growth", PERIOD, version="growth-9")
    with pytest.raises(AdvisorError, match="non-negative"):
        advisor.candidate_version(catalog, "growth", PERIOD, included=D(-1))
    with pytest.raises(AdvisorError, match="overage rate must be a number"):
        advisor.parse_amount("ten", "overage rate")


def _usages(credits, costs=None):
    costs = costs or [c * D("0.005") for c in credits]
    return {f"c{i + 1}": PeriodUsage(customer_id=f"c{i + 1}", period=PERIOD, credits=c, cost_to_serve=k)
            for i, (c, k) in enumerate(zip(credits, costs, strict=True))}  # fmt: skip


def test_replay_of_the_hand_computed_example():
    catalog = _catalog()
    version = advisor.candidate_version(catalog, "growth", PERIOD)
    advice = advisor.replay_period(_usages(CREDITS), catalog, "growth", version, PERIOD, percentile=75)
    # Base 100, includes 30,000, then 0.01 per credit.
    assert [r.revenue for r in advice.rows] == [100, 100, 200, 400, 800]
    assert advice.within_allowance == 2
    assert [r.cost_to_serve for r in advice.rows] == [50, 100, 200, 300, 500]
    assert (advice.revenue, advice.cost_to_serve, advice.margin) == (1600, 1150, 450)
    assert (advice.allowance_at_percentile, advice.within_at_percentile) == (60_000, 4)
    lines = advisor.advice_summary(advice)
    assert lines[0] == "Within the allowance of 30,000 credits: 2 of 5 customers"
    assert lines[2] == "Allowance at p75: 60,000 credits (4 of 5 customers within)"


def test_replay_is_at_list_price_without_the_customers_discount_or_grants():
    catalog = _catalog()
    version = advisor.candidate_version(catalog, "growth", PERIOD)
    usage = {"s1": PeriodUsage(customer_id="s1", period=PERIOD, credits=D(40_000))}
    advice = advisor.replay_period(usage, catalog, "growth", version, PERIOD)
    # s1 has 50% off and 100,000 free credits on its own plan; the candidate bills 100 + 10,000 x 0.01.
    assert advice.rows[0].revenue == 200


def test_replay_needs_customers():
    catalog = _catalog()
    with pytest.raises(AdvisorError, match="no customers"):
        advisor.replay_period({}, catalog, "growth", catalog.plans["growth"].versions[0], PERIOD)


@given(
    st.lists(st.decimals(min_value=0, max_value=10**7, places=2), min_size=1, max_size=25),
    st.decimals(min_value=0, max_value=10**6, places=0),
    st.decimals(min_value=0, max_value=1, places=4),
)
def test_replayed_revenue_is_base_plus_rate_times_credits_over_the_allowance(credits, included, rate):
    catalog = _catalog()
    version = advisor.candidate_version(catalog, "growth", PERIOD, included=included, overage_rate=rate)
    usages = _usages(credits)
    advice = advisor.replay_period(usages, catalog, "growth", version, PERIOD)
    assert [r.customer_id for r in advice.rows] == sorted(usages)
    for row in advice.rows:
        used = usages[row.customer_id].credits
        over = max(used - included, D(0))
        assert row.revenue == D(100) + (over * rate).quantize(D("0.01"), rounding="ROUND_HALF_UP")
        assert row.within_allowance == (used <= included)
    assert advice.within_allowance == sum(1 for c in credits if c <= included)
    assert advice.revenue == sum((r.revenue for r in advice.rows), D(0))


def test_the_chart_stays_readable_with_one_heavy_customer():
    """24 customers of 1-10k credits and one of 2M: log credit axis, the heavy bar cut and labelled."""
    from pathlib import Path

    from meterstream import advisor as adv
    from meterstream.pricing.charges import ChargeModel

    def row(customer: str, credits: int) -> adv.ReplayRow:
        revenue = Decimal(400) + max(Decimal(credits) - 40_000, Decimal(0)) * Decimal("0.015")
        return adv.ReplayRow(customer, Decimal(credits), max(Decimal(credits) - 40_000, Decimal(0)), revenue,
                             Decimal(credits) * Decimal("0.004"), credits <= 40_000, invoice=None)  # type: ignore[arg-type]

    rows = tuple(row(f"tenant-{i:02d}", 1_000 + 400 * i) for i in range(24)) + (row("tenant-heavy", 2_000_000),)
    advice = adv.Advice(period="2026-10", plan_id="growth", plan_version="growth-2026-01", currency="USD",
                        base_fee=Decimal(400), included_credits=Decimal(40_000),
                        overage=ChargeModel(model="per_unit", unit_price=Decimal("0.015")), overrides={},
                        percentile=Decimal(75), rows=rows)  # fmt: skip
    scales = adv.chart_scales(advice)
    assert scales.log_credits and scales.clipped == ("tenant-heavy",)
    assert scales.bar_top == pytest.approx(400 * 1.25)  # the next highest bar (400) fits, with room
    even = adv.Advice(**{**advice.__dict__, "rows": rows[:24]})
    assert adv.chart_scales(even) == adv.ChartScales(False, None, ())
    # Kept for a look (git-ignored): tests/artifacts/advisor-heavy-customer.png
    artifacts = Path(__file__).resolve().parents[1] / "artifacts"
    path = adv.write_advice_chart(advice, artifacts / "advisor-heavy-customer.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
