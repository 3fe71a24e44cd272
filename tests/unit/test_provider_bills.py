"""Provider-bill reconciliation: reading the documented export shapes, and the comparison (no processes).

The metered side is the example's events rated by the pricing engine, summed the way
sql/queries/provider_daily_usage.sql sums the stored rows (the integration test runs that query).
"""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from meterstream.billing import rate_events, read_events
from meterstream.ops import provider_bills as pb
from meterstream.pricing.plans import load_catalog

ROOT = Path(__file__).resolve().parents[2]
BILLS = ROOT / "examples" / "provider-bills"
FILES = sorted(BILLS.glob("*-2026-10.json"))
CATALOG = load_catalog(ROOT / "meterstream" / "data" / "plans.yaml")


def _metered_rows():
    events, bad = read_events(BILLS / "events.jsonl")
    rated, errors = rate_events(CATALOG, events)
    assert not bad and not errors
    sums = defaultdict(lambda: {"events": 0, "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0,
                                "cost_to_serve": Decimal(0)})  # fmt: skip
    for r in rated:
        row = sums[(r.provider, r.model, r.occurred_at.date().isoformat(), r.price_book_version)]
        row["events"] += 1
        row["input_tokens"] += r.input_tokens
        row["cached_input_tokens"] += r.cached_input_tokens
        row["output_tokens"] += r.output_tokens
        row["cost_to_serve"] += r.cost_to_serve
    return [{"provider": p, "model": m, "day": d, "price_book_version": v, **s} for (p, m, d, v), s in sums.items()]


def test_the_four_exports_are_recognised_and_read_as_documented():
    bills = pb.read_bills(FILES)
    assert sorted(kind for _, kind in bills.files) == ["anthropic_costs", "anthropic_usage", "openai_costs", "openai_usage"]
    gpt4o = bills.days[("openai", "gpt-4o", "2026-10-05")]  # snapshot suffix dropped
    assert (gpt4o.input_tokens, gpt4o.cached_input_tokens, gpt4o.output_tokens, gpt4o.requests) == (30000, 10000, 6000, 2)
    assert gpt4o.cost == Decimal("0.1225") and isinstance(gpt4o.cost, Decimal)  # JSON numbers never became floats
    sonnet = bills.days[("anthropic", "claude-sonnet-4-5", "2026-10-07")]
    # uncached 1,000 + cache writes 1,000 + cache reads 8,000 = input 10,000, of which 8,000 cached
    assert (sonnet.input_tokens, sonnet.cached_input_tokens, sonnet.output_tokens) == (10000, 8000, 2000)
    assert sonnet.cost == Decimal("0.03915")  # 3.915 cents
    assert bills.days[("anthropic", "(other: web_search)", "2026-10-07")].cost == Decimal("0.01")
    assert bills.currencies == {"USD"}


def test_gaps_unmetered_traffic_and_price_drift_are_flagged():
    result = pb.reconcile("2026-10", pb.metered_from_rows(_metered_rows()), pb.read_bills(FILES), CATALOG)
    rows = {(r.provider, r.model, r.day): r for r in result.rows}
    assert {k: r.flags for k, r in rows.items()} == {
        ("openai", "gpt-4o", "2026-10-05"): [],
        ("openai", "gpt-4o-mini", "2026-10-06"): ["unmetered", "cost_gap"],
        ("anthropic", "claude-sonnet-4-5", "2026-10-07"): ["cost_gap", "price_drift"],
        ("anthropic", "(other: web_search)", "2026-10-07"): ["cost_gap"],
        ("anthropic", "claude-haiku-4-5", "2026-10-08"): ["over_metered", "cost_gap"],
    }
    matched = rows[("openai", "gpt-4o", "2026-10-05")]
    assert matched.metered.cost_to_serve == matched.billed.cost == matched.priced_billed_tokens == Decimal("0.1225")
    mini = rows[("openai", "gpt-4o-mini", "2026-10-06")]
    assert mini.token_gap == 5500 and mini.cost_gap == Decimal("0.00105") and mini.drift == 0
    # same tokens, priced differently: Anthropic bills cache writes at 1.25x, our table at the input rate
    sonnet = rows[("anthropic", "claude-sonnet-4-5", "2026-10-07")]
    assert sonnet.token_gap == 0
    assert sonnet.priced_billed_tokens == Decimal("0.0384") and sonnet.drift == Decimal("0.00075")
    haiku = rows[("anthropic", "claude-haiku-4-5", "2026-10-08")]
    assert (haiku.billed_tokens, haiku.token_gap) == (0, -5500)
    data = json.loads(json.dumps(result.to_json()))
    assert data["flagged"] == 4
    assert {t["provider"]: t["billed_cost"] for t in data["totals"]} == {"anthropic": "0.04915", "openai": "0.12565"}


def test_a_threshold_above_the_drift_clears_it():
    result = pb.reconcile("2026-10", pb.metered_from_rows(_metered_rows()), pb.read_bills(FILES), CATALOG,
                          threshold_percent=Decimal(2))  # fmt: skip
    sonnet = next(r for r in result.rows if r.model == "claude-sonnet-4-5")
    assert sonnet.flags == []  # 0.00075 of 0.03915 is 1.92%


def test_bad_files_name_the_place(tmp_path):
    bad = tmp_path / "usage.json"
    bad.write_text(json.dumps({"object": "page", "data": [{"start_time": 1791158400, "results": [
        {"object": "organization.usage.completions.result", "input_tokens": -1, "model": "gpt-4o"}]}]}))  # fmt: skip
    with pytest.raises(pb.BillFileError, match=r"usage.json: data\[0\].results\[0\].input_tokens"):
        pb.read_bills([bad])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"data": [{"results": [{"foo": 1}]}]}))
    with pytest.raises(pb.BillFileError, match="not an OpenAI/Anthropic"):
        pb.read_bills([other])


def test_model_names_lose_their_snapshot_date_unless_aliased():
    assert pb.normalise_model("gpt-4o-2024-08-06") == "gpt-4o"
    assert pb.normalise_model("claude-haiku-4-5-20251001") == "claude-haiku-4-5"
    assert pb.normalise_model("gpt-5") == "gpt-5"
    assert pb.normalise_model("ft:gpt-4o:acme", {"ft:gpt-4o:acme": "gpt-4o"}) == "gpt-4o"
