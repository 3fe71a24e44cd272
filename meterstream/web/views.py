"""What the customer sees, computed from saved-query rows: pure, no I/O.

Three views, each a JSON-ready dict with money and credits as exact decimal
strings (the page rounds only for display):

- :func:`usage_view` — credits (and cost to serve) per hour or day, zero-filled;
- :func:`burn_down_view` — month-to-date credits against the monthly budget,
  its thresholds, and a linear projection to the end of the month;
- :func:`enforcement_view` — ok / warn / downgrade / block. Until this server
  reads the enforcement-state topic, the state is *derived* from the budget
  threshold alerts the worker stored: the most severe among the period's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

from meterstream.budgets import Budget
from meterstream.pricing.plans import period_bounds
from meterstream.storage.clickhouse import as_utc

ZERO = Decimal(0)
Bucket = Literal["hour", "day"]

ENFORCEMENT_SOURCE = (
    "Derived from the budget threshold alerts stored in ClickHouse (used until the worker's decision "
    "arrives on the enforcement-state topic): ok = no threshold crossed; warn = a threshold crossed, or 100% "
    "with an alert-only budget; downgrade / block = the budget's action, carried on the alert at 100%. "
    "Run-cap and spend-spike alerts do not change it."
)


def dec(value: Decimal) -> str:
    """An exact decimal string without exponent or trailing zeros: Decimal('85.000') -> '85'."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def iso(at: datetime) -> str:
    return as_utc(at).strftime("%Y-%m-%dT%H:%M:%SZ")


def sql_time(at: datetime) -> str:
    """The form the saved queries take their time bounds in (UTC)."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class Window:
    bucket: Bucket
    since: datetime
    until: datetime
    starts: tuple[datetime, ...]


def usage_window(now: datetime, days: int, bucket: Bucket) -> Window:
    """The last ``days`` calendar days (UTC) up to ``now``, in whole buckets; today/this hour included."""
    now = now.astimezone(timezone.utc)
    if bucket == "hour":
        last = now.replace(minute=0, second=0, microsecond=0)
        step = timedelta(hours=1)
        count = days * 24
    else:
        last = now.replace(hour=0, minute=0, second=0, microsecond=0)
        step = timedelta(days=1)
        count = days
    starts = tuple(last - step * i for i in reversed(range(count)))
    return Window(bucket=bucket, since=starts[0], until=last + step, starts=starts)


def _bucket_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)


def _credits(row: dict[str, Any] | None) -> tuple[Decimal, Decimal]:
    return (row["usage_credits"], row["outcome_credits"]) if row else (ZERO, ZERO)


def usage_view(
    customer_id: str, window: Window, rows: Iterable[dict[str, Any]], *, show_cost: bool
) -> dict[str, Any]:
    """``customer_usage_series`` rows, one point per bucket of the window (zero where nothing was used).

    Usage credits and outcome credits apart (their sum is what a budget counts).
    """
    found = {_bucket_time(row["bucket_start"]): row for row in rows}
    series = []
    total_events, total_usage, total_outcome, total_cost = 0, ZERO, ZERO, ZERO
    for start in window.starts:
        row = found.get(start)
        events = int(row["events"]) if row else 0
        usage, outcome = _credits(row)
        cost = row["cost_to_serve"] if row else ZERO
        total_events += events
        total_usage += usage
        total_outcome += outcome
        total_cost += cost
        point: dict[str, Any] = {"start": iso(start), "events": events, "usage_credits": dec(usage),
                                 "outcome_credits": dec(outcome)}  # fmt: skip
        if show_cost:
            point["cost_to_serve"] = dec(cost)
        series.append(point)
    totals: dict[str, Any] = {"events": total_events, "usage_credits": dec(total_usage),
                              "outcome_credits": dec(total_outcome)}  # fmt: skip
    if show_cost:
        totals["cost_to_serve"] = dec(total_cost)
    return {
        "customer_id": customer_id,
        "bucket": window.bucket,
        "since": iso(window.since),
        "until": iso(window.until),
        "currency": "USD",
        "totals": totals,
        "series": series,
    }


#: The projection means something only after this much of the period: on the 1st a few hours
#: extrapolated to a month said 3,741%.
PROJECTION_AFTER = timedelta(hours=72)
PROJECTION_RULE = (
    "Shown from 72 hours into the month: month-to-date spend spread evenly over the time elapsed, "
    "extended to the month's end. Earlier, a few hours say too little about a whole month."
)


def burn_down_view(
    customer_id: str,
    period: str,
    now: datetime,
    daily_rows: Iterable[dict[str, Any]],
    budget: Budget | None,
    *,
    show_cost: bool,
    currency: str = "USD",
    bounds: tuple[datetime, datetime] | None = None,
) -> dict[str, Any]:
    """Month-to-date spend against the budget, in the budget's own unit, day by day, with a projection.

    ``daily_rows`` are ``customer_usage_series`` day buckets over the whole period.
    A budget caps **budget credits** = usage credits + outcome credits, the figure the
    worker's alerts are computed on. A budget set in money (``monthly_amount``) is
    shown in money: spend = budget credits × (amount / monthly credits), which is the
    plan's credit value it was converted at; credits are the secondary figure.

    ``used_percent`` is the one percentage of the budget. The projection
    (:data:`PROJECTION_RULE`) is ``None`` until 72 hours of the month have passed.
    ``bounds``: the billing period's [start, end) when it is not the calendar month ``period``
    names (an anniversary customer's, ``Catalog.billing_bounds``).
    """
    start, end = bounds or period_bounds(period)
    now = min(max(now.astimezone(timezone.utc), start), end)
    by_day = {_bucket_time(row["bucket_start"]).date(): row for row in daily_rows}
    days = []
    usage = outcome = cost = ZERO
    events = 0
    day = start
    while day < end:
        row = by_day.get(day.date())
        day_usage, day_outcome = _credits(row)
        usage += day_usage
        outcome += day_outcome
        cost += row["cost_to_serve"] if row else ZERO
        events += int(row["events"]) if row else 0
        if day <= now:
            days.append({"date": day.date().isoformat(), "budget_credits": dec(day_usage + day_outcome),
                         "cumulative_budget_credits": dec(usage + outcome)})  # fmt: skip
        day += timedelta(days=1)
    spent = usage + outcome

    month_seconds = Decimal(int((end - start).total_seconds()))
    elapsed_seconds = Decimal(int((now - start).total_seconds()))
    meaningful = now - start >= PROJECTION_AFTER
    projected = spent * month_seconds / elapsed_seconds if meaningful and elapsed_seconds < month_seconds else spent

    month_to_date: dict[str, Any] = {"events": events, "usage_credits": dec(usage), "outcome_credits": dec(outcome),
                                     "budget_credits": dec(spent)}  # fmt: skip
    if show_cost:
        month_to_date["cost_to_serve"] = dec(cost)
    view: dict[str, Any] = {
        "customer_id": customer_id,
        "period": period,
        "as_of": iso(now),
        "period_start": iso(start),
        "period_end": iso(end),
        "month_to_date": month_to_date,
        "budget": None,
        "used_percent": None,
        "thresholds": [],
        "projection": None,
        "projection_rule": PROJECTION_RULE,
        "days": days,
    }
    if meaningful:
        view["projection"] = {"method": "linear", "month_end_budget_credits": dec(projected.quantize(Decimal("0.01")))}
    if budget is None:
        return view
    limit = budget.monthly_credits
    per_credit = budget.monthly_amount / limit if budget.monthly_amount is not None else None
    view["budget"] = {
        "unit": "money" if per_credit is not None else "credits",
        "monthly_credits": dec(limit),
        "thresholds": list(budget.thresholds),
        "action": budget.action.value,
    }
    if per_credit is not None and budget.monthly_amount is not None:
        view["budget"].update(monthly_amount=dec(budget.monthly_amount), currency=currency)
        month_to_date["spent_amount"] = dec(spent * per_credit)
    view["used_percent"] = dec((spent * 100 / limit).quantize(Decimal("0.1")))
    view["thresholds"] = [
        {"percent": t, "budget_credits": dec(limit * t / 100), "reached": spent * 100 >= limit * t,
         **({"amount": dec(limit * t / 100 * per_credit)} if per_credit is not None else {})}
        for t in budget.thresholds
    ]  # fmt: skip
    if spent >= limit:
        view["budget_reached"] = True
    else:
        view["budget_reached"] = False
    projection = view["projection"]
    if projection is not None:
        if per_credit is not None:
            projection["month_end_amount"] = dec((projected * per_credit).quantize(Decimal("0.01")))
        exhausted = None
        if 0 < spent < limit:
            seconds = elapsed_seconds * limit / spent  # at the current rate the budget runs out then
            if seconds < month_seconds:
                exhausted = iso(start + timedelta(seconds=int(seconds)))
        projection["exhausted_at"] = exhausted
    return view


def breakdown_view(
    customer_id: str, period: str, previous: str, rows: list[dict[str, Any]], last: list[dict[str, Any]],
    *, show_cost: bool,
) -> dict[str, Any]:
    """Usage by model and by workflow, this period against the last (``customer_usage_breakdown`` rows)."""

    def group(source: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for row in source:
            name = row[key] or ("outcomes" if row["kind"] == "outcome" and key == "model" else
                                f"(no {key.removesuffix('_id')})")  # fmt: skip
            entry = out.setdefault(name, {"events": 0, "usage_credits": ZERO, "outcome_credits": ZERO, "cost": ZERO})
            entry["events"] += int(row["events"])
            entry["usage_credits"] += row["usage_credits"]
            entry["outcome_credits"] += row["outcome_credits"]
            entry["cost"] += row["cost_to_serve"]
        return out

    def table(key: str) -> list[dict[str, Any]]:
        now, before = group(rows, key), group(last, key)
        names = sorted(set(now) | set(before), key=lambda n: (-(now.get(n, {}).get("usage_credits", ZERO)
                                                              + now.get(n, {}).get("outcome_credits", ZERO)), n))
        out = []
        for name in names:
            a, b = now.get(name), before.get(name)
            item: dict[str, Any] = {"name": name}
            for label, entry in (("this_period", a), ("last_period", b)):
                figures: dict[str, Any] = {
                    "events": entry["events"] if entry else 0,
                    "usage_credits": dec(entry["usage_credits"] if entry else ZERO),
                    "outcome_credits": dec(entry["outcome_credits"] if entry else ZERO),
                }
                if show_cost:
                    figures["cost_to_serve"] = dec(entry["cost"] if entry else ZERO)
                item[label] = figures
            out.append(item)
        return out

    return {"customer_id": customer_id, "period": period, "previous_period": previous,
            "by_model": table("model"), "by_workflow": table("workflow_id")}  # fmt: skip


Enforcement = Literal["ok", "warn", "downgrade", "block"]
_SEVERITY: dict[str, int] = {"ok": 0, "warn": 1, "downgrade": 2, "block": 3}


def enforcement_state(alerts: Iterable[dict[str, Any]]) -> tuple[Enforcement, dict[str, Any] | None]:
    """The state the period's alerts imply, and the alert that put the customer in it (None for ok).

    Every crossed threshold warns; an alert at or above 100% carries the
    budget's action, and ``downgrade`` or ``block`` there is the state. The most
    severe wins (a budget changed mid-month may have left both). ``alerts`` come
    in the order they were crossed.
    """
    state: Enforcement = "ok"
    decided: dict[str, Any] | None = None
    for alert in alerts:
        candidate: Enforcement = "warn"
        if int(alert["threshold_percent"]) >= 100 and alert["action"] in ("downgrade", "block"):
            candidate = alert["action"]
        if _SEVERITY[candidate] > _SEVERITY[state]:
            state, decided = candidate, alert
    return state, decided


def enforcement_view(customer_id: str, period: str, alerts: list[dict[str, Any]]) -> dict[str, Any]:
    state, decided = enforcement_state(alerts)
    return {
        "customer_id": customer_id,
        "period": period,
        "state": state,
        "derived_from": "budget_alerts",
        "note": ENFORCEMENT_SOURCE,
        "since": iso(decided["crossed_at"]) if decided else None,
        "highest_threshold_crossed": max((int(a["threshold_percent"]) for a in alerts), default=None),
        "alerts": [
            {
                "threshold_percent": int(a["threshold_percent"]),
                "action": a["action"],
                "spent_credits": dec(a["spent_credits"]),
                "budget_credits": dec(a["budget_credits"]),
                "crossed_at": iso(a["crossed_at"]),
            }
            for a in alerts
        ],
    }
