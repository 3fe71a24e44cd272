"""Charge models: PRICING.md's tier table exactly, tier validation, and properties of the tier maths."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from meterstream.pricing.charges import (
    Band,
    ChargeModel,
    Tier,
    Tiers,
    flat,
    graduated,
    graduated_slice,
    make_tiers,
    package,
    per_unit,
    volume,
)
from meterstream.pricing.money import round_money

D = Decimal

#: PRICING.md "Charge models": 0–1,000 at $0.10; 1,001–5,000 at $0.08; above 5,000 at $0.05.
PRICING_TIERS = make_tiers(
    [
        {"up_to": "1000", "unit_price": "0.10"},
        {"up_to": "5000", "unit_price": "0.08"},
        {"up_to": None, "unit_price": "0.05"},
    ]
)


# --- PRICING.md worked examples ------------------------------------------------------------------


def test_pricing_md_per_unit() -> None:
    assert round_money(per_unit(D(6000), D("0.08")).amount) == D("480.00")


def test_pricing_md_graduated_with_its_bands() -> None:
    charge = graduated(D(6000), PRICING_TIERS)
    assert round_money(charge.amount) == D("470.00")
    assert charge.bands == (
        Band(start=D(0), end=D(1000), quantity=D(1000), unit_price=D("0.10"), amount=D("100.00")),
        Band(start=D(1000), end=D(5000), quantity=D(4000), unit_price=D("0.08"), amount=D("320.00")),
        Band(start=D(5000), end=D(6000), quantity=D(1000), unit_price=D("0.05"), amount=D("50.00")),
    )


def test_pricing_md_volume() -> None:
    charge = volume(D(6000), PRICING_TIERS)
    assert round_money(charge.amount) == D("300.00")
    assert [(b.quantity, b.unit_price) for b in charge.bands] == [(D(6000), D("0.05"))]


@pytest.mark.parametrize(("units", "packages", "amount"), [(6000, 6, "30.00"), (6001, 7, "35.00")])
def test_pricing_md_package(units: int, packages: int, amount: str) -> None:
    charge = package(D(units), D(1000), D(5))
    assert round_money(charge.amount) == D(amount)
    assert charge.bands[0].quantity == packages


def test_flat_fee() -> None:
    charge = flat(D("500"))
    assert charge.amount == D(500)
    assert charge.bands[0].quantity == 1


# --- boundaries and edges ------------------------------------------------------------------------


def test_a_tier_bound_is_inclusive() -> None:
    # 1,000 units are all in the first tier; a fraction more reaches the second.
    assert volume(D(1000), PRICING_TIERS).amount == D("100.00")
    assert volume(D("1000.5"), PRICING_TIERS).amount == D("1000.5") * D("0.08")
    assert graduated(D(1000), PRICING_TIERS).amount == D("100.00")
    assert graduated(D("1000.5"), PRICING_TIERS).amount == D("100.00") + D("0.5") * D("0.08")


def test_zero_quantity_costs_nothing_and_has_no_bands() -> None:
    for charge in (
        per_unit(D(0), D("0.08")),
        graduated(D(0), PRICING_TIERS),
        volume(D(0), PRICING_TIERS),
        package(D(0), D(1000), D(5)),
    ):
        assert charge.amount == 0
        assert charge.bands == ()


def test_package_of_a_fraction_of_a_package_bills_one_package() -> None:
    assert package(D("0.001"), D(1000), D(5)).amount == D(5)
    assert package(D("2.5"), D("0.5"), D(1)).amount == D(5)  # exact multiple of a fractional size


@pytest.mark.parametrize("quantity", [D(-1), D("NaN"), D("Infinity")])
def test_quantity_must_be_finite_and_non_negative(quantity: Decimal) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        graduated(quantity, PRICING_TIERS)


def test_quantity_must_be_decimal() -> None:
    with pytest.raises(TypeError, match="Decimal"):
        per_unit(6000.0, D("0.08"))  # type: ignore[arg-type]


def test_package_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="package_size"):
        package(D(10), D(0), D(5))


def test_graduated_slice_shows_which_tiers_a_range_of_units_is_in() -> None:
    charge = graduated_slice(D(4500), D(5500), PRICING_TIERS)
    assert [(b.start, b.end, b.unit_price) for b in charge.bands] == [
        (D(4500), D(5000), D("0.08")),
        (D(5000), D(5500), D("0.05")),
    ]
    assert charge.amount == graduated(D(5500), PRICING_TIERS).amount - graduated(D(4500), PRICING_TIERS).amount


# --- tier validation -----------------------------------------------------------------------------


def _tier_error(tiers: list[dict[str, Any]]) -> Any:
    with pytest.raises(ValidationError) as info:
        TypeAdapter(Tiers).validate_python(tiers)
    return info.value.errors()[0]


def test_bounds_must_increase_strictly_and_the_error_says_which_tier() -> None:
    err = _tier_error([{"up_to": "1000", "unit_price": "1"}, {"up_to": "1000", "unit_price": "1"}, {"unit_price": "1"}])
    assert err["ctx"]["at"] == (1, "up_to")
    assert "increase strictly" in err["msg"]


def test_only_the_last_tier_may_be_unbounded_and_it_must_be() -> None:
    assert _tier_error([{"up_to": None, "unit_price": "1"}, {"unit_price": "1"}])["ctx"]["at"] == (0, "up_to")
    assert _tier_error([{"up_to": "10", "unit_price": "1"}])["ctx"]["at"] == (0, "up_to")


def test_tiers_need_at_least_one_tier() -> None:
    assert "at least one tier" in _tier_error([])["msg"]


@pytest.mark.parametrize(
    ("tier", "field"),
    [
        ({"up_to": "0", "unit_price": "1"}, "up_to"),
        ({"unit_price": "-0.01"}, "unit_price"),
        ({"unit_price": "x"}, "unit_price"),
    ],
)
def test_tier_values_are_checked(tier: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Tier.model_validate(tier)
    assert info.value.errors()[0]["loc"] == (field,)


def test_yaml_null_spellings_mean_unbounded() -> None:
    # yaml.BaseLoader reads `up_to: null` as the string "null".
    for spelling in ("null", "~", ""):
        assert Tier.model_validate({"up_to": spelling, "unit_price": "0.05"}).up_to is None


def test_prices_read_from_floats_stay_exact() -> None:
    assert Tier.model_validate({"unit_price": 0.1}).unit_price == D("0.1")


# --- ChargeModel (the overage block of a plan) ----------------------------------------------------


def test_charge_model_dispatches_to_the_functions() -> None:
    tiers = [t.model_dump() for t in PRICING_TIERS]
    assert ChargeModel(model="per_unit", unit_price="0.08").charge(D(6000)).amount == D("480.00")
    assert ChargeModel(model="graduated", tiers=tiers).charge(D(6000)).amount == D("470.00")
    assert ChargeModel(model="volume", tiers=tiers).charge(D(6000)).amount == D("300.00")
    assert ChargeModel(model="package", package_size="1000", package_price="5").charge(D(6001)).amount == D(35)


@pytest.mark.parametrize(
    ("data", "at", "message"),
    [
        ({"model": "per_unit"}, ("unit_price",), "required for model per_unit"),
        ({"model": "graduated", "unit_price": "1", "tiers": [{"unit_price": "1"}]}, ("unit_price",), "not used"),
        ({"model": "package", "package_size": "10"}, ("package_price",), "required"),
    ],
)
def test_charge_model_fields_must_match_the_model(data: dict[str, Any], at: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChargeModel.model_validate(data)
    err = info.value.errors()[0]
    assert err["ctx"]["at"] == at
    assert message in err["msg"]


def test_between_is_the_difference_of_charges_with_bands_only_when_positional() -> None:
    tiers = [t.model_dump() for t in PRICING_TIERS]
    grad = ChargeModel(model="graduated", tiers=tiers)
    vol = ChargeModel(model="volume", tiers=tiers)
    unit = ChargeModel(model="per_unit", unit_price="0.08")
    assert grad.between(D(4000), D(6000)).amount == D("130.00")
    assert [b.unit_price for b in grad.between(D(4000), D(6000)).bands] == [D("0.08"), D("0.05")]
    assert unit.between(D(10), D(30)).bands == (Band(D(10), D(30), D(20), D("0.08"), D("1.60")),)
    assert vol.between(D(4000), D(6000)).amount == D("300.00") - D("320.00")  # volume pricing can fall
    assert vol.between(D(4000), D(6000)).bands == ()


# --- properties ----------------------------------------------------------------------------------

quantities = st.decimals(min_value=0, max_value=10_000_000, places=3, allow_nan=False, allow_infinity=False)
prices = st.decimals(min_value=0, max_value=10, places=4, allow_nan=False, allow_infinity=False)


@st.composite
def falling_tiers(draw: st.DrawFn) -> tuple[Tier, ...]:
    """1–4 tiers, strictly increasing bounds, non-increasing prices, the last unbounded."""
    bounds = sorted(draw(st.sets(st.decimals(min_value="0.5", max_value=5_000_000, places=1), min_size=0, max_size=3)))
    unit_prices = sorted(draw(st.lists(prices, min_size=len(bounds) + 1, max_size=len(bounds) + 1)), reverse=True)
    return make_tiers(
        [{"up_to": b, "unit_price": p} for b, p in zip(bounds, unit_prices, strict=False)]
        + [{"up_to": None, "unit_price": unit_prices[-1]}]
    )


@given(falling_tiers(), quantities)
def test_graduated_is_at_most_per_unit_at_the_first_price_when_prices_fall(tiers: tuple[Tier, ...], q: Decimal) -> None:
    assert graduated(q, tiers).amount <= per_unit(q, tiers[0].unit_price).amount


@given(falling_tiers(), quantities)
def test_volume_is_at_most_graduated_when_prices_fall(tiers: tuple[Tier, ...], q: Decimal) -> None:
    assert volume(q, tiers).amount <= graduated(q, tiers).amount


@given(falling_tiers(), quantities)
def test_volume_and_graduated_agree_up_to_the_first_boundary(tiers: tuple[Tier, ...], q: Decimal) -> None:
    first = tiers[0].up_to
    q = q if first is None else min(q, first)
    assert volume(q, tiers).amount == graduated(q, tiers).amount == per_unit(q, tiers[0].unit_price).amount


@given(falling_tiers(), quantities, quantities)
def test_graduated_is_monotone_and_slices_add_up(tiers: tuple[Tier, ...], a: Decimal, b: Decimal) -> None:
    low, high = sorted((a, b))
    assert graduated(low, tiers).amount <= graduated(high, tiers).amount
    assert graduated(low, tiers).amount + graduated_slice(low, high, tiers).amount == graduated(high, tiers).amount


@given(falling_tiers(), quantities)
def test_graduated_bands_cover_the_quantity_exactly(tiers: tuple[Tier, ...], q: Decimal) -> None:
    charge = graduated(q, tiers)
    assert sum((b.quantity for b in charge.bands), D(0)) == q
    assert sum((b.amount for b in charge.bands), D(0)) == charge.amount
    for previous, band in zip(charge.bands, charge.bands[1:], strict=False):
        assert previous.end == band.start


@given(quantities, st.decimals(min_value="0.001", max_value=100_000, places=3), prices)
def test_package_bills_the_fewest_packages_that_hold_the_quantity(q: Decimal, size: Decimal, price: Decimal) -> None:
    packages = package(q, size, price).bands[0].quantity if q else D(0)
    assert packages * size >= q
    assert (packages - 1) * size < q or packages == 0
