"""Plan catalogs: loading, validation errors that name the field, and which version applies when."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.pricing.plans import (
    Catalog,
    CatalogError,
    CreditGrant,
    GrantKind,
    PlanError,
    UnknownCustomerError,
    load_catalog,
    parse_catalog,
    period_bounds,
)
from meterstream.schemas.events import UsageEvent

D = Decimal
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plans.yaml"


def _book(input_credits: str, output_credits: str) -> dict[str, Any]:
    return {
        "models": {
            "large-model": {
                "provider": "example",
                "credits_per_1k": {"input": input_credits, "output": output_credits},
                "cost_per_1m": {"input": "2.50", "output": "10.00"},
            }
        },
        "outcomes": {"resolved_ticket": {"ai_only": "90"}},
    }


#: A plan with a price change on 2025-03-15 (mid-month): the credit rate doubles.
CATALOG: dict[str, Any] = {
    "currency": "USD",
    "plans": {
        "growth": {
            "versions": [
                {
                    "version": "growth-2025-01",
                    "effective_from": "2025-01-01",
                    "price_book": _book("0.25", "1.0"),
                    "base_fee": "500",
                    "included_credits": "50000",
                    "overage": {
                        "model": "graduated",
                        "tiers": [{"up_to": "100000", "unit_price": "0.012"}, {"up_to": None, "unit_price": "0.010"}],
                    },
                },
                {
                    "version": "growth-2025-03-15",
                    "effective_from": "2025-03-15",
                    "price_book": _book("0.5", "2.0"),
                    "base_fee": "600",
                    "overage": {"model": "per_unit", "unit_price": "0.02"},
                },
            ]
        },
        "basic": {
            "versions": [
                {
                    "version": "basic-1",
                    "effective_from": "2025-01-01",
                    "overage": {"model": "per_unit", "unit_price": "1"},
                }
            ]
        },
    },
    # Immediate: a price change applies from its date, to the events and (prorated) to the period charges.
    "customers": {"acme": {"plan": "growth", "change_rule": "immediate"}},
}


def catalog_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(CATALOG)
    data.update(changes)
    return data


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return parse_catalog(CATALOG)


def _error_lines(data: Any, **kwargs: Any) -> str:
    with pytest.raises(CatalogError) as info:
        parse_catalog(data, source="plans.yaml", **kwargs)
    return str(info.value)


# --- the example catalog --------------------------------------------------------------------------


def test_example_catalog_loads() -> None:
    catalog = load_catalog(EXAMPLE)
    assert set(catalog.plans) == {"starter", "growth", "enterprise"}
    assert catalog.default_plan == "starter"
    growth = catalog.plans["growth"]
    assert [v.version for v in growth.versions] == ["growth-2026-01", "growth-2026-11"]
    # The price book records the plan version, and 'default' is the shipped book.
    assert growth.versions[1].price_book.version == "growth-2026-11"
    assert "gpt-4o" in growth.versions[1].price_book.models
    assert catalog.customers["acme"].discount_percent == D(10)
    assert [g.id for g in catalog.customers["acme"].grants] == ["acme-welcome", "acme-prepaid-2026"]
    enterprise = catalog.plans["enterprise"].versions[0]
    assert enterprise.minimum_commitment == D(10000) and enterprise.overage.model == "volume"


def test_example_catalog_matches_the_pricing_md_hybrid_plan() -> None:
    version = load_catalog(EXAMPLE).period_version("acme", "2026-11")
    assert (version.base_fee, version.included_credits) == (D(500), D(50000))
    assert version.overage.charge(D(130000)).amount == D("1500.000")


def test_example_catalog_price_change_applies_from_its_month() -> None:
    catalog = load_catalog(EXAMPLE)
    assert catalog.period_version("acme", "2026-10").version == "growth-2026-01"
    assert catalog.period_version("acme", "2026-11").version == "growth-2026-11"
    # Customers not listed get the default (free) plan.
    assert catalog.period_version("someone-new", "2026-11").version == "starter-2026-01"


# --- version selection -----------------------------------------------------------------------------


def test_version_for_picks_the_version_in_effect(catalog: Catalog) -> None:
    assert catalog.version_for("acme", utc(2025, 3, 14, 23, 59, 59)).version == "growth-2025-01"
    assert catalog.version_for("acme", utc(2025, 3, 15)).version == "growth-2025-03-15"
    assert catalog.version_for("acme", utc(2026, 1, 1)).version == "growth-2025-03-15"


def test_effective_dates_are_utc(catalog: Catalog) -> None:
    # 23:30 on the 14th in UTC-2 is 01:30 on the 15th in UTC.
    at = datetime(2025, 3, 14, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    assert catalog.version_for("acme", at).version == "growth-2025-03-15"


def test_version_for_needs_an_aware_datetime(catalog: Catalog) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        catalog.version_for("acme", datetime(2025, 3, 20))


def test_no_version_before_the_first_one(catalog: Catalog) -> None:
    with pytest.raises(PlanError, match="no version in effect"):
        catalog.version_for("acme", utc(2024, 12, 31))


def test_period_charges_use_the_version_at_the_period_start(catalog: Catalog) -> None:
    # The March price change is mid-month: March keeps the old version, April gets the new one.
    assert catalog.period_version("acme", "2025-03").version == "growth-2025-01"
    assert catalog.period_version("acme", "2025-04").version == "growth-2025-03-15"


def test_a_plan_launched_mid_period_bills_that_period_on_its_first_version() -> None:
    data = catalog_with()
    data["plans"]["growth"]["versions"] = data["plans"]["growth"]["versions"][1:]
    catalog = parse_catalog(data)
    assert catalog.period_version("acme", "2025-03").version == "growth-2025-03-15"
    with pytest.raises(PlanError, match="no version"):
        catalog.period_version("acme", "2025-02")


def test_events_are_rated_with_the_rate_card_in_effect_when_they_occurred(
    catalog: Catalog, make_usage: Callable[..., UsageEvent]
) -> None:
    before = catalog.rate(make_usage(event_id="e1", occurred_at=utc(2025, 3, 10)))
    after = catalog.rate(make_usage(event_id="e2", occurred_at=utc(2025, 3, 20)))
    # 12,000 input + 3,000 output tokens: 3 + 3 credits on the old card, 6 + 6 on the new one.
    assert (before.credits, before.price_book_version) == (D(6), "growth-2025-01")
    assert (after.credits, after.price_book_version) == (D(12), "growth-2025-03-15")


def test_with_next_period_a_change_applies_to_events_and_charges_from_the_next_period(
    make_usage: Callable[..., UsageEvent],
) -> None:
    data = catalog_with()
    data["customers"]["acme"]["change_rule"] = "next_period"
    catalog = parse_catalog(data)
    after = catalog.rate(make_usage(event_id="e2", occurred_at=utc(2025, 3, 20)))
    assert (after.credits, after.price_book_version) == (D(6), "growth-2025-01")
    assert catalog.version_for("acme", utc(2025, 4, 1)).version == "growth-2025-03-15"
    assert [s.version.version for s in catalog.segments("acme", "2025-03")] == ["growth-2025-01"]


def test_assignment_changes_subscription_start_and_cancellation_cut_the_period() -> None:
    data = catalog_with()
    data["customers"]["acme"] = {
        "plan": "basic", "change_rule": "immediate", "effective_from": "2025-02-10", "cancelled_from": "2025-04-20",
        "changes": [{"effective_from": "2025-03-05", "plan": "growth", "discount_percent": "10"}],
    }  # fmt: skip
    catalog = parse_catalog(data)
    assert catalog.segments("acme", "2025-01") == ()
    feb = catalog.segments("acme", "2025-02")
    assert [(s.start.day, s.days, s.plan_id) for s in feb] == [(10, 19, "basic")]
    march = catalog.segments("acme", "2025-03")
    assert [(s.start.day, s.days, s.version.version, s.discount_percent) for s in march] == [
        (1, 4, "basic-1", D(0)), (5, 10, "growth-2025-01", D(10)), (15, 17, "growth-2025-03-15", D(10)),
    ]  # fmt: skip
    assert [(s.start.day, s.days) for s in catalog.segments("acme", "2025-04")] == [(1, 19)]
    with pytest.raises(PlanError, match="no plan version in effect"):
        catalog.version_for("acme", utc(2025, 4, 25))


def test_unknown_customer_without_default_plan_is_a_clear_error(catalog: Catalog) -> None:
    with pytest.raises(UnknownCustomerError, match=r"'nobody' is not in the plan catalog.*no default_plan"):
        catalog.version_for("nobody", utc(2025, 3, 20))


def test_default_plan_applies_to_unlisted_customers() -> None:
    catalog = parse_catalog(catalog_with(default_plan="basic"))
    assert catalog.version_for("nobody", utc(2025, 3, 20)).version == "basic-1"
    assert catalog.customer("nobody").grants == ()
    assert catalog.version_for("acme", utc(2025, 3, 20)).version == "growth-2025-03-15"


def test_period_bounds() -> None:
    assert period_bounds("2025-12") == (utc(2025, 12, 1), utc(2026, 1, 1))
    assert period_bounds("2024-02") == (utc(2024, 2, 1), utc(2024, 3, 1))
    with pytest.raises(ValueError, match="YYYY-MM"):
        period_bounds("2025-13")


# --- price books ---------------------------------------------------------------------------------


def test_price_book_path_is_relative_to_the_catalog_file(tmp_path: Path) -> None:
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "custom.yaml").write_text(
        'version: "file-version"\nmeters: {requests: {credits_per_unit: "0.5"}}\n'
    )
    (tmp_path / "plans.yaml").write_text(
        "plans:\n"
        "  p:\n"
        "    versions:\n"
        "      - {version: p-1, effective_from: '2025-01-01', price_book: books/custom.yaml,\n"
        "         overage: {model: per_unit, unit_price: 0.01}}\n"
    )
    version = load_catalog(tmp_path / "plans.yaml").plans["p"].versions[0]
    assert version.price_book.meters["requests"].credits_per_unit == D("0.5")
    assert version.price_book.version == "p-1"  # rated rows record the plan version
    assert version.overage.unit_price == D("0.01")  # unquoted YAML number, still exact


def test_missing_price_book_file_names_the_field(tmp_path: Path) -> None:
    data = catalog_with()
    data["plans"]["basic"]["versions"][0]["price_book"] = "nope.yaml"
    message = _error_lines(data, base_dir=tmp_path)
    assert "plans.basic.versions[0].price_book: cannot read price book" in message


def test_inline_price_book_errors_name_the_nested_field() -> None:
    data = catalog_with()
    data["plans"]["basic"]["versions"][0]["price_book"] = {"meters": {"requests": {"credits_per_unit": "-1"}}}
    assert "plans.basic.versions[0].price_book.meters.requests.credits_per_unit:" in _error_lines(data)


def test_price_book_currency_must_match_the_catalog() -> None:
    data = catalog_with(currency="EUR")
    message = _error_lines(data)
    assert "plans.growth.versions[0].price_book.currency: price book currency USD differs" in message


# --- validation errors name the file and the field ---------------------------------------------------


def test_tier_error_names_the_tier(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(
        "plans:\n"
        "  growth:\n"
        "    versions:\n"
        "      - version: growth-1\n"
        "        effective_from: '2025-01-01'\n"
        "        overage:\n"
        "          model: graduated\n"
        "          tiers: [{up_to: '100000', unit_price: '0.012'}, {up_to: '90000', unit_price: '0.010'},\n"
        "                  {up_to: null, unit_price: '0.01'}]\n"
    )
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert message.startswith(f"invalid plan catalog {path}:")
    assert "plans.growth.versions[0].overage.tiers[1].up_to: tier bounds must increase strictly" in message


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["plans"]["growth"]["versions"][1].update(effective_from="2024-12-01"),
            "plans.growth.versions[1].effective_from: effective_from 2024-12-01 must be after",
        ),
        (
            lambda d: d["plans"]["growth"]["versions"][1].update(version="growth-2025-01"),
            "plans.growth.versions[1].version: duplicate version growth-2025-01",
        ),
        (
            lambda d: d["plans"]["basic"]["versions"][0].update(version="growth-2025-01"),
            "plans.basic.versions[0].version: version growth-2025-01 is already used by plan growth",
        ),
        (
            lambda d: d["plans"]["growth"]["versions"][0].update(base_fee="-5"),
            "plans.growth.versions[0].base_fee: Input should be greater than or equal to 0",
        ),
        (
            lambda d: d["plans"]["growth"]["versions"][0].update(base_fee="five"),
            "plans.growth.versions[0].base_fee: 'five' is not a number",
        ),
        (
            lambda d: d["plans"]["basic"]["versions"][0].update(overage={"model": "per_unit"}),
            "plans.basic.versions[0].overage.unit_price: required for model per_unit",
        ),
        (
            lambda d: d["plans"]["basic"]["versions"][0].update(overage={"model": "stairs"}),
            "plans.basic.versions[0].overage.model: Input should be",
        ),
        (
            lambda d: d["plans"]["basic"]["versions"][0].update(outcome_prices={"x": {"ai_only": "1", "oops": "2"}}),
            "plans.basic.versions[0].outcome_prices.x.oops: Extra inputs are not permitted",
        ),
        (
            lambda d: d["plans"]["basic"].update(versions=[]),
            "plans.basic.versions: a plan needs at least one version",
        ),
        (lambda d: d["customers"]["acme"].update(plan="platinum"), "customers.acme.plan: unknown plan platinum"),
        (lambda d: d.update(default_plan="platinum"), "default_plan: unknown plan platinum"),
        (
            lambda d: d["customers"]["acme"].update(discount_percent="101"),
            "customers.acme.discount_percent: Input should be less than or equal to 100",
        ),
        (
            lambda d: d["customers"]["acme"].update(grants=[{"kind": "free", "credits": "0", "granted_on": "2025-01-01"}]),
            "customers.acme.grants[0].credits: Input should be greater than 0",
        ),
        (
            lambda d: d["customers"]["acme"].update(grants=[{"kind": "gift", "credits": "5", "granted_on": "2025-01-01"}]),
            "customers.acme.grants[0].kind: Input should be 'free' or 'prepaid'",
        ),
        (
            lambda d: d["customers"]["acme"].update(
                grants=[{"kind": "free", "credits": "5", "granted_on": "2025-02-01", "expires": "2025-01-01"}]
            ),
            "customers.acme.grants[0].expires: expires 2025-01-01 is before granted_on",
        ),
        (
            lambda d: d["customers"]["acme"].update(
                grants=[{"id": "g", "kind": "free", "credits": "5", "granted_on": "2025-01-01"},
                        {"id": "g", "kind": "prepaid", "credits": "5", "granted_on": "2025-01-01"}]
            ),
            "customers.acme.grants[1].id: duplicate grant id g",
        ),
        (
            # The clean rule: a grant without a start date could be spent on periods before it existed.
            lambda d: d["customers"]["acme"].update(grants=[{"id": "topup", "kind": "prepaid", "credits": "5"}]),
            "customers.acme.grants[0].granted_on: grant topup needs granted_on, the first date it may be used",
        ),
        (lambda d: d.update(plans={}), "plans: a catalog needs at least one plan"),
        (lambda d: d.update(surprise="1"), "surprise: Extra inputs are not permitted"),
    ],
)
def test_validation_errors_name_the_field(mutate: Callable[[dict[str, Any]], None], expected: str) -> None:
    data = catalog_with()
    mutate(data)
    message = _error_lines(data)
    assert message.startswith("invalid plan catalog plans.yaml:")
    assert expected in message


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read plan catalog"):
        load_catalog(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plans: [unclosed\n")
    with pytest.raises(CatalogError, match="is not valid YAML"):
        load_catalog(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(CatalogError, match="plans: Field required"):
        load_catalog(empty)


def test_yaml_nulls_read_as_none(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(
        "default_plan: null\n"
        "plans:\n"
        "  p:\n"
        "    versions:\n"
        "      - {version: p-1, effective_from: '2025-01-01', credit_value: ~,\n"
        "         overage: {model: volume, tiers: [{up_to: 10, unit_price: 0.1}, {up_to: null, unit_price: 0.05}]}}\n"
        "customers:\n"
        "  acme: {plan: p, grants: [{kind: prepaid, credits: 10, granted_on: '2025-01-01', expires: null}]}\n"
    )
    catalog = load_catalog(path)
    assert catalog.default_plan is None
    version = catalog.plans["p"].versions[0]
    assert version.credit_value is None and version.overage.tiers is not None
    assert version.overage.tiers[1].up_to is None and version.overage.tiers[0].unit_price == D("0.1")
    assert catalog.customers["acme"].grants[0].expires is None


# --- grants --------------------------------------------------------------------------------------------


def test_grants_get_stable_ids_from_their_position() -> None:
    data = catalog_with()
    data["customers"]["acme"]["grants"] = [{"kind": "free", "credits": "5", "granted_on": "2025-01-01"},
                                          {"kind": "prepaid", "credits": "7", "granted_on": "2025-01-01"}]
    grants = parse_catalog(data).customers["acme"].grants
    assert [g.id for g in grants] == ["free-1", "prepaid-2"]


@pytest.mark.parametrize(
    ("granted_on", "expires", "usable_in_march"),
    [
        (date(2025, 1, 1), None, True),
        (date(2025, 1, 1), date(2025, 3, 31), True),  # expires is inclusive: usable through the last day
        (date(2025, 1, 1), date(2025, 3, 30), False),  # expires before the period ends
        (date(2025, 3, 31), None, True),  # granted during the period
        (date(2025, 4, 1), None, False),  # not granted yet
    ],
)
def test_grant_usable_for_a_period(granted_on: date, expires: date | None, usable_in_march: bool) -> None:
    grant = CreditGrant(id="g", kind=GrantKind.FREE, credits=D(1), granted_on=granted_on, expires=expires)
    assert grant.usable_for("2025-03") is usable_in_march
