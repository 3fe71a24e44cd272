"""The Period type: labels, neighbours and bounds of UTC calendar months."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.periods import (
    Period,
    next_period,
    period_bounds,
    period_of,
    periods_between,
    previous_period,
)

UTC = timezone.utc


def test_labels_and_neighbours_across_the_year_end() -> None:
    assert str(Period.parse("2026-12").next()) == "2027-01" == next_period("2026-12")
    assert str(Period.parse("2027-01").previous()) == "2026-12" == previous_period("2027-01")
    assert periods_between("2026-11", "2027-02") == ["2026-11", "2026-12", "2027-01", "2027-02"]
    assert periods_between("2026-11", "2026-10") == ["2026-11"]


def test_bounds_are_utc_and_end_exclusive() -> None:
    assert period_bounds("2024-02") == (datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC))
    assert Period.parse("2024-02").end - Period.parse("2024-02").start == timedelta(days=29)


def test_the_period_of_an_instant_is_read_in_utc() -> None:
    # 23:30 on 30 November in UTC-2 is 01:30 on 1 December in UTC.
    assert period_of(datetime(2026, 11, 30, 23, 30, tzinfo=timezone(timedelta(hours=-2)))) == "2026-12"
    assert period_of(datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC)) == "2026-11"
    with pytest.raises(ValueError, match="timezone-aware"):
        Period.of(datetime(2026, 11, 30))


@pytest.mark.parametrize("text", ["2026-13", "2026-00", "2026-1", "26-11", "2026-11-01", "", "0000-01", " 2026-11"])
def test_a_bad_label_is_refused_with_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        Period.parse(text)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2999, 12, 31), timezones=st.just(UTC)))
def test_every_instant_lies_in_its_period_and_months_tile(at: datetime) -> None:
    period = Period.of(at)
    assert period.start <= at < period.end
    assert period.next().start == period.end and period.next().previous() == period
    assert Period.parse(str(period)) == period
