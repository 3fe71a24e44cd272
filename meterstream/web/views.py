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


def usage_view(
    customer_id: str, window: Window, rows: Iterable[dict[str, Any]], *, show_cost: bool
) -> dict[str, Any]:
    """``customer_usage_series`` rows, one point per bucket of the window (zero where nothing was used)."""
    found = {_bucket_time(row["bucket_start"]): row for row in rows}
    series = []
    total_events, total_credits, total_cost = 0, ZERO, ZERO
    for start in window.starts:
        row = found.get(start)
        events = int(row["events"]) if row else 0
        credits = row["credits"] if row else ZERO
        cost = row["cost_to_serve"] if row else ZERO
        total_events += events
        total_credits += credits
        total_cost += cost
        point: dict[str, Any] = {"start": iso(start), "events": events, "credits": dec(credits)}
        if show_cost:
            point["cost_to_serve"] = dec(cost)
        series.append(point)
    totals: dict[str, Any] = {"events": total_events, "credits": dec(total_credits)}
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


def burn_down_view(
    customer_id: str,
    period: str,
    now: datetime,
    daily_rows: Iterable[dict[str, Any]],
    budget: Budget | None,
    *,
    show_cost: bool,
) -> dict[str, Any]:
    """Month-to-date credits against the budget, day by day, with a linear projection.

    ``daily_rows`` are ``customer_usage_series`` day buckets over the whole period;
    their sum is the month-to-date figure the worker's alerts are computed on
    (the period is the UTC calendar month the event occurred in).

    Projection: month-to-date credits spread evenly over the time elapsed so far
    (at least one hour, so the first minutes of a month do not explode it),
    extended to the end of the month.
    """
    start, end = period_bounds(period)
    now = min(max(now.astimezone(timezone.utc), start), end)
    by_day = {_bucket_time(row["bucket_start"]).date(): row for row in daily_rows}
    days = []
    credits = cost = ZERO
    events = 0
    day = start
    while day < end:
        row = by_day.get(day.date())
        day_credits = row["credits"] if row else ZERO
        credits += day_credits
        cost += row["cost_to_serve"] if row else ZERO
        events += int(row["events"]) if row else 0
        if day <= now:
            days.append({"date": day.date().isoformat(), "credits": dec(day_credits), "cumulative_credits": dec(credits)})
        day += timedelta(days=1)

    month_seconds = Decimal(int((end - start).total_seconds()))
    elapsed_seconds = Decimal(max(int((now - start).total_seconds()), 3600))
    projected = credits * month_seconds / elapsed_seconds if elapsed_seconds < month_seconds else credits

    month_to_date: dict[str, Any] = {"events": events, "credits": dec(credits)}
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
        "projection": {"method": "linear", "month_end_credits": dec(projected.quantize(Decimal("0.01")))},
        "days": days,
    }
    if budget is None:
        return view
    limit = budget.monthly_credits
    view["budget"] = {
        "monthly_credits": dec(limit),
        "thresholds": list(budget.thresholds),
        "action": budget.action.value,
    }
    view["used_percent"] = dec((credits * 100 / limit).quantize(Decimal("0.01")))
    view["thresholds"] = [
        {"percent": t, "credits": dec(limit * t / 100), "reached": credits * 100 >= limit * t}
        for t in budget.thresholds
    ]
    projection = view["projection"]
    projection["month_end_percent"] = dec((projected * 100 / limit).quantize(Decimal("0.01")))
    if credits >= limit:
        projection["budget_reached"] = True
        projection["exhausted_at"] = None
    else:
        projection["budget_reached"] = False
        # At the current rate the budget runs out after elapsed * limit / credits.
        exhausted = None
        if credits > 0:
            seconds = elapsed_seconds * limit / credits
            if seconds < month_seconds:
                exhausted = iso(start + timedelta(seconds=int(seconds)))
        projection["exhausted_at"] = exhausted
    return view


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
