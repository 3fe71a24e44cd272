"""Budgets: which thresholds a month-to-date spend has crossed, and the budgets file."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from meterstream.budgets import Budget, BudgetBook, BudgetBookError, load_budgets, thresholds_to_alert
from meterstream.schemas.records import ThresholdAction

BUDGET = Budget(monthly_credits=Decimal("1000"))


def test_default_thresholds() -> None:
    assert BUDGET.thresholds == (50, 80, 100)
    assert BUDGET.action is ThresholdAction.ALERT


def test_jump_from_40_to_120_percent_raises_every_threshold_crossed() -> None:
    assert thresholds_to_alert(Decimal("400"), BUDGET, set()) == []
    assert thresholds_to_alert(Decimal("1200"), BUDGET, set()) == [50, 80, 100]


def test_already_alerted_thresholds_are_not_returned() -> None:
    assert thresholds_to_alert(Decimal("1200"), BUDGET, {50, 80}) == [100]
    assert thresholds_to_alert(Decimal("1200"), BUDGET, frozenset({50, 80, 100})) == []


def test_exactly_at_a_threshold_alerts_and_just_below_does_not() -> None:
    assert thresholds_to_alert(Decimal("500"), BUDGET, set()) == [50]
    assert thresholds_to_alert(Decimal("499.999999999"), BUDGET, set()) == []
    assert thresholds_to_alert(Decimal("1000"), BUDGET, {50, 80}) == [100]


def test_fractional_budget_is_compared_exactly() -> None:
    budget = Budget(monthly_credits=Decimal("0.3"), thresholds=[50])
    assert thresholds_to_alert(Decimal("0.15"), budget, set()) == [50]
    assert thresholds_to_alert(Decimal("0.1499999"), budget, set()) == []


def test_thresholds_are_sorted_and_may_exceed_100() -> None:
    budget = Budget(monthly_credits="100", thresholds=["150", "50", "100"])
    assert budget.thresholds == (50, 100, 150)
    assert thresholds_to_alert(Decimal("200"), budget, set()) == [50, 100, 150]


def test_zero_spend_and_negative_spend_alert_nothing() -> None:
    assert thresholds_to_alert(Decimal("0"), BUDGET, set()) == []
    assert thresholds_to_alert(Decimal("-50"), BUDGET, set()) == []


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"thresholds": []}, "at least one threshold"),
        ({"thresholds": [0, 50]}, "1..1000"),
        ({"thresholds": [50, 1001]}, "1..1000"),
        ({"thresholds": [50, 50]}, "distinct"),
        ({"monthly_credits": "0"}, "greater than 0"),
        ({"monthly_credits": "-5"}, "greater than 0"),
        ({"monthly_credits": "lots"}, "is not a number"),
        ({"action": "explode"}, "action"),
    ],
)
def test_invalid_budget(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        Budget(**{"monthly_credits": "100", **kwargs})


# -- budgets file ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    return path


def test_no_budgets_file_means_no_budgets() -> None:
    book = load_budgets(None)
    assert book.for_customer("acme") is None


def test_load_budgets(tmp_path: Path) -> None:
    path = write(tmp_path, """
default:
  monthly_credits: 100000
  thresholds: [50, 80, 100]
customers:
  acme:
    monthly_credits: "25000.5"
    thresholds: [90, 75]
    action: block
""")
    book = load_budgets(path)
    acme = book.for_customer("acme")
    assert acme is not None
    assert acme.monthly_credits == Decimal("25000.5")
    assert acme.thresholds == (75, 90)
    assert acme.action is ThresholdAction.BLOCK
    other = book.for_customer("globex")
    assert other is not None and other.monthly_credits == Decimal("100000")
    assert other.action is ThresholdAction.ALERT


def test_customers_without_default_have_no_budget(tmp_path: Path) -> None:
    book = load_budgets(write(tmp_path, "customers:\n  acme: {monthly_credits: 10}\n"))
    assert book.for_customer("globex") is None
    assert book.for_customer("acme") == Budget(monthly_credits=Decimal(10))


def test_empty_budgets_file_is_no_budgets(tmp_path: Path) -> None:
    assert load_budgets(write(tmp_path, "")) == BudgetBook()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("customers:\n  acme: {monthly_credits: '-5'}\n", "customers.acme.monthly_credits"),
        ("customers:\n  acme: {monthly_credits: lots}\n", "customers.acme.monthly_credits"),
        ("customers:\n  acme: {monthly_credits: 10, thresholds: [abc]}\n", "customers.acme.thresholds"),
        ("customers:\n  acme: {monthly_credits: 10, action: explode}\n", "customers.acme.action"),
        ("customers:\n  acme: {montly_credits: 10}\n", "customers.acme.montly_credits"),
        ("default: {thresholds: [50]}\n", "default.monthly_credits"),
        ("defaults: {monthly_credits: 10}\n", "defaults"),
    ],
)
def test_budget_file_errors_name_the_field_and_file(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BudgetBookError) as info:
        load_budgets(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{where}:" in message


def test_missing_budgets_file(tmp_path: Path) -> None:
    with pytest.raises(BudgetBookError, match=r"cannot read budgets file .*missing\.yaml"):
        load_budgets(tmp_path / "missing.yaml")


def test_invalid_yaml_budgets_file(tmp_path: Path) -> None:
    path = write(tmp_path, "customers: [unclosed\n")
    with pytest.raises(BudgetBookError, match="not valid YAML") as info:
        load_budgets(path)
    assert str(path) in str(info.value)


# -- properties -----------------------------------------------------------------------------------

spend_steps = st.lists(
    st.decimals(min_value=-50, max_value=400, places=3, allow_nan=False, allow_infinity=False), max_size=30
)
budgets = st.builds(
    Budget,
    monthly_credits=st.decimals(min_value=Decimal("0.001"), max_value=10_000, places=3),
    thresholds=st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=6, unique=True),
)


@given(budget=budgets, steps=spend_steps)
def test_each_threshold_alerts_once_and_none_is_skipped(budget: Budget, steps: list[Decimal]) -> None:
    """Feed month-to-date spend step by step (reversals may lower it), remembering what was alerted."""
    alerted: set[int] = set()
    returned: list[int] = []
    spent = Decimal(0)
    for step in steps:
        spent += step
        new = thresholds_to_alert(spent, budget, alerted)
        assert new == sorted(new)
        returned.extend(new)
        alerted |= set(new)
    assert len(returned) == len(set(returned)), f"a threshold alerted twice: {returned}"
    reached = {t for t in budget.thresholds if spent * 100 >= budget.monthly_credits * t}
    assert reached <= set(returned), f"thresholds reached but never alerted: {reached - set(returned)}"
    # And nothing is alerted that was never reached at some point along the way.
    peaks = [sum(steps[: i + 1], Decimal(0)) for i in range(len(steps))]
    highest = max(peaks, default=Decimal(0))
    assert all(highest * 100 >= budget.monthly_credits * t for t in returned)
