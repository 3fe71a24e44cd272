"""The one clock every part of meterstream reads "now" from.

A billing pipeline decides by time: which period an event belongs to, whether
that period is closed, which windows have expired, which days are settled.
Those decisions take a ``Clock`` (a callable returning an aware UTC datetime)
as a dependency, defaulting to :func:`utc_now`, so a test can hand in a fixed
or moved clock instead of depending on the day it runs. Nothing else in the
package calls ``datetime.now``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from meterstream.periods import period_of

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The system clock, as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def fixed_clock(at: datetime) -> Clock:
    """A clock that always says ``at`` (which must carry a timezone)."""
    if at.tzinfo is None:
        raise ValueError("a fixed clock needs an aware datetime")
    at = at.astimezone(timezone.utc)
    return lambda: at


def current_period(clock: Clock = utc_now) -> str:
    """The billing period (UTC calendar month, ``YYYY-MM``) the clock is in."""
    return period_of(clock())
