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
          - {kind: free, credits: "5000", expires: "2026-12-31"}
          - {kind: prepaid, credits: "20000"}

The file is read with ``yaml.BaseLoader`` (every scalar a string) so no float
ever touches a price, and validated by pydantic; an error names the file and
the field, e.g. ``plans.growth.versions[0].overage.tiers[1].up_to: ...``.

Which version applies (one rule, two uses):

* **Event rating** uses the version effective at the event's ``occurred_at``
  (:meth:`Catalog.version_for`, :meth:`Catalog.rate`): its price book converts
  the event to credits, and its ``outcome_prices`` price the outcome. The
  price book's ``version`` is replaced by the plan version string, so every
  rated row records the plan version that priced it.
* **Period charges** (base fee, included credits, overage tiers, commitment,
  seat fee, discount) use the version effective at the *start* of the billing
  period (:meth:`Catalog.period_version`). A version whose ``effective_from``
  is after the period start never changes that period: a price change never
  rewrites a period that has started, let alone a closed one. The only
  exception is a plan whose first version starts inside the period (a plan
  launched mid-month): there is nothing to rewrite, so that version is used.

A version is effective from 00:00 UTC on its ``effective_from`` date.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import StrEnum
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meterstream.pricing.charges import ChargeModel, PositiveDecimal, Price, null_to_none
from meterstream.pricing.pricebook import PriceBook, PriceBookError, load_price_book
from meterstream.pricing.rating import rate_event
from meterstream.schemas.events import Attribution, OutcomeEvent, UsageEvent
from meterstream.schemas.records import RatedUsage

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


@lru_cache(maxsize=512)  # the worker asks for every event; months are few
def period_bounds(period: str) -> tuple[datetime, datetime]:
    """``"2026-11"`` -> (2026-11-01T00:00Z, 2026-12-01T00:00Z): a calendar month in UTC, end exclusive."""
    try:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        raise ValueError(f"period must be 'YYYY-MM', got {period!r}") from None
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def _utc_date(at: datetime) -> date:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is needed, got {at.isoformat()}")
    return at.astimezone(timezone.utc).date()


class GrantKind(StrEnum):
    FREE = "free"
    PREPAID = "prepaid"


class CreditGrant(_Strict):
    """Credits given (free) or bought in advance (prepaid), drawn down before overage is billed.

    ``expires`` is inclusive (usable through that UTC date); ``granted_on``, if
    given, is the first date it may be used. A grant is a balance: the invoice
    reports how much of it each period drew (see ``compute_invoice``'s
    ``grant_balances``).
    """

    id: Annotated[str, Field(min_length=1, max_length=128)]
    kind: GrantKind
    credits: PositiveDecimal
    granted_on: Annotated[date | None, BeforeValidator(null_to_none)] = None
    expires: Annotated[date | None, BeforeValidator(null_to_none)] = None

    @model_validator(mode="after")
    def _dates_in_order(self) -> CreditGrant:
        if self.granted_on and self.expires and self.expires < self.granted_on:
            raise _error("expires {expires} is before granted_on", ("expires",), expires=str(self.expires))
        return self

    def usable_for(self, period: str) -> bool:
        """Usable in a period if granted by its last day and not expired before its end.

        Invoices are computed from period aggregates, which do not say when in
        the month the credits were used, so a grant that expires mid-period is
        not drawn in that period.
        """
        _, end = period_bounds(period)
        last_day = (end - timedelta(days=1)).date()
        started = self.granted_on is None or self.granted_on <= last_day
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


class PlanVersion(_Strict):
    """One version of a plan: its rate card (price book) and its period charges."""

    version: Annotated[str, Field(min_length=1, max_length=64)]
    effective_from: date
    #: Resolved at load time; its ``version`` is this plan version's string.
    price_book: PriceBook = Field(default="default", validate_default=True)
    base_fee: Price = ZERO
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


class CustomerPlan(_Strict):
    plan: str
    #: Percent off the usage-based lines (overage, credits applied, outcomes); see invoice.py.
    discount_percent: Annotated[Price, Field(le=100)] = ZERO
    grants: tuple[CreditGrant, ...] = ()

    @field_validator("grants", mode="before")
    @classmethod
    def _grant_ids(cls, value: Any) -> Any:
        return _fill_grant_ids(value)

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

    def version_for(self, customer_id: str, at: datetime) -> PlanVersion:
        """The customer's plan version in effect at ``at``: what rates an event that occurred then."""
        plan_id, plan = self.plan_for(customer_id)
        version = plan.version_at(at)
        if version is None:
            raise PlanError(
                f"plan {plan_id!r} has no version in effect at {at.isoformat()} "
                f"(first: {plan.versions[0].effective_from})"
            )
        return version

    def period_version(self, customer_id: str, period: str) -> PlanVersion:
        """The version whose period charges apply to ``period``: the one in effect at its start."""
        plan_id, plan = self.plan_for(customer_id)
        try:
            return plan.version_for_period(period)
        except PlanError as exc:
            raise PlanError(f"plan {plan_id!r}: {exc}") from None

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

    def rate(self, event: UsageEvent | OutcomeEvent) -> RatedUsage:
        """Rate an event with the rate card in effect for its customer when it occurred."""
        return rate_event(event, self.price_book_for(event.customer_id, event.occurred_at))


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
