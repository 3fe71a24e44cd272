"""Budgets as data, and the pure rule for which thresholds an amount of spend has crossed.

Budgets file (YAML)::

    default:                     # applies to customers not listed (optional)
      monthly_credits: "100000"
      thresholds: [50, 80, 100]
    customers:
      acme:
        monthly_credits: "25000"
        thresholds: [50, 80, 100]
        action: block            # at 100%: alert | downgrade | block

No pricing or Kafka here: the worker and the tests call :func:`thresholds_to_alert`.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from meterstream.pricing.money import to_decimal
from meterstream.schemas.records import ThresholdAction

Credits = Annotated[Decimal, BeforeValidator(lambda v: to_decimal(v, field="monthly_credits")), Field(gt=0)]


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    monthly_credits: Credits
    thresholds: tuple[int, ...] = (50, 80, 100)
    action: ThresholdAction = ThresholdAction.ALERT

    @field_validator("thresholds", mode="before")
    @classmethod
    def _ints(cls, value: object) -> object:
        # YAML is read as strings so prices stay exact; thresholds are small ints.
        if isinstance(value, (list, tuple)):
            return tuple(int(v) for v in value)
        return value

    @field_validator("thresholds")
    @classmethod
    def _sorted_percentages(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("at least one threshold is needed")
        if any(not 0 < t <= 1000 for t in value):
            raise ValueError("thresholds are percentages in 1..1000")
        if len(set(value)) != len(value):
            raise ValueError("thresholds must be distinct")
        return tuple(sorted(value))


class BudgetBook(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Budget | None = None
    customers: dict[str, Budget] = Field(default_factory=dict)

    def for_customer(self, customer_id: str) -> Budget | None:
        return self.customers.get(customer_id, self.default)


class BudgetBookError(ValueError):
    pass


def load_budgets(path: Path | None) -> BudgetBook:
    if path is None:
        return BudgetBook()
    try:
        data = yaml.load(Path(path).read_text(), Loader=yaml.BaseLoader) or {}
    except OSError as exc:
        raise BudgetBookError(f"cannot read budgets file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BudgetBookError(f"budgets file {path} is not valid YAML: {exc}") from None
    try:
        return BudgetBook.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BudgetBookError(f"invalid budgets file {path}: {details}") from None


def thresholds_to_alert(spent: Decimal, budget: Budget, already_alerted: set[int] | frozenset[int]) -> list[int]:
    """Thresholds reached by ``spent`` that have not been alerted yet, lowest first.

    Comparing against everything reached (not just the last step) means a batch
    that jumps from 40% to 120% raises 50, 80 and 100 together, and a threshold
    is never skipped.
    """
    return [
        t
        for t in budget.thresholds
        if t not in already_alerted and spent * 100 >= budget.monthly_credits * t
    ]
