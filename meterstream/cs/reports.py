"""The customer-success reports: a saved query each, plus the pricing engine where money is involved.

Every function takes ``run(name, **params)`` (a saved-query runner, see
:func:`meterstream.cli_common.query_runner`) and returns plain rows
(dicts, Decimals at full precision). The SQL is in ``sql/queries/``; what is
not SQL is the pricing engine's (:mod:`meterstream.pricing`,
:mod:`meterstream.billing`), never a second copy of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from meterstream.billing import QueryRunner, group_by_customer, margin_report, period_invoices
from meterstream.pricing.plans import Catalog
from meterstream.pricing.rating import RatingError, cache_saving

ZERO = Decimal(0)


@dataclass
class Rows:
    """Report rows and what could not be computed (shown as warnings, never dropped silently)."""

    rows: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)


# -- month to date -----------------------------------------------------------------------------

#: The three kinds of credits, one meaning each (README, "Credits: three words"):
#: usage credits    - the price book's credits for usage events (tokens, requests, documents, ...);
#:                    what the invoice's included allowance and overage are measured in;
#: outcome credits  - the price book's credits for outcomes (net of reversals); budgets count
#:                    them beside usage credits, invoices price outcomes in money instead;
#: billed credits   - the overage credits the invoice charges for: usage credits above the
#:                    allowance, less those paid from credit grants.
CREDIT_KINDS = {"usage": "usage_credits", "outcome": "outcome_credits"}


def usage_row(customer_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One customer's month-to-date figures from its ``period_usage`` rows (all of them, late ones included)."""
    out: dict[str, Any] = {
        "customer_id": customer_id, "events": 0, "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0,
        "usage_credits": ZERO, "outcome_credits": ZERO, "cost_to_serve": ZERO,
    }  # fmt: skip
    models: set[str] = set()
    for row in rows:
        for name in ("events", "input_tokens", "cached_input_tokens", "output_tokens"):
            out[name] += int(row[name])
        out[CREDIT_KINDS[row["kind"]]] += row["credits"]
        out["cost_to_serve"] += row["cost_to_serve"]
        if row["model"]:
            models.add(row["model"])
    out["models"] = len(models)
    return out


def month_to_date(
    run: QueryRunner, catalog: Catalog | None, period: str, customer: str = "", *, as_of: Any = None
) -> Rows:
    """Month-to-date usage per customer and, with a catalog, its spend (the invoice preview).

    Without a catalog: ``month_to_date.sql``. With one: a single ``period_usage.sql`` query
    for the period gives both the usage figures and every customer's invoice aggregate;
    :func:`meterstream.billing.period_invoices` prices them with the engine, so the money is
    exactly what ``meterstream invoice`` prints, without an invoice query per customer.
    """
    if catalog is None:
        return Rows(run("month_to_date", period=period, customer=customer).dicts())
    grouped = group_by_customer(run("period_usage", period=period, customer=customer).dicts())
    invoices = period_invoices(run, catalog, period, grouped, as_of=as_of)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for customer_id, customer_rows in grouped.items():
        row = usage_row(customer_id, customer_rows)
        invoice = invoices[customer_id]
        if isinstance(invoice, ValueError):
            problems.append(f"{customer_id}: no invoice preview: {invoice}")
            row.update(spend=None, currency=catalog.currency, billed_credits=None, plan_version=None,
                       invoice_status=None)  # fmt: skip
        else:
            row.update(
                spend=invoice.total, currency=invoice.currency, billed_credits=invoice.usage.billed_overage_credits,
                plan_version=invoice.plan_version, invoice_status=invoice.status,
            )  # fmt: skip
        rows.append(row)
    rows.sort(key=lambda r: (-(r["usage_credits"] + r["outcome_credits"]), r["customer_id"]))
    return Rows(rows, problems)


# -- top customers -----------------------------------------------------------------------------


def top_customers(run: QueryRunner, period: str, limit: int = 10) -> Rows:
    """Customers by cost to serve, most expensive first (``top_customers.sql``)."""
    return Rows(run("top_customers", period=period, limit=str(limit)).dicts())


# -- margin ------------------------------------------------------------------------------------


def margin(run: QueryRunner, catalog: Catalog, period: str, by: str) -> Rows:
    """Revenue, cost to serve and margin by customer, workflow or model (:func:`margin_report`)."""
    rows = []
    for r in margin_report(run, catalog, period, by):
        revenue, cost = r.revenue, r.cost_to_serve
        rows.append({
            by: r.customer_id or r.workflow_id or r.model, "events": r.events, "usage_credits": r.credits,
            "revenue": revenue, "cost_to_serve": cost, "margin": revenue - cost,
            "margin_percent": (revenue - cost) / revenue if revenue else None,
        })  # fmt: skip
    return Rows(rows)


# -- cache savings -----------------------------------------------------------------------------

CACHE_GROUPINGS: dict[str, Callable[[dict[str, Any]], tuple[str, ...]]] = {
    "customer-model": lambda row: (row["customer_id"], row["model"]),
    "customer": lambda row: (row["customer_id"],),
    "model": lambda row: (row["model"],),
}
_CACHE_KEYS = {"customer-model": ("customer_id", "model"), "customer": ("customer_id",), "model": ("model",)}
_CACHE_SUMS = ("events", "events_with_cache_hits", "input_tokens", "cached_input_tokens", "usage_credits",
               "cost_to_serve", "usage_credits_saved", "cost_saved", "unvalued_cached_tokens")  # fmt: skip


def cache_savings(run: QueryRunner, catalog: Catalog, period: str, customer: str = "", by: str = "customer-model") -> Rows:
    """What prompt caching saved, in cost to serve (ours) and in credits (the customer's).

    Per row of ``cache_savings.sql`` (customer, model, plan version), with the price
    book of the plan version that rated those tokens (:func:`cache_saving`):

        cost_saved          = cached_input_tokens × (cost input − cost cached input) / 1,000,000
        usage_credits_saved = cached_input_tokens × (credits input − credits cached input) / 1,000

    ``hit_rate`` is cached / input tokens (input includes cached). Tokens rated by a plan
    version the catalog does not know are counted in ``unvalued_cached_tokens``.
    """
    group_key = CACHE_GROUPINGS[by]
    keys = _CACHE_KEYS[by]
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    problems: list[str] = []
    for row in run("cache_savings", period=period, customer=customer).dicts():
        version = catalog.version_named(row["plan_version"])
        cached = int(row["cached_input_tokens"])
        credits_saved = cost_saved = ZERO
        unvalued = 0
        try:
            if version is None:
                raise RatingError(f"plan version {row['plan_version']!r} is not in the catalog")
            saving = cache_saving(version.price_book, row["model"], cached)
            credits_saved, cost_saved = saving.credits, saving.cost_to_serve
        except RatingError as exc:
            if cached:
                unvalued = cached
                problems.append(f"{row['customer_id']} {row['model']}: {cached:,} cached tokens not valued: {exc}")
        out = groups.setdefault(group_key(row), {**{k: row[k] for k in keys}, **{s: ZERO for s in _CACHE_SUMS}})
        for name, value in (("usage_credits_saved", credits_saved), ("cost_saved", cost_saved),
                            ("unvalued_cached_tokens", unvalued)):  # fmt: skip
            out[name] += value
        for name in ("events", "events_with_cache_hits", "input_tokens", "cached_input_tokens", "cost_to_serve"):
            out[name] += row[name]
        out["usage_credits"] += row["credits"]  # token rows only: usage credits
    rows = []
    for key in sorted(groups):
        out = groups[key]
        for name in ("events", "events_with_cache_hits", "input_tokens", "cached_input_tokens", "unvalued_cached_tokens"):
            out[name] = int(out[name])
        out["hit_rate"] = Decimal(out["cached_input_tokens"]) / out["input_tokens"] if out["input_tokens"] else None
        # What the same tokens would have cost and been charged without the cache.
        out["cost_without_cache"] = out["cost_to_serve"] + out["cost_saved"]
        out["usage_credits_without_cache"] = out["usage_credits"] + out["usage_credits_saved"]
        rows.append(out)
    return Rows(rows, problems)


# -- cost per outcome --------------------------------------------------------------------------


def cost_per_outcome(run: QueryRunner, period: str, customer: str = "") -> Rows:
    """Cost to serve (and usage credits) per outcome, by outcome type and attribution."""
    return Rows(run("cost_per_outcome", period=period, customer=customer).dicts())


# -- time series from the rollups -----------------------------------------------------------------


def usage_series(run: QueryRunner, grain: str, period: str, customer: str = "", day: str = "") -> Rows:
    """Hourly or daily usage per customer × meter × model × workflow, from the rollups (exact)."""
    if grain == "hourly":
        rows = run("usage_hourly", period=period, customer=customer, day=day).dicts()
    elif grain == "daily":
        rows = run("usage_daily", period=period, customer=customer).dicts()
    else:
        raise ValueError(f"grain is hourly or daily, not {grain!r}")
    for row in rows:  # a rollup row is one meter: "outcome" rows hold outcome credits, the others usage credits
        credits = row.pop("credits")
        outcome = row["meter"] == "outcome"
        row["usage_credits"], row["outcome_credits"] = (ZERO, credits) if outcome else (credits, ZERO)
    return Rows(rows)
