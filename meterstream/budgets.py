"""Budgets as data, and the pure rules: which thresholds spend has crossed, what to enforce.

Budgets file (YAML)::

    default:                     # applies to customers not listed (optional)
      monthly_credits: "100000"
      thresholds: [50, 80, 100]
    profiles:                    # named budgets customers can use, e.g. a free tier
      free:
        monthly_credits: "1000"
        action: block
    customers:
      acme:
        monthly_credits: "25000"     # or monthly_amount: "250" (money, at the plan's credit_value)
        thresholds: [50, 80, 100]
        action: downgrade        # at 100%: alert | downgrade | block
        downgrade_to: gpt-4o-mini
        run_cap: {max_credits: "50", max_steps: 40, action: block}   # per workflow run
        if_ledger_down: fail_open  # guards allow calls while the reservation ledger is unreachable
      hobbyist: {profile: free}
    spike:                       # spend-spike detection (optional)
      factor: "5"                # last 5 minutes >= 5x the trailing hour's 5-minute average
      min_credits: "10"

No pricing or Kafka here: the worker, the SDK guard and the tests call
:func:`thresholds_to_alert`, :func:`customer_decision` and :func:`run_decision`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from meterstream.clock import utc_now
from meterstream.pricing.money import to_decimal
from meterstream.pricing.plans import Catalog
from meterstream.schemas.records import Decision, EnforcementState, ThresholdAction

Credits = Annotated[Decimal, BeforeValidator(lambda v: to_decimal(v, field="monthly_credits")), Field(gt=0)]


class RunCap(BaseModel):
    """A cap per workflow run, to stop runaway agent loops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_credits: Annotated[Decimal, BeforeValidator(lambda v: to_decimal(v, field="max_credits")), Field(gt=0)] | None = None
    max_steps: Annotated[int, Field(gt=0)] | None = None
    action: ThresholdAction = ThresholdAction.BLOCK

    @model_validator(mode="after")
    def _some_limit(self) -> RunCap:
        if self.max_credits is None and self.max_steps is None:
            raise ValueError("a run cap needs max_credits or max_steps")
        return self


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    monthly_credits: Credits
    #: The cap as set in money (``monthly_amount`` in the file), converted to credits at
    #: the plan's ``credit_value`` when the file is loaded; informational afterwards.
    monthly_amount: Annotated[Decimal, BeforeValidator(lambda v: to_decimal(v, field="monthly_amount"))] | None = None
    thresholds: tuple[int, ...] = (50, 80, 100)
    action: ThresholdAction = ThresholdAction.ALERT
    #: The cheaper model callers are moved to when ``action`` is downgrade.
    downgrade_to: str | None = None
    run_cap: RunCap | None = None
    #: What SDK guards do while the shared reservation ledger is unreachable: ``fail_closed``
    #: blocks the customer's calls, ``fail_open`` decides within the guard's own process.
    #: Default: closed for a ``block`` budget (a hard cap), open otherwise.
    if_ledger_down: Literal["fail_open", "fail_closed"] | None = None

    @property
    def fails_closed(self) -> bool:
        if self.if_ledger_down is None:
            return self.action is ThresholdAction.BLOCK
        return self.if_ledger_down == "fail_closed"

    @model_validator(mode="after")
    def _downgrade_needs_a_model(self) -> Budget:
        if self.action is ThresholdAction.DOWNGRADE and not self.downgrade_to:
            raise ValueError("action downgrade needs downgrade_to (the cheaper model)")
        return self

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


class SpikeRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    factor: Annotated[Decimal, BeforeValidator(lambda v: to_decimal(v, field="factor")), Field(gt=1)] = Decimal(5)
    min_credits: Annotated[Decimal, BeforeValidator(lambda v: to_decimal(v, field="min_credits")), Field(ge=0)] = Decimal(10)


class BudgetBook(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Budget | None = None
    profiles: dict[str, Budget] = Field(default_factory=dict)
    customers: dict[str, Budget] = Field(default_factory=dict)
    spike: SpikeRule | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve_profiles(cls, data: Any) -> Any:
        # `customers: {c: {profile: free, ...overrides}}` becomes the profile's budget with the overrides.
        if not isinstance(data, dict):
            return data
        profiles = data.get("profiles") or {}
        customers = {}
        for name, entry in (data.get("customers") or {}).items():
            if isinstance(entry, dict) and "profile" in entry:
                entry = dict(entry)
                profile = entry.pop("profile")
                if profile not in profiles:
                    raise ValueError(f"customers.{name}.profile: unknown profile {profile!r}; known: {sorted(profiles)}")
                entry = {**profiles[profile], **entry}
            customers[name] = entry
        return {**data, "customers": customers}

    def for_customer(self, customer_id: str) -> Budget | None:
        return self.customers.get(customer_id, self.default)


class BudgetBookError(ValueError):
    pass


def _amounts_to_credits(data: dict[str, Any], credit_value: Callable[[str | None], Decimal | None]) -> None:
    """Turn ``monthly_amount`` (money) into ``monthly_credits`` at the plan's credit value."""

    def convert(entry: Any, where: str, customer: str | None) -> None:
        if not isinstance(entry, dict) or "monthly_amount" not in entry:
            return
        if "monthly_credits" in entry:
            raise BudgetBookError(f"{where}: give monthly_credits or monthly_amount, not both")
        value = credit_value(customer)
        if not value:
            raise BudgetBookError(
                f"{where}.monthly_amount: the plan has no credit_value to convert money to credits"
            )
        entry["monthly_credits"] = format(to_decimal(entry["monthly_amount"], field=f"{where}.monthly_amount") / value, "f")

    convert(data.get("default"), "default", None)
    for name, entry in (data.get("profiles") or {}).items():
        convert(entry, f"profiles.{name}", None)
    for name, entry in (data.get("customers") or {}).items():
        convert(entry, f"customers.{name}", name)


def load_budgets(path: Path | None, catalog: Catalog | None = None) -> BudgetBook:
    """Load a budgets file; ``catalog`` converts caps given in money (``monthly_amount``) to credits.

    A customer's money cap uses the ``credit_value`` of its plan version in effect
    now; ``default`` and ``profiles`` use the catalog's default plan.
    """
    if path is None:
        return BudgetBook()
    try:
        data = yaml.load(Path(path).read_text(), Loader=yaml.BaseLoader) or {}
    except OSError as exc:
        raise BudgetBookError(f"cannot read budgets file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BudgetBookError(f"budgets file {path} is not valid YAML: {exc}") from None

    def credit_value(customer: str | None) -> Decimal | None:
        if catalog is None:
            return None
        now = utc_now()
        try:
            if customer is not None:
                return catalog.version_for(customer, now).credit_value
            if catalog.default_plan is not None:
                version = catalog.plans[catalog.default_plan].version_at(now)
                return version.credit_value if version else None
        except ValueError:
            return None
        return None

    if isinstance(data, dict):
        _amounts_to_credits(data, credit_value)
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


def projected_exhaustion(spent: Decimal, cap: Decimal, credits_per_second: Decimal, now: datetime) -> datetime | None:
    """When the cap runs out at the current velocity (None when nothing is being spent)."""
    if credits_per_second <= 0:
        return None
    if spent >= cap:
        return now
    seconds = (cap - spent) / credits_per_second
    return now + timedelta(seconds=min(float(seconds), 10 * 365 * 86400))


def customer_decision(
    customer_id: str, period: str, spent: Decimal, budget: Budget, *, watermark: datetime, now: datetime,
    counted_ids: tuple[str, ...] = (), catalog_fingerprint: str = "",
) -> EnforcementState:  # fmt: skip
    """What the runtime should do for this customer now: ok, warn, downgrade or block.

    ``counted_ids`` are the usage events this spend newly includes (guards release their
    settled calls by them); ``catalog_fingerprint`` is the catalog the spend was rated with.
    """
    cap = budget.monthly_credits
    remaining = cap - spent
    percent = spent * 100 / cap
    common = {
        "key": customer_id, "customer_id": customer_id, "period": period, "cap_credits": cap,
        "spent_credits": spent, "remaining_credits": remaining, "at_cap": budget.action,
        "downgrade_to": budget.downgrade_to or "", "watermark": watermark, "updated_at": now,
        "fail_closed": budget.fails_closed, "counted_ids": counted_ids, "catalog_fingerprint": catalog_fingerprint,
    }  # fmt: skip
    if spent >= cap:
        decision = {
            ThresholdAction.BLOCK: Decision.BLOCK,
            ThresholdAction.DOWNGRADE: Decision.DOWNGRADE,
            ThresholdAction.ALERT: Decision.WARN,
        }[budget.action]
        return EnforcementState(
            decision=decision, reason=f"monthly budget of {cap} budget credits (usage + outcome credits) reached ({percent:.1f}% used)", **common
        )
    crossed = [t for t in budget.thresholds if spent * 100 >= cap * t]
    if crossed:
        return EnforcementState(
            decision=Decision.WARN, reason=f"{crossed[-1]}% of the monthly budget used ({percent:.1f}%)", **common
        )
    return EnforcementState(decision=Decision.OK, reason=f"{percent:.1f}% of the monthly budget used", **common)


def run_decision(
    customer_id: str, run_id: str, period: str, credits: Decimal, steps: int, cap: RunCap, *,
    downgrade_to: str, watermark: datetime, now: datetime,
) -> EnforcementState:  # fmt: skip
    """The decision for one workflow run against its cap on credits and steps."""
    over = []
    if cap.max_credits is not None and credits >= cap.max_credits:
        over.append(f"{credits} of {cap.max_credits} credits")
    if cap.max_steps is not None and steps >= cap.max_steps:
        over.append(f"{steps} of {cap.max_steps} steps")
    decision = Decision.OK
    if over:
        decision = {
            ThresholdAction.BLOCK: Decision.BLOCK,
            ThresholdAction.DOWNGRADE: Decision.DOWNGRADE,
            ThresholdAction.ALERT: Decision.WARN,
        }[cap.action]
    remaining = None if cap.max_credits is None else cap.max_credits - credits
    return EnforcementState(
        key=f"{customer_id}|{run_id}", customer_id=customer_id, run_id=run_id, period=period, decision=decision,
        reason=("run cap reached: " + ", ".join(over)) if over else f"run at {steps} steps, {credits} credits",
        cap_credits=cap.max_credits, spent_credits=credits, remaining_credits=remaining, at_cap=cap.action,
        downgrade_to=downgrade_to, watermark=watermark, updated_at=now,
    )  # fmt: skip


def is_spike(recent: Decimal, baseline: Decimal, rule: SpikeRule) -> bool:
    """Recent spend (last 5 minutes) far above the customer's trailing 5-minute average."""
    return recent >= rule.min_credits and baseline > 0 and recent >= baseline * rule.factor
