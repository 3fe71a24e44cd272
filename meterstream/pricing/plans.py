"""Plans as data: what each customer pays, version by version. Pure: no Kafka, no ClickHouse.

A catalog file (YAML) holds the plans and which customer is on which::

    currency: USD
    default_plan: starter                     # optional: customers not listed get this plan
    plans:
      growth:
        name: Growth                          # optional display name
        versions:
          - version: "growth-2026-11"         # recorded on every rated row and invoice
            effective_from: "2026-11-01"      # UTC date; strictly increasing within a plan
            price_book: default               # 'default' | path relative to this file | inline PriceBook mapping
            base_fee: "500"
            included_credits: "50000"
            overage: {model: graduated, tiers: [{up_to: "100000", unit_price: "0.012"},
                                                {up_to: null, unit_price: "0.010"}]}
            credit_value: "0.01"
            minimum_commitment: "0"
            seat_fee: "0"
            outcome_prices:
              resolved_ticket: {ai_only: "0.90", human_assisted: "0.00"}
    customers:
      acme:
        plan: growth
        discount_percent: "10"
        grants:
          - {kind: free, credits: "5000", granted_on: "2026-11-01", expires: "2026-12-31"}
          - {kind: prepaid, credits: "20000", granted_on: "2026-11-01"}

The file is read with ``yaml.BaseLoader`` (every scalar a string) so no float
ever touches a price, and validated by pydantic; an error names the file and
the field, e.g. ``plans.growth.versions[0].overage.tiers[1].up_to: ...``.

Which version applies: one rule for every charge, chosen per assignment
(``change_rule``; see :meth:`Catalog.segments` and docs/billing.md):

* ``next_period`` (default): a period is billed on the plan version and terms in
  effect at its start, and its events are rated with that version's price book
  and outcome prices too. A version, plan or discount change inside a period takes
  effect from the next one: a price change never rewrites a period that has
  started. (A plan launched inside a period bills it on its first version.)
* ``immediate``: the period is split at every change inside it; each part's events
  are rated, and its usage billed, on that part's version and terms, and fixed fees,
  included credits and the commitment are prorated by the day.

Either way the subscription's ``effective_from`` and ``cancelled_from`` cut the
period, and the rated row's ``price_book_version`` names the version that rated
it, which is how an invoice splits usage between the parts of a period.

A version is effective from 00:00 UTC on its ``effective_from`` date.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import StrEnum
from functools import cache, lru_cache
from importlib import resources
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meterstream.periods import Period
from meterstream.periods import (
    period_bounds as period_bounds,  # re-exported: callers read it with the catalog
)
from meterstream.pricing.charges import ChargeModel, PositiveDecimal, Price, null_to_none
from meterstream.pricing.engine import EventRow, Rating, rate_rows, row_of
from meterstream.pricing.pricebook import PriceBook, PriceBookError, load_price_book
from meterstream.schemas.events import Attribution, Meter, OutcomeEvent, UsageEvent
from meterstream.schemas.records import RatedUsage

#: Getters the batch lookups map over rows in C.
_occurred_at, _customer_id = attrgetter("occurred_at"), attrgetter("customer_id")
_tzinfo, _year_month = attrgetter("tzinfo"), attrgetter("year", "month")

ZERO = Decimal(0)


class PlanError(ValueError):
    """A plan question has no answer: unknown customer, no version in effect, no outcome price."""


class CatalogError(PlanError):
    """The catalog file is missing or invalid; the message names the file and the field."""


class UnknownCustomerError(PlanError):
    """The customer is not in the catalog and the catalog has no ``default_plan``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _error(message: str, at: tuple[str | int, ...], **ctx: Any) -> PydanticCustomError:
    """A validation error located ``at`` a path below the model that raises it (see :func:`format_errors`)."""
    return PydanticCustomError("catalog", message, {"at": at, **ctx})


def anniversary_bounds(anchor_day: int, period: str) -> tuple[datetime, datetime]:
    """The billing period labelled ``period`` for a subscription anchored on ``anchor_day``.

    It starts in the month ``period`` names, on the anchor day (the month's last day when
    it is shorter: anchored on the 31st, February's period starts on the 28th or 29th),
    and ends where the next one starts. ``anniversary_bounds(15, "2026-11")`` is
    2026-11-15 to 2026-12-15.
    """
    start, following = period_bounds(period)
    next_end = Period.parse(period).next().end

    def on_anchor(month_start: datetime, month_end: datetime) -> datetime:
        return month_start.replace(day=min(anchor_day, (month_end - timedelta(days=1)).day))

    return on_anchor(start, following), on_anchor(following, next_end)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def _utc_date(at: datetime) -> date:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is needed, got {at.isoformat()}")
    return at.astimezone(timezone.utc).date()


class GrantKind(StrEnum):
    FREE = "free"
    PREPAID = "prepaid"


class CreditGrant(_Strict):
    """Credits given (free) or bought in advance (prepaid), drawn down before overage is billed.

    ``granted_on`` (required) is the first UTC date it may be used, so a grant
    added to the catalog today is never spent on earlier periods; ``expires`` is
    inclusive (usable through that UTC date). A grant is a balance: the invoice
    reports how much of it each period drew (see ``compute_invoice``'s
    ``grant_balances``).
    """

    id: Annotated[str, Field(min_length=1, max_length=128)]
    kind: GrantKind
    credits: PositiveDecimal
    granted_on: date
    expires: Annotated[date | None, BeforeValidator(null_to_none)] = None

    @model_validator(mode="after")
    def _dates_in_order(self) -> CreditGrant:
        if self.expires and self.expires < self.granted_on:
            raise _error("expires {expires} is before granted_on", ("expires",), expires=str(self.expires))
        return self

    def usable_for(self, period: str, end: datetime | None = None) -> bool:
        """Usable in a period if granted by its last day and not expired before its end.

        Invoices are computed from period aggregates, which do not say when in
        the month the credits were used, so a grant that expires mid-period is
        not drawn in that period, and one granted mid-period is drawn in it.
        """
        end = end or period_bounds(period)[1]
        last_day = (end - timedelta(days=1)).date()
        started = self.granted_on <= last_day
        alive = self.expires is None or self.expires >= last_day
        return started and alive


class OutcomeMoneyPrice(_Strict):
    """Money per outcome, by who achieved it. A reversal credits the same price back."""

    ai_only: Price
    human_assisted: Price = ZERO

    def for_attribution(self, attribution: Attribution | str) -> Decimal:
        return self.ai_only if Attribution(attribution) is Attribution.AI_ONLY else self.human_assisted


@cache
def _shipped_price_book() -> PriceBook:
    return load_price_book(None)


class MeterCharge(ChargeModel):
    """A charge of its own on one meter (Lago's charge on a billable metric), e.g.::

        - {name: Documents, meter: documents, measure: events, model: package,
           package_size: "100", package_price: "5", free_units: "200"}

    ``measure`` is what is counted in the period: ``events`` (how many events of the
    meter), ``credits`` (the credits they were rated at), ``sum`` (the sum of the
    quantities reported, e.g. pages of documents) or ``max`` (the largest quantity
    reported, like seats). A meter with its own charge is billed by it and
    leaves the credits pool (included credits and overage); credits stay the unit of
    everything else.
    """

    name: Annotated[str, Field(min_length=1, max_length=128)]
    meter: Meter
    measure: Literal["events", "credits", "sum", "max"] = "events"


class PlanVersion(_Strict):
    """One version of a plan: its rate card (price book) and its period charges."""

    version: Annotated[str, Field(min_length=1, max_length=64)]
    effective_from: date
    #: Resolved at load time; its ``version`` is this plan version's string.
    price_book: PriceBook = Field(default="default", validate_default=True)
    base_fee: Price = ZERO
    #: When the base fee is billed: on the period's own invoice, or on the one before (invoice.py, rule 2).
    base_fee_timing: Literal["in_arrears", "in_advance"] = "in_arrears"
    included_credits: Price = ZERO
    #: Charge model for credits above the included allowance (tiers count overage credits).
    overage: ChargeModel
    #: List value of one credit in money, for showing credit balances as money. Invoice
    #: amounts do not use it: drawn credits are valued at the overage tiers (invoice.py, rule 5).
    credit_value: Annotated[Price | None, BeforeValidator(null_to_none)] = None
    #: Minimum the usage-based charges (after discount) must reach; a true-up line bills the gap.
    minimum_commitment: Price = ZERO
    #: Money per active seat (the period's maximum ``seats`` meter quantity).
    seat_fee: Price = ZERO
    outcome_prices: dict[str, OutcomeMoneyPrice] = Field(default_factory=dict)
    #: Charges of their own, each on one meter with its own model (beside the credits overage).
    charges: tuple[MeterCharge, ...] = ()

    @model_validator(mode="after")
    def _one_charge_per_meter(self) -> PlanVersion:
        seen: set[str] = set()
        for index, charge in enumerate(self.charges):
            if charge.meter in seen:
                raise _error("meter {m} already has a charge", ("charges", index, "meter"), m=charge.meter)
            seen.add(charge.meter)
        return self

    @field_validator("price_book", mode="before")
    @classmethod
    def _resolve_price_book(cls, value: Any, info: ValidationInfo) -> Any:
        version = info.data.get("version")
        if isinstance(value, Mapping):
            # Inline price book: it takes the plan version as its version.
            data = dict(value)
            if version:
                data["version"] = version
            return data
        if isinstance(value, PriceBook):
            book = value
        elif isinstance(value, str) and value == "default":
            book = _shipped_price_book()
        elif isinstance(value, (str, Path)) and str(value).strip():
            path = Path(value)
            base_dir = (info.context or {}).get("base_dir")
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            try:
                book = load_price_book(path)
            except PriceBookError as exc:
                raise ValueError(str(exc)) from None
        else:
            raise ValueError("expected 'default', a path to a price book file, or an inline price book mapping")
        return book.model_copy(update={"version": version}) if version else book

    def outcome_price(self, outcome_type: str, attribution: Attribution | str) -> Decimal:
        price = self.outcome_prices.get(outcome_type)
        if price is None:
            raise PlanError(f"plan version {self.version} has no outcome price for {outcome_type!r}")
        return price.for_attribution(attribution)


class Plan(_Strict):
    name: str = ""
    versions: tuple[PlanVersion, ...]

    @model_validator(mode="after")
    def _versions_in_date_order(self) -> Plan:
        if not self.versions:
            raise _error("a plan needs at least one version", ("versions",))
        seen: set[str] = set()
        for index, version in enumerate(self.versions):
            if version.version in seen:
                raise _error("duplicate version {v}", ("versions", index, "version"), v=version.version)
            seen.add(version.version)
            if index and version.effective_from <= self.versions[index - 1].effective_from:
                raise _error(
                    "effective_from {d} must be after the previous version's {p}",
                    ("versions", index, "effective_from"),
                    d=str(version.effective_from),
                    p=str(self.versions[index - 1].effective_from),
                )
        return self

    def version_at(self, at: datetime) -> PlanVersion | None:
        """The version in effect at ``at`` (the latest one whose date has come), or None."""
        day = _utc_date(at)
        current = None
        for version in self.versions:
            if version.effective_from > day:
                break
            current = version
        return current

    def version_named(self, name: str) -> PlanVersion | None:
        return next((v for v in self.versions if v.version == name), None)

    def version_for_period(self, period: str) -> PlanVersion:
        """The version in effect at the period's start (see the module docstring)."""
        start, end = period_bounds(period)
        version = self.version_at(start)
        if version is None:
            first = self.versions[0]
            if first.effective_from < end.date():
                return first  # launched inside this period: nothing earlier to keep
            raise PlanError(f"no version of this plan is in effect in {period} (first: {first.effective_from})")
        return version


def _fill_grant_ids(grants: Any) -> Any:
    # Grants are balances the next invoice carries forward, so each needs a stable id;
    # by default its position in the customer's list.
    if not isinstance(grants, Sequence) or isinstance(grants, (str, bytes)):
        return grants
    filled = []
    for index, grant in enumerate(grants):
        if isinstance(grant, Mapping) and "id" not in grant:
            grant = {**grant, "id": f"{grant.get('kind', 'grant')}-{index + 1}"}
        filled.append(grant)
    return filled


class ChangeRule(StrEnum):
    """When a change mid-period takes effect, for every charge alike (chosen per assignment)."""

    #: From the next period: the whole period is billed (and its events rated) on the plan
    #: version and terms in effect at its start.
    NEXT_PERIOD = "next_period"
    #: At once: the period is split at the change; usage before and after is billed on the
    #: terms of its part, and fixed fees (base fee, seats), included credits and the
    #: commitment are prorated by the day.
    IMMEDIATE = "immediate"


Percent = Annotated[Price, Field(le=100)]


class AssignmentChange(_Strict):
    """A dated change of a customer's plan or discount (what is not given stays as it was)."""

    effective_from: date
    plan: str | None = None
    discount_percent: Annotated[Percent | None, BeforeValidator(null_to_none)] = None


@dataclass(frozen=True)
class Segment:
    """A part of a billing period with one plan version and one set of terms: [start, end)."""

    start: datetime
    end: datetime
    plan_id: str
    version: PlanVersion
    discount_percent: Decimal

    @property
    def days(self) -> int:
        return (self.end - self.start).days


class CustomerPlan(_Strict):
    """A customer's assignment: plan, discount and grants, with effective dates.

    ``effective_from`` (default: since always) starts the subscription and
    ``cancelled_from`` ends it (exclusive): a period they cut is billed for its days
    only. ``changes`` are dated plan or discount changes, applied by ``change_rule``.
    """

    plan: str
    #: Percent off the usage-based lines (overage, credits applied, outcomes); see invoice.py.
    discount_percent: Percent = ZERO
    grants: tuple[CreditGrant, ...] = ()
    effective_from: Annotated[date | None, BeforeValidator(null_to_none)] = None
    cancelled_from: Annotated[date | None, BeforeValidator(null_to_none)] = None
    change_rule: ChangeRule = ChangeRule.NEXT_PERIOD
    changes: tuple[AssignmentChange, ...] = ()
    #: ``calendar`` months (UTC), or ``anniversary`` periods anchored on ``effective_from``'s day.
    billing_anchor: Literal["calendar", "anniversary"] = "calendar"

    def terms_at(self, day: date) -> tuple[str, Decimal]:
        """(plan, discount) in effect on ``day``."""
        plan, discount = self.plan, self.discount_percent
        for change in self.changes:
            if change.effective_from > day:
                break
            plan = change.plan or plan
            discount = discount if change.discount_percent is None else change.discount_percent
        return plan, discount

    @model_validator(mode="after")
    def _dates_in_order(self) -> CustomerPlan:
        previous = self.effective_from
        for index, change in enumerate(self.changes):
            if previous is not None and change.effective_from <= previous:
                raise _error("changes must be after effective_from and in date order", ("changes", index, "effective_from"))
            previous = change.effective_from
        if self.cancelled_from and self.effective_from and self.cancelled_from <= self.effective_from:
            raise _error("cancelled_from must be after effective_from", ("cancelled_from",))
        if self.billing_anchor == "anniversary" and self.effective_from is None:
            raise _error("anniversary billing needs effective_from (the anchor date)", ("billing_anchor",))
        return self

    def billing_bounds(self, period: str) -> tuple[datetime, datetime]:
        """[start, end) of the billing period labelled ``period`` (the month it starts in)."""
        if self.billing_anchor == "anniversary" and self.effective_from is not None:
            return anniversary_bounds(self.effective_from.day, period)
        return period_bounds(period)

    def billing_period(self, at: datetime) -> str:
        """The label of the billing period ``at`` falls in."""
        period = Period.of(at)
        if self.billing_anchor == "anniversary" and at < self.billing_bounds(str(period))[0]:
            period = period.previous()
        return str(period)

    @field_validator("grants", mode="before")
    @classmethod
    def _grant_ids(cls, value: Any) -> Any:
        value = _fill_grant_ids(value)
        if isinstance(value, list):
            for index, grant in enumerate(value):
                if isinstance(grant, Mapping) and null_to_none(grant.get("granted_on")) is None:
                    raise _error(
                        "grant {id} needs granted_on, the first date it may be used "
                        "(a grant is never spent on periods before it)",
                        (index, "granted_on"),
                        id=grant["id"],
                    )
        return value

    @model_validator(mode="after")
    def _unique_grant_ids(self) -> CustomerPlan:
        seen: set[str] = set()
        for index, grant in enumerate(self.grants):
            if grant.id in seen:
                raise _error("duplicate grant id {id}", ("grants", index, "id"), id=grant.id)
            seen.add(grant.id)
        return self


@lru_cache(maxsize=64)
def _default_assignment(plan: str) -> CustomerPlan:
    # Frozen, so one instance per plan serves every unlisted customer (the worker asks per event).
    return CustomerPlan(plan=plan)


class Catalog(_Strict):
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    default_plan: Annotated[str | None, BeforeValidator(null_to_none)] = None
    plans: dict[str, Plan]
    customers: dict[str, CustomerPlan] = Field(default_factory=dict)
    _segment_cache: dict[tuple[str, str], tuple[Segment, ...]] = PrivateAttr(default_factory=dict)
    #: Segments per period of the customers not listed (they share the default plan's).
    _default_cache: dict[str, tuple[Segment, ...]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _references_resolve(self) -> Catalog:
        if not self.plans:
            raise _error("a catalog needs at least one plan", ("plans",))
        if self.default_plan is not None and self.default_plan not in self.plans:
            raise _error("unknown plan {p}; plans: {known}", ("default_plan",), p=self.default_plan, known=self._known)
        for customer_id, customer in self.customers.items():
            if customer.plan not in self.plans:
                raise _error(
                    "unknown plan {p}; plans: {known}",
                    ("customers", customer_id, "plan"),
                    p=customer.plan,
                    known=self._known,
                )
            for index, change in enumerate(customer.changes):
                if change.plan is not None and change.plan not in self.plans:
                    raise _error(
                        "unknown plan {p}; plans: {known}",
                        ("customers", customer_id, "changes", index, "plan"),
                        p=change.plan,
                        known=self._known,
                    )
        owners: dict[str, str] = {}
        for plan_id, plan in self.plans.items():
            for index, version in enumerate(plan.versions):
                where = ("plans", plan_id, "versions", index)
                if version.price_book.currency != self.currency:
                    raise _error(
                        "price book currency {c} differs from the catalog currency {cc}",
                        (*where, "price_book", "currency"),
                        c=version.price_book.currency,
                        cc=self.currency,
                    )
                # Rated rows record only the version string, so it must name one version.
                if version.version in owners:
                    raise _error(
                        "version {v} is already used by plan {other}",
                        (*where, "version"),
                        v=version.version,
                        other=owners[version.version],
                    )
                owners[version.version] = plan_id
        return self

    @property
    def _known(self) -> str:
        return ", ".join(sorted(self.plans))

    def fingerprint(self) -> str:
        """A digest of every price and rule: two processes rate alike only if theirs are equal."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def customer(self, customer_id: str) -> CustomerPlan:
        """The customer's assignment, or the default plan with no discount or grants."""
        found = self.customers.get(customer_id)
        if found is not None:
            return found
        if self.default_plan is None:
            raise UnknownCustomerError(
                f"customer {customer_id!r} is not in the plan catalog and the catalog has no default_plan"
            )
        return _default_assignment(self.default_plan)

    def plan_for(self, customer_id: str) -> tuple[str, Plan]:
        plan_id = self.customer(customer_id).plan
        return plan_id, self.plans[plan_id]

    def segments(self, customer_id: str, period: str) -> tuple[Segment, ...]:
        """The parts of ``period`` the customer is billed for, each with one version and one set of terms.

        The one rule for mid-period changes, by the assignment's ``change_rule``:
        ``next_period`` gives one segment on the terms and plan version in effect at
        the start of the period (or of the subscription, if it starts inside it);
        ``immediate`` splits the period at every change of plan, discount or plan
        version inside it. Either way the subscription's start and cancellation cut
        the period. Empty when the customer has no subscription in the period.
        """
        key = (customer_id, period)
        cached = self._segment_cache.get(key)
        if cached is None:
            cached = self._segment_cache[key] = self._compute_segments(customer_id, period)
        return cached

    def _compute_segments(self, customer_id: str, period: str) -> tuple[Segment, ...]:
        assignment = self.customer(customer_id)
        start, end = assignment.billing_bounds(period)
        if assignment.effective_from is not None:
            start = max(start, _midnight(assignment.effective_from))
        if assignment.cancelled_from is not None:
            end = min(end, _midnight(assignment.cancelled_from))
        if start >= end:
            return ()
        points = {start}
        if assignment.change_rule is ChangeRule.IMMEDIATE:
            plans_used = {assignment.plan, *(c.plan for c in assignment.changes if c.plan)}
            dates = [c.effective_from for c in assignment.changes]
            dates += [v.effective_from for p in plans_used for v in self.plans[p].versions]
            points |= {_midnight(d) for d in dates if start < _midnight(d) < end}
        bounds = sorted(points) + [end]
        segments: list[Segment] = []
        for seg_start, seg_end in zip(bounds, bounds[1:], strict=False):
            plan_id, discount = assignment.terms_at(seg_start.date())
            plan = self.plans[plan_id]
            version = plan.version_at(seg_start)
            if version is None:
                first = plan.versions[0]
                if first.effective_from >= end.date():
                    raise PlanError(
                        f"plan {plan_id!r} has no version in effect in {period} (first: {first.effective_from})"
                    )
                version = first  # launched inside this part: nothing earlier to keep
            if segments and (segments[-1].version, segments[-1].discount_percent) == (version, discount):
                segments[-1] = Segment(segments[-1].start, seg_end, plan_id, version, discount)
                continue
            if segments and segments[-1].version is version:
                raise PlanError(
                    f"customer {customer_id!r}: the immediate change on {seg_start.date()} keeps plan version "
                    f"{version.version}, so its usage cannot be split; change the plan or use change_rule next_period"
                )
            segments.append(Segment(seg_start, seg_end, plan_id, version, discount))
        return tuple(segments)

    def version_for(self, customer_id: str, at: datetime) -> PlanVersion:
        """The plan version that rates an event at ``at``: that of the part of its period it falls in."""
        period = self.customer(customer_id).billing_period(at)
        at = at.astimezone(timezone.utc)
        for segment in self.segments(customer_id, period):
            if segment.start <= at < segment.end:
                return segment.version
        plan_id, _ = self.plan_for(customer_id)
        raise PlanError(f"customer {customer_id!r} (plan {plan_id!r}) has no plan version in effect at {at.isoformat()}")

    def period_version(self, customer_id: str, period: str) -> PlanVersion:
        """The version at the start of the billed part of ``period`` (the first segment)."""
        segments = self.segments(customer_id, period)
        if not segments:
            raise PlanError(f"customer {customer_id!r} has no subscription in {period}")
        return segments[0].version

    def version_named(self, name: str) -> PlanVersion | None:
        """The version a rated row's ``price_book_version`` names, in any plan."""
        for plan in self.plans.values():
            found = plan.version_named(name)
            if found is not None:
                return found
        return None

    @classmethod
    def for_price_book(cls, book: PriceBook, *, plan: str = "payg") -> Catalog:
        """Every customer on one pay-as-you-go plan over ``book`` (offline runs and tests)."""
        version = {
            "version": book.version,
            "effective_from": "2000-01-01",
            "price_book": book.model_dump(mode="json"),
            "overage": {"model": "per_unit", "unit_price": "0"},
        }
        return parse_catalog(
            {"currency": book.currency, "default_plan": plan, "plans": {plan: {"versions": [version]}}},
            source=f"<price book {book.version}>",
        )

    def price_book_for(self, customer_id: str, at: datetime) -> PriceBook:
        return self.version_for(customer_id, at).price_book

    def book_of(self, customer_id: str, at: datetime) -> tuple[PriceBook, str]:
        """The price book that rates an event at ``at`` (UTC), and the label of its billing period.

        The book of the plan version in effect for the customer then (:meth:`version_for`); the
        label is the calendar month, or the anniversary period's (rated rows and the store are
        keyed by billing period). Customers not listed share the default plan's segments.
        """
        return self._book_finder()(customer_id, at)

    def _book_finder(self) -> Callable[[str, datetime], tuple[PriceBook, str]]:
        """:meth:`book_of` with the catalog's caches bound once (a private attribute of a pydantic
        model is a slow lookup, and the engine asks per event)."""
        customers, default_cache, billing_period = self.customers, self._default_cache, self.billing_period

        def book_of(customer_id: str, at: datetime) -> tuple[PriceBook, str]:
            listed = customers.get(customer_id)
            if listed is not None:
                period = listed.billing_period(at)
                segments = self.segments(customer_id, period)
            else:
                # Catalog.billing_period of a customer not listed (the calendar month), inline: per event
                period = f"{at.year:04d}-{at.month:02d}" if at.tzinfo is timezone.utc else billing_period(customer_id, at)
                found = default_cache.get(period)
                if found is None:
                    self.customer(customer_id)  # UnknownCustomerError without a default plan
                    found = default_cache[period] = self._compute_segments(customer_id, period)
                segments = found
            for segment in segments:
                if segment.start <= at < segment.end:
                    return segment.version.price_book, period
            plan_id, _ = self.plan_for(customer_id)
            raise PlanError(
                f"customer {customer_id!r} (plan {plan_id!r}) has no plan version in effect at {at.isoformat()}"
            )

        return book_of

    def rate_rows(self, rows: Sequence[EventRow]) -> Rating:
        """Rate a batch of events (the rating engine, meterstream/pricing/engine.py) with each customer's plan."""
        return rate_rows(rows, self._book_finder(), self._whole_month_books)

    def _whole_month_books(self, rows: Sequence[EventRow]) -> tuple[list[PriceBook | None], list[str]]:
        """The book and period of every row of a customer the catalog does not list, in a calendar
        month one plan version covers whole: what :meth:`book_of` gives them, without a Python call
        per row (the usual batch). ``None`` and ``""`` for every other row (listed customers, a month
        with a version change or a partial segment, a month not computed yet): the engine asks
        :meth:`book_of` for those.
        """
        n = len(rows)
        instants = list(map(_occurred_at, rows))
        if not n or set(map(_tzinfo, instants)) != {timezone.utc}:
            return [None] * n, [""] * n
        months = list(map(_year_month, instants))
        label_of_month = {month: f"{month[0]:04d}-{month[1]:02d}" for month in set(months)}
        book_of_month = {month: self._whole_month_book(label) for month, label in label_of_month.items()}
        label_of_month = {month: label if book_of_month[month] is not None else "" for month, label in label_of_month.items()}
        books = list(map(book_of_month.__getitem__, months))
        periods = list(map(label_of_month.__getitem__, months))
        listed = self.customers
        customers = list(map(_customer_id, rows))
        if not listed.keys().isdisjoint(customers):  # their own plans: book_of decides
            books = [None if customer in listed else book for customer, book in zip(customers, books, strict=True)]
            periods = ["" if book is None else period for book, period in zip(books, periods, strict=True)]
        return books, periods

    def _whole_month_book(self, period: str) -> PriceBook | None:
        """The default plan's book for a whole calendar month, if one segment covers all of it."""
        segments = self._default_cache.get(period)
        if segments is None or len(segments) != 1:
            return None  # not computed yet (book_of computes or refuses it first), or split
        start, end = period_bounds(period)
        (segment,) = segments
        return segment.version.price_book if segment.start <= start and end <= segment.end else None

    def rate(self, event: UsageEvent | OutcomeEvent) -> RatedUsage:
        """Rate one event with the rate card in effect for its customer when it occurred (a batch of one).

        Raises :class:`~meterstream.pricing.rating.RatingError` or :class:`PlanError` if it has no price.
        """
        rating = rate_rows([row_of(event)], self._book_finder())
        error = rating.errors[0]
        if error is not None:
            raise error
        return rating.rated.row(0)

    def billing_bounds(self, customer_id: str, period: str) -> tuple[datetime, datetime]:
        """[start, end) of the customer's billing period ``period`` (calendar month or anniversary)."""
        return self.customer(customer_id).billing_bounds(period)

    def billing_period(self, customer_id: str, at: datetime) -> str:
        """The label of the customer's billing period ``at`` falls in (a rated row's ``period``).

        Customers not listed are billed by calendar month, like the default plan's.
        """
        customer = self.customers.get(customer_id)
        if customer is not None:
            return customer.billing_period(at)
        if at.tzinfo is timezone.utc:  # the usual case (events are UTC): no conversion, no strftime
            return f"{at.year:04d}-{at.month:02d}"
        return f"{_utc_date(at):%Y-%m}"

    def open_billing_periods(self, now: datetime) -> set[str]:
        """The billing periods around ``now``: this and last calendar month, and every anniversary
        customer's current and previous period (whose label can be two months back)."""
        month_start = period_bounds(f"{_utc_date(now):%Y-%m}")[0]
        periods = {f"{month_start:%Y-%m}", f"{month_start - timedelta(days=1):%Y-%m}"}
        for customer in self.customers.values():
            if customer.billing_anchor == "anniversary":
                current = customer.billing_period(now)
                start = customer.billing_bounds(current)[0]
                periods |= {current, customer.billing_period(start - timedelta(microseconds=1))}
        return periods


def format_location(loc: Sequence[str | int]) -> str:
    """``("plans", "growth", "versions", 0, "base_fee")`` -> ``plans.growth.versions[0].base_fee``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"invalid plan catalog {source}:"]
    for err in exc.errors():
        at = tuple((err.get("ctx") or {}).get("at", ()))
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {format_location((*err['loc'], *at))}: {message}")
    return "\n".join(lines)


def parse_catalog(data: Any, *, source: str = "<data>", base_dir: Path | None = None) -> Catalog:
    """Validate catalog data; relative price book paths are resolved against ``base_dir``."""
    try:
        return Catalog.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise CatalogError(format_errors(source, exc)) from None


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Load a plan catalog; ``None`` loads the default shipped with meterstream (pay as you go)."""
    if path is None:
        path = Path(str(resources.files("meterstream.data").joinpath("plans.yaml")))
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"cannot read plan catalog {path}: {exc.strerror}") from None
    try:
        # BaseLoader keeps every scalar a string: no float ever touches a price.
        data = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        raise CatalogError(f"plan catalog {path} is not valid YAML: {exc}") from None
    return parse_catalog(data if data is not None else {}, source=str(path), base_dir=path.parent)
