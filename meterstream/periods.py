"""Billing periods: the one type for period arithmetic in the package.

A period is a calendar month in UTC, written ``YYYY-MM`` wherever it travels (Kafka keys,
ClickHouse columns, JSON, the CLI). Subscriptions anchored on another day of the month
(``billing_anchor: anniversary``) keep the same labels: the period labelled ``2026-11`` is the
one that starts in November (:func:`meterstream.pricing.plans.anniversary_bounds`).

Every label is made and read here (:meth:`Period.of`, :meth:`Period.parse`, :func:`period_of`),
and so are the neighbours and bounds of a month. The one other place that writes a label is
the event's own ``period`` property (:mod:`meterstream.schemas.events`), inline because the
worker asks it for every event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

_LABEL = re.compile(r"(\d{4})-(\d{2})")


@dataclass(frozen=True, order=True, slots=True)
class Period:
    """A UTC calendar month; ``str(period)`` is its ``YYYY-MM`` label."""

    year: int
    month: int

    def __post_init__(self) -> None:
        if not (1 <= self.year <= 9999 and 1 <= self.month <= 12):
            raise ValueError(f"no such period: year {self.year}, month {self.month}")

    @classmethod
    def parse(cls, text: str) -> Period:
        """``"2026-11"`` -> ``Period(2026, 11)``; anything else is a ValueError that quotes it."""
        match = _LABEL.fullmatch(text) if isinstance(text, str) else None
        if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1:
            raise ValueError(f"period must be 'YYYY-MM', got {text!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def of(cls, at: datetime) -> Period:
        """The period ``at`` falls in (an aware datetime, read in UTC)."""
        if at.tzinfo is None:
            raise ValueError(f"a period needs a timezone-aware datetime, got {at.isoformat()}")
        utc = at.astimezone(timezone.utc)
        return cls(utc.year, utc.month)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def next(self) -> Period:
        return Period(self.year + 1, 1) if self.month == 12 else Period(self.year, self.month + 1)

    def previous(self) -> Period:
        return Period(self.year - 1, 12) if self.month == 1 else Period(self.year, self.month - 1)

    @property
    def start(self) -> datetime:
        """The first instant of the month, UTC."""
        return datetime(self.year, self.month, 1, tzinfo=timezone.utc)

    @property
    def end(self) -> datetime:
        """The first instant of the next month, UTC (end exclusive)."""
        return self.next().start

    def through(self, last: Period) -> list[Period]:
        """This period and every one after it up to ``last``, inclusive (empty if ``last`` is earlier)."""
        periods: list[Period] = []
        current = self
        while current <= last:
            periods.append(current)
            current = current.next()
        return periods


def period_of(at: datetime) -> str:
    """The label of the period ``at`` falls in: ``2026-11-30T23:59:59Z`` -> ``"2026-11"``."""
    return str(Period.of(at))


@lru_cache(maxsize=512)  # the worker asks for every event; months are few
def period_bounds(period: str) -> tuple[datetime, datetime]:
    """``"2026-11"`` -> (2026-11-01T00:00Z, 2026-12-01T00:00Z): a calendar month in UTC, end exclusive."""
    parsed = Period.parse(period)
    return parsed.start, parsed.end


def next_period(period: str) -> str:
    return str(Period.parse(period).next())


def previous_period(period: str) -> str:
    return str(Period.parse(period).previous())


def periods_between(first: str, last: str) -> list[str]:
    """Labels from ``first`` through ``last`` inclusive (``first`` alone if ``last`` is earlier)."""
    return [str(p) for p in Period.parse(first).through(Period.parse(last))] or [first]
