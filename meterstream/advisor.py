"""Usage profiles and the threshold advisor: how an included allowance is chosen.

Two questions customer success and pricing ask of a closed period
(docs/pricing.md, "Usage profiles and the threshold advisor"):

* **What does a typical customer use?** :func:`usage_profiles` gives the p50,
  p75 and p90 of each meter's monthly total per customer, by plan or by cohort
  (``meterstream profile``).
* **What would this plan have earned?** :func:`replay_period` replays a period
  under a candidate plan version — optionally with another included allowance
  and a per-unit overage rate — through the one invoice engine
  (:func:`meterstream.pricing.invoice.compute_invoice`), and reports who stays
  within the allowance, revenue, cost to serve and margin per customer, and the
  allowance at a chosen percentile of customers' credits (``meterstream advise``).

Both read the saved query ``sql/queries/customer_period_totals.sql``: per
customer, the rows ``invoice_usage.sql`` gives for one customer, so each
customer's :class:`PeriodUsage` comes from
:func:`meterstream.billing.period_usage_from_aggregates` exactly as an invoice's
does (cohorts by first-seen month also read ``customer_first_periods.sql``).
Saved queries only (``sql/queries/``), run on the command's own connection to the store.

**Quantile method: nearest rank.** The p-th percentile of n values is the
value at rank ``ceil(p/100 × n)`` (1-based) in ascending order, i.e. the
smallest observed value with at least p% of the values at or below it. It is
always a value some customer actually had, it is computed exactly in
``Decimal`` with no interpolation, and an allowance set at the p-th percentile
keeps at least p% of customers within it — the property an allowance needs.
(Linear interpolation can land between two customers and keep fewer.)
Example: credits 10k, 20k, 40k, 60k, 100k -> p50 = rank 3 = 40k, p75 = rank 4
= 60k, p90 = rank 5 = 100k.

**Metrics per customer-period** (from rated rows, ``FINAL``): ``usage_credits``
(as rated — outcome rows do not count, as on the invoice),
``cost_to_serve`` (usage and outcomes), ``tokens`` and ``tokens:<model>``
(input + output tokens; input includes cached input), each other meter's
quantity (``requests``, ``actions``, ``documents``), ``seats`` (the period's
maximum, as billed) and ``outcomes:<type>`` (outcomes net of reversals). A
customer active in the period with none of a meter counts as 0 for it, so a
profile describes every customer in the group; ``using`` says how many had any.

**Replay rules.** Every selected customer is billed at the candidate plan's
list price: base fee, included credits, overage, outcome prices, seats and
commitment of the candidate version, with no customer discount or credit
grant (those are negotiated per customer, not part of a plan's design). The
credits are those the period's events were rated with; a candidate with a
different price book (credits per token) is a re-rating: ``meterstream rerate``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from meterstream.billing import QueryRunner, period_usage_from_aggregates
from meterstream.pricing.charges import ChargeModel
from meterstream.pricing.invoice import Invoice, PeriodUsage, compute_invoice
from meterstream.pricing.money import round_money
from meterstream.pricing.plans import (
    Catalog,
    Plan,
    PlanError,
    PlanVersion,
    UnknownCustomerError,
    period_bounds,
)

ZERO = Decimal(0)
HUNDRED = Decimal(100)

#: The percentiles a usage profile reports.
PROFILE_PERCENTILES: tuple[int, ...] = (50, 75, 90)
QUANTILE_METHOD = "nearest-rank"

#: The saved queries this module reads (``sql/queries/``).
TOTALS_QUERY = "customer_period_totals"
FIRST_PERIODS_QUERY = "customer_first_periods"


class AdvisorError(ValueError):
    """The question cannot be answered as asked (unknown plan, no customers, bad percentile)."""


# -- quantiles ------------------------------------------------------------------------------------


def parse_percentile(value: str | int | Decimal) -> Decimal:
    """A percentile in (0, 100], read without float arithmetic."""
    try:
        p = Decimal(str(value).strip())
    except InvalidOperation:
        raise AdvisorError(f"percentile must be a number in (0, 100], got {value!r}") from None
    if not p.is_finite() or not ZERO < p <= HUNDRED:
        raise AdvisorError(f"percentile must be in (0, 100], got {value}")
    return p


def nearest_rank(values: Iterable[Decimal], percentile: str | int | Decimal) -> Decimal:
    """The ``percentile``-th percentile by nearest rank: the value at rank ``ceil(p/100 × n)``.

    The smallest value with at least ``percentile``% of ``values`` at or below it
    (see the module docstring). Exact: ``Decimal`` in, one of the values out.
    """
    ordered = sorted(values)
    if not ordered:
        raise AdvisorError("a percentile of no values is undefined")
    p = parse_percentile(percentile)
    rank = int((p * len(ordered) / HUNDRED).to_integral_value(rounding=ROUND_CEILING))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def share_within(values: Sequence[Decimal], allowance: Decimal) -> int:
    """How many values are at or below ``allowance`` (customers who stay within it)."""
    return sum(1 for v in values if v <= allowance)


# -- per-customer totals from the store --------------------------------------------------------


def rows_by_customer(run_query: QueryRunner, period: str) -> dict[str, list[dict[str, Any]]]:
    """``customer_period_totals`` rows of ``period``, grouped by customer."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in run_query(TOTALS_QUERY, period=period).dicts():
        grouped[row["customer_id"]].append(row)
    return dict(sorted(grouped.items()))


def first_periods(run_query: QueryRunner, period: str) -> dict[str, str]:
    """The first period with usage of each customer active in ``period`` (cohort by first-seen month)."""
    return {row["customer_id"]: row["first_period"] for row in run_query(FIRST_PERIODS_QUERY, period=period).dicts()}


def period_usages(rows: Mapping[str, list[dict[str, Any]]], period: str) -> dict[str, PeriodUsage]:
    """Each customer's :class:`PeriodUsage`, built as ``meterstream invoice`` builds it."""
    return {customer: period_usage_from_aggregates(customer, period, got) for customer, got in rows.items()}


def _metric_order(name: str) -> tuple[int, str]:
    head = name.split(":", 1)[0]
    known = {"usage_credits": 0, "cost_to_serve": 1, "tokens": 2, "requests": 3, "actions": 4, "documents": 5, "seats": 7}
    rank = known.get(head, 9 if head == "outcomes" else 6)
    return rank, name


def customer_metrics(rows: Iterable[dict[str, Any]]) -> dict[str, Decimal]:
    """One customer's period totals per metric (module docstring, "Metrics per customer-period")."""
    totals: dict[str, Decimal] = defaultdict(lambda: ZERO)
    totals["usage_credits"] = ZERO
    totals["cost_to_serve"] = ZERO
    for row in rows:
        totals["cost_to_serve"] += row["cost_to_serve"]
        if row["kind"] == "outcome":
            events = Decimal(int(row["events"]))
            totals[f"outcomes:{row['outcome_type']}"] += -events if row["is_reversal"] else events
            continue
        totals["usage_credits"] += row["credits"]
        meter = row["meter"]
        if meter == "tokens":
            tokens = Decimal(int(row["input_tokens"]) + int(row["output_tokens"]))
            totals["tokens"] += tokens
            totals[f"tokens:{row['model'] or '(none)'}"] += tokens
        elif meter == "seats":
            totals["seats"] = max(totals["seats"], row["max_quantity"])
        else:
            totals[meter] += row["total_quantity"]
    return dict(sorted(totals.items(), key=lambda kv: _metric_order(kv[0])))


# -- usage profiles -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricProfile:
    """One metric's distribution over the customers of one group in one period."""

    group: str
    metric: str
    customers: int
    #: Customers with a non-zero total.
    using: int
    quantiles: dict[int, Decimal]
    max: Decimal

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "metric": self.metric,
            "customers": self.customers,
            "using": self.using,
            **{f"p{p}": _exact(v) for p, v in self.quantiles.items()},
            "max": _exact(self.max),
        }


ALL_GROUP = "(all)"


def usage_profiles(
    totals: Mapping[str, Mapping[str, Decimal]],
    group_of: Callable[[str], str],
    percentiles: Sequence[int] = PROFILE_PERCENTILES,
) -> list[MetricProfile]:
    """p50/p75/p90 (nearest rank) of each metric per group; an ``(all)`` group when there are several.

    A customer without a metric counts as 0 for it (it was active in the period).
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for customer in sorted(totals):
        groups[group_of(customer)].append(customer)
    ordered = sorted(groups.items())
    if len(ordered) > 1:
        ordered.insert(0, (ALL_GROUP, sorted(totals)))
    profiles = []
    for group, customers in ordered:
        metrics = sorted({m for c in customers for m in totals[c]}, key=_metric_order)
        for metric in metrics:
            values = [totals[c].get(metric, ZERO) for c in customers]
            profiles.append(
                MetricProfile(
                    group=group,
                    metric=metric,
                    customers=len(values),
                    using=sum(1 for v in values if v != 0),
                    quantiles={p: nearest_rank(values, p) for p in percentiles},
                    max=max(values),
                )
            )
    return profiles


def plan_grouping(catalog: Catalog) -> Callable[[str], str]:
    """Group customers by the plan the catalog assigns them."""

    def group_of(customer: str) -> str:
        try:
            return catalog.customer(customer).plan
        except UnknownCustomerError:
            return "(no plan)"

    return group_of


def load_cohorts(path: Path) -> dict[str, str]:
    """A cohort file: a YAML mapping ``customer_id: cohort label`` (e.g. a segment or a sales region)."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=yaml.BaseLoader)
    except OSError as exc:
        raise AdvisorError(f"cannot read cohort file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AdvisorError(f"cohort file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise AdvisorError(f"cohort file {path} must map each customer_id to a cohort label")
    return {str(k): v for k, v in data.items()}


def cohort_grouping(cohorts: Mapping[str, str], default: str = "(no cohort)") -> Callable[[str], str]:
    return lambda customer: cohorts.get(customer, default)


# -- the threshold advisor ----------------------------------------------------------------------


def candidate_version(
    catalog: Catalog,
    plan_id: str,
    period: str,
    *,
    version: str | None = None,
    included: Decimal | None = None,
    overage_rate: Decimal | None = None,
) -> PlanVersion:
    """The plan version to replay ``period`` under, with any overrides, effective for the whole period.

    Default: the version in effect at the period's start; for a plan that only
    starts later (a new design), its first version. ``included`` replaces the
    included credits, ``overage_rate`` the overage model (per unit, per credit).
    """
    plan = catalog.plans.get(plan_id)
    if plan is None:
        raise AdvisorError(f"unknown plan {plan_id!r}; plans: {', '.join(sorted(catalog.plans))}")
    if version is not None:
        chosen = plan.version_named(version)
        if chosen is None:
            known = ", ".join(v.version for v in plan.versions)
            raise AdvisorError(f"plan {plan_id!r} has no version {version!r}; versions: {known}")
    else:
        try:
            chosen = plan.version_for_period(period)
        except PlanError:
            chosen = plan.versions[0]
    start, _ = period_bounds(period)
    updates: dict[str, Any] = {"effective_from": start.date()}
    if included is not None:
        if not included.is_finite() or included < 0:
            raise AdvisorError(f"included credits must be a non-negative number, got {included}")
        updates["included_credits"] = included
    if overage_rate is not None:
        if not overage_rate.is_finite() or overage_rate < 0:
            raise AdvisorError(f"overage rate must be a non-negative number, got {overage_rate}")
        updates["overage"] = ChargeModel(model="per_unit", unit_price=overage_rate)
    return chosen.model_copy(update=updates)


def replay_catalog(catalog: Catalog, plan_id: str, version: PlanVersion) -> Catalog:
    """Every customer on ``version`` at list price: no discounts, no grants (module docstring)."""
    plan = Plan(name=catalog.plans[plan_id].name, versions=(version,))
    return Catalog(currency=catalog.currency, default_plan=plan_id, plans={plan_id: plan})


def default_plan_id(catalog: Catalog) -> str:
    """The plan to advise on when none is named: the only plan, else the default plan."""
    if len(catalog.plans) == 1:
        return next(iter(catalog.plans))
    if catalog.default_plan is not None:
        return catalog.default_plan
    raise AdvisorError(f"the catalog has several plans; name one with --plan-id ({', '.join(sorted(catalog.plans))})")


def customers_on_plan(catalog: Catalog, plan_id: str, customers: Iterable[str]) -> list[str]:
    """The customers the catalog assigns to ``plan_id`` (its ``default_plan`` included)."""
    return [c for c in customers if plan_grouping(catalog)(c) == plan_id]


@dataclass(frozen=True)
class ReplayRow:
    """One customer's period, billed under the candidate plan."""

    customer_id: str
    credits: Decimal
    overage_credits: Decimal
    revenue: Decimal
    cost_to_serve: Decimal
    within_allowance: bool
    invoice: Invoice = field(repr=False, compare=False)

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.cost_to_serve

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "usage_credits": _exact(self.credits),
            "within_allowance": self.within_allowance,
            "overage_credits": _exact(self.overage_credits),
            # Money as the invoices state it: rounded to the minor unit, e.g. "400.00".
            "revenue": str(self.revenue),
            "cost_to_serve": str(self.cost_to_serve),
            "margin": str(self.margin),
        }


@dataclass(frozen=True)
class Advice:
    """A period replayed under a candidate plan; money is rounded as on the invoices."""

    period: str
    plan_id: str
    plan_version: str
    currency: str
    base_fee: Decimal
    included_credits: Decimal
    overage: ChargeModel
    overrides: dict[str, str]
    percentile: Decimal
    rows: tuple[ReplayRow, ...]

    @property
    def customers(self) -> int:
        return len(self.rows)

    @property
    def credits(self) -> list[Decimal]:
        return [r.credits for r in self.rows]

    @property
    def within_allowance(self) -> int:
        return sum(1 for r in self.rows if r.within_allowance)

    @property
    def allowance_at_percentile(self) -> Decimal:
        """The included allowance that keeps ``percentile``% of these customers within it."""
        return nearest_rank(self.credits, self.percentile)

    @property
    def within_at_percentile(self) -> int:
        return share_within(self.credits, self.allowance_at_percentile)

    @property
    def credit_quantiles(self) -> dict[int, Decimal]:
        return {p: nearest_rank(self.credits, p) for p in PROFILE_PERCENTILES}

    @property
    def revenue(self) -> Decimal:
        return sum((r.revenue for r in self.rows), ZERO)

    @property
    def cost_to_serve(self) -> Decimal:
        return sum((r.cost_to_serve for r in self.rows), ZERO)

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.cost_to_serve

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "plan_id": self.plan_id,
            "plan_version": self.plan_version,
            "currency": self.currency,
            "base_fee": _exact(self.base_fee),
            "included_credits": _exact(self.included_credits),
            "overage": describe_overage(self.overage),
            "overrides": self.overrides,
            "quantile_method": QUANTILE_METHOD,
            "customers": self.customers,
            "within_allowance": self.within_allowance,
            "percentile": _exact(self.percentile),
            "allowance_at_percentile": _exact(self.allowance_at_percentile),
            "within_at_percentile": self.within_at_percentile,
            "credit_quantiles": {f"p{p}": _exact(v) for p, v in self.credit_quantiles.items()},
            "totals": {
                "revenue": str(self.revenue),
                "cost_to_serve": str(self.cost_to_serve),
                "margin": str(self.margin),
            },
            "rows": [r.to_json() for r in self.rows],
        }


def replay_period(
    usages: Mapping[str, PeriodUsage],
    catalog: Catalog,
    plan_id: str,
    version: PlanVersion,
    period: str,
    *,
    percentile: str | int | Decimal = 75,
    overrides: Mapping[str, str] | None = None,
    as_of: datetime | None = None,
) -> Advice:
    """Bill each customer's ``period`` under ``version`` (list price) and summarise (module docstring)."""
    if not usages:
        raise AdvisorError(f"no customers to replay in {period}")
    p = parse_percentile(percentile)
    replay = replay_catalog(catalog, plan_id, version)
    rows = []
    for customer in sorted(usages):
        invoice = compute_invoice(customer, period, usages[customer], replay, as_of=as_of)
        rows.append(
            ReplayRow(
                customer_id=customer,
                credits=invoice.usage.credits_used,
                overage_credits=invoice.usage.overage_credits,
                revenue=invoice.total,
                cost_to_serve=invoice.usage.cost_to_serve,
                within_allowance=invoice.usage.credits_used <= version.included_credits,
                invoice=invoice,
            )
        )
    return Advice(
        period=period,
        plan_id=plan_id,
        plan_version=version.version,
        currency=catalog.currency,
        base_fee=version.base_fee,
        included_credits=version.included_credits,
        overage=version.overage,
        overrides=dict(overrides or {}),
        percentile=p,
        rows=tuple(rows),
    )


def parse_amount(value: str | Decimal, name: str) -> Decimal:
    """A non-negative amount from the command line, read without float arithmetic."""
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise AdvisorError(f"{name} must be a number, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise AdvisorError(f"{name} must be a non-negative number, got {value}")
    return amount


def profiles_from_store(
    run_query: QueryRunner, period: str, group_of: Callable[[str], str]
) -> list[MetricProfile]:
    """Usage profiles of ``period`` from the store (``customer_period_totals``)."""
    rows = rows_by_customer(run_query, period)
    return usage_profiles({c: customer_metrics(r) for c, r in rows.items()}, group_of)


def advice_from_store(
    run_query: QueryRunner,
    catalog: Catalog,
    period: str,
    *,
    plan_id: str | None = None,
    version: str | None = None,
    included: str | Decimal | None = None,
    overage_rate: str | Decimal | None = None,
    percentile: str | int | Decimal = 75,
    all_customers: bool = False,
    as_of: datetime | None = None,
) -> Advice:
    """Replay ``period`` from the store under a plan of ``catalog``.

    The customers replayed are those ``catalog`` assigns to the plan, or every
    customer active in the period with ``all_customers``.
    """
    plan_id = plan_id or default_plan_id(catalog)
    overrides: dict[str, str] = {}
    included_amount = overage_amount = None
    if included is not None:
        included_amount = parse_amount(included, "included credits")
        overrides["included"] = _exact(included_amount)
    if overage_rate is not None:
        overage_amount = parse_amount(overage_rate, "overage rate")
        overrides["overage rate"] = _exact(overage_amount)
    candidate = candidate_version(
        catalog, plan_id, period, version=version, included=included_amount, overage_rate=overage_amount
    )
    rows = rows_by_customer(run_query, period)
    if not rows:
        raise AdvisorError(f"no rated usage in {period}")
    chosen = list(rows) if all_customers else customers_on_plan(catalog, plan_id, rows)
    if not chosen:
        raise AdvisorError(
            f"none of the {len(rows)} customers active in {period} is on plan {plan_id!r} in this catalog; "
            "use --all-customers to replay every customer under it"
        )
    usages = period_usages({c: rows[c] for c in chosen}, period)
    return replay_period(
        usages, catalog, plan_id, candidate, period, percentile=percentile, overrides=overrides, as_of=as_of
    )


# -- presenting -----------------------------------------------------------------------------------


def _exact(value: Decimal) -> str:
    """A Decimal as a plain string, exact, without the column's trailing zeros."""
    return f"{value.normalize():f}" if value else "0"


def _show(value: Decimal) -> str:
    """A figure for a table: whole numbers as they are, fractions to two places (JSON keeps them exact)."""
    if value == value.to_integral_value():
        return f"{int(value):,}"
    shown = round_money(value)
    return f"{shown:,}" if shown else _exact(value)


def _show_money(value: Decimal) -> str:
    return f"{round_money(value):,}"


def describe_overage(model: ChargeModel) -> str:
    if model.model == "per_unit":
        return f"{_exact(model.unit_price or ZERO)} per credit"
    if model.model == "package":
        return f"{_exact(model.package_price or ZERO)} per started {_show(model.package_size or ZERO)} credits"
    tiers = ", ".join(
        f"{_exact(t.unit_price)} {'above' if t.up_to is None else 'up to ' + _show(t.up_to)}" for t in model.tiers or ()
    )
    return f"{model.model}: {tiers}"


def profiles_json(period: str, by: str, profiles: Sequence[MetricProfile]) -> str:
    body = {"period": period, "by": by, "quantile_method": QUANTILE_METHOD, "profiles": [p.to_json() for p in profiles]}
    return json.dumps(body, indent=2)


def profile_table(profiles: Sequence[MetricProfile], title: str) -> Table:
    table = Table(title=title, caption="quantiles by nearest rank over the customers active in the period; "
                  "credits = usage credits (outcome rows are not counted, as on the invoice)")
    for column in ("group", "metric", "customers", "using", *(f"p{p}" for p in PROFILE_PERCENTILES), "max"):
        text = column in ("group", "metric")
        # Figures never wrap or shorten; on a narrow terminal the names fold instead.
        table.add_column(column, justify="left" if text else "right", no_wrap=not text, overflow="fold")
    previous = None
    for p in profiles:
        if previous is not None and p.group != previous:
            table.add_section()
        show = _show_money if p.metric == "cost_to_serve" else _show
        table.add_row(
            p.group if p.group != previous else "",
            p.metric,
            f"{p.customers:,}",
            f"{p.using:,}",
            *(show(v) for v in p.quantiles.values()),
            show(p.max),
        )
        previous = p.group
    return table


def advice_table(advice: Advice) -> Table:
    money = advice.currency
    title = (
        f"{advice.period} replayed under {advice.plan_id} ({advice.plan_version}"
        + (", " + ", ".join(f"{k} {v}" for k, v in advice.overrides.items()) if advice.overrides else "")
        + ")"
    )
    caption = (
        f"base fee {_show(advice.base_fee)} {money}, includes {_show(advice.included_credits)} credits, "
        f"overage {describe_overage(advice.overage)}; list price (no discounts or grants)"
    )
    table = Table(title=title, caption=caption + f"; money in {money}")
    for column in ("customer", "usage credits", "within", "overage credits", "revenue", "cost", "margin", "margin %"):
        text = column in ("customer", "within")
        table.add_column(column, justify="left" if text else "right", no_wrap=not text, overflow="fold")
    for r in advice.rows:
        table.add_row(
            r.customer_id, _show(r.credits), "yes" if r.within_allowance else "no", _show(r.overage_credits),
            f"{r.revenue:,}", f"{r.cost_to_serve:,}", f"{r.margin:,}", _percent(r.margin, r.revenue),
        )  # fmt: skip
    table.add_section()
    table.add_row(
        f"[bold]all {advice.customers}",
        _show(sum(advice.credits, ZERO)),
        f"{advice.within_allowance} of {advice.customers}",
        _show(sum((r.overage_credits for r in advice.rows), ZERO)),
        f"{advice.revenue:,}",
        f"{advice.cost_to_serve:,}",
        f"{advice.margin:,}",
        _percent(advice.margin, advice.revenue),
    )
    return table


def advice_summary(advice: Advice) -> list[str]:
    q = advice.credit_quantiles
    p = _exact(advice.percentile)
    within = f"{advice.within_allowance} of {advice.customers} customers"
    within_p = f"{advice.within_at_percentile} of {advice.customers} customers within"
    margin = f"margin {advice.margin:,} {advice.currency} ({_percent(advice.margin, advice.revenue)}%)"
    return [
        f"Within the allowance of {_show(advice.included_credits)} credits: {within}",
        "Customers' usage credits (nearest rank): " + ", ".join(f"p{k} {_show(v)}" for k, v in q.items()),
        f"Allowance at p{p}: {_show(advice.allowance_at_percentile)} credits ({within_p})",
        f"Revenue {advice.revenue:,} - cost to serve {advice.cost_to_serve:,} = {margin}",
    ]


def _percent(part: Decimal, whole: Decimal) -> str:
    return f"{part / whole * HUNDRED:.1f}" if whole else "-"


#: A spread wider than this (largest / median customer credits) draws the distribution on a log axis.
LOG_AXIS_SPREAD = 10
#: A customer whose revenue or cost is more than this times the next one's is clipped off the bar chart
#: and labelled with its figures, so the other bars stay readable.
CLIP_FACTOR = 3


@dataclass(frozen=True)
class ChartScales:
    """How the chart keeps every customer readable next to a heavy one."""

    #: The credit axis of the distribution is logarithmic (largest > LOG_AXIS_SPREAD x median).
    log_credits: bool
    #: The top of the bar chart's range when a customer is cut off it (else None: everything fits).
    bar_top: float | None
    #: The customers whose bars are cut, labelled with their figures.
    clipped: tuple[str, ...]


def chart_scales(advice: Advice) -> ChartScales:
    rows = sorted(advice.rows, key=lambda r: (r.credits, r.customer_id))
    credits = [r.credits for r in rows]
    median = credits[(len(credits) - 1) // 2] if credits else ZERO
    log_credits = len(credits) > 1 and credits[-1] > LOG_AXIS_SPREAD * max(median, Decimal(1))
    heights = sorted(max(r.revenue, r.cost_to_serve) for r in rows)
    if len(heights) > 1 and heights[-2] > 0 and heights[-1] > CLIP_FACTOR * heights[-2]:
        top = float(heights[-2]) * 1.25
        clipped = tuple(r.customer_id for r in rows if float(max(r.revenue, r.cost_to_serve)) > top)
        return ChartScales(log_credits, top, clipped)
    return ChartScales(log_credits, None, ())


def write_advice_chart(advice: Advice, path: Path) -> Path:
    """A PNG: customers' usage credits as a cumulative distribution with the allowances marked, and
    revenue against cost to serve per customer. Floats are for drawing only.

    Readable with one heavy customer: when the largest customer used more than
    ``LOG_AXIS_SPREAD`` times the median customer's credits, the distribution's
    credit axis is logarithmic (symlog: 0 stays on the axis) and the largest customer
    is labelled; on the bar chart a customer whose revenue or cost is more than
    ``CLIP_FACTOR`` times the next highest is cut at the top of a range that fits
    the others, and labelled with its exact figures.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    thousands = FuncFormatter(lambda value, _pos: f"{value:,.0f}")
    rows = sorted(advice.rows, key=lambda r: (r.credits, r.customer_id))
    n = len(rows)
    credits = [float(r.credits) for r in rows]
    figure = Figure(figsize=(13, 5.6), layout="constrained")
    FigureCanvasAgg(figure)
    cdf, money = figure.subplots(1, 2, width_ratios=(1, 1.25))

    # Left: share of customers at or below each credit total.
    scales = chart_scales(advice)
    log_axis = scales.log_credits
    xs = [0.0, *credits]
    ys = [0.0, *((i + 1) / n for i in range(n))]
    cdf.step(xs, ys, where="post", color="#1f4e79", linewidth=2, label="customers at or below")
    cdf.plot(credits, [(i + 1) / n for i in range(n)], "o", color="#1f4e79", markersize=4)
    included = float(advice.included_credits)
    within_label = f"included {_show(advice.included_credits)}: {advice.within_allowance} of {n} within"
    cdf.axvline(included, color="#c0392b", linewidth=2, label=within_label)
    p = _exact(advice.percentile)
    at_p = float(advice.allowance_at_percentile)
    cdf.axvline(at_p, color="#27ae60", linestyle="--", linewidth=2,
                label=f"p{p} allowance {_show(advice.allowance_at_percentile)}: "
                      f"{advice.within_at_percentile} of {n} within")  # fmt: skip
    cdf.axhline(float(advice.percentile) / 100, color="#27ae60", linestyle=":", linewidth=1)
    cdf.set_ylim(0, 1.05)
    if log_axis:
        # Linear below the smallest non-zero total's order of magnitude, logarithmic above it.
        smallest = min((c for c in credits if c > 0), default=1.0)
        low = max(0, math.floor(math.log10(smallest)))
        cdf.set_xscale("symlog", linthresh=10**low)
        cdf.set_xlim(left=0, right=credits[-1] * 2)
        cdf.set_xticks([0.0] + [10.0**k for k in range(low, math.floor(math.log10(credits[-1])) + 1)])
        cdf.minorticks_off()
        heaviest = rows[-1]
        cdf.annotate(f"{heaviest.customer_id}\n{_show(heaviest.credits)}", (credits[-1], 1.0),
                     xytext=(-8, -28), textcoords="offset points", ha="right", fontsize=9, color="#1f4e79",
                     arrowprops={"arrowstyle": "->", "color": "#1f4e79"})  # fmt: skip
    else:
        cdf.set_xlim(left=0)
    cdf.yaxis.set_major_formatter(PercentFormatter(1.0))
    cdf.xaxis.set_major_formatter(thousands)
    scale = " (log scale)" if log_axis else ""
    cdf.set_xlabel(f"usage credits used in {advice.period}{scale}")
    cdf.set_ylabel("share of customers")
    cdf.set_title(f"Customers' usage credits, {advice.period} ({n} customers)")
    cdf.grid(alpha=0.3, which="both")
    cdf.legend(loc="lower right", fontsize=9)

    # Right: what each customer would pay against what it costs to serve, by credits.
    positions = list(range(n))
    width = 0.4
    revenue = [float(r.revenue) for r in rows]
    cost = [float(r.cost_to_serve) for r in rows]
    money.bar([x - width / 2 for x in positions], revenue, width, color="#1f4e79", label="revenue")
    money.bar([x + width / 2 for x in positions], cost, width, color="#e67e22", label="cost to serve")
    if scales.bar_top is not None:
        top = scales.bar_top
        money.set_ylim(0, top)
        for i, r in enumerate(rows):
            if r.customer_id in scales.clipped:
                money.annotate(
                    f"{r.customer_id}: revenue {_show(r.revenue)}, cost {_show(r.cost_to_serve)} {advice.currency}\n"
                    "(bar cut: off this scale)",
                    (i, top), xytext=(-10, -70), textcoords="offset points", ha="right", fontsize=9,
                    color="#c0392b", arrowprops={"arrowstyle": "->", "color": "#c0392b"},
                    bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#c0392b"},
                )  # fmt: skip
    within = sum(1 for r in rows if r.within_allowance)
    if 0 < within < n:
        money.axvline(within - 0.5, color="#c0392b", linewidth=1.5, linestyle="--")
        if within > 0.7 * n:  # the line is near the right edge: the label goes to its left
            money.text(within - 0.55, 0.97, "over the allowance →", transform=money.get_xaxis_transform(),
                       color="#c0392b", fontsize=9, va="top", ha="right")  # fmt: skip
        else:
            money.text(within - 0.45, 0.97, " over the allowance →", transform=money.get_xaxis_transform(),
                       color="#c0392b", fontsize=9, va="top")  # fmt: skip
    if n <= 40:
        money.set_xticks(positions, [r.customer_id for r in rows], rotation=60, ha="right", fontsize=8)
    else:
        money.set_xticks([])
        money.set_xlabel("customers, by usage credits used")
    money.yaxis.set_major_formatter(thousands)
    money.set_ylabel(advice.currency)
    money.set_title(
        f"{advice.plan_id} ({advice.plan_version}): revenue {advice.revenue:,} vs cost {advice.cost_to_serve:,} "
        f"{advice.currency}, margin {_percent(advice.margin, advice.revenue)}%",
        fontsize=10,
    )
    money.grid(axis="y", alpha=0.3)
    money.legend(loc="upper left", fontsize=9)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, format="png")
    return path
