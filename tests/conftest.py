"""Fixtures every tier shares: the test's clock, and month-boundary runs of the tests that read it.

Tests never depend on the day they run. A test that means "now" takes the ``now``
fixture (read once, when the test starts) or reads the clock once the pipeline it
starts is running, and derives its periods from that value; a test that means
"last month" or "the 1st" says so from it.

Tests that read the clock are marked ``clock``, and each runs once more at every
instant of ``MONTH_BOUNDARIES`` (ids ``[clock=...]``): the test starts at that
instant and the clock ticks on from there, in this process (time-machine) and in
every Python process the test starts (``tests/clock_travel/sitecustomize.py`` on
``PYTHONPATH``; a test that builds a child's environment from scratch adds
:func:`clock_env`). ``METERSTREAM_TEST_CLOCK_AT=2027-01-31T23:59:59+00:00``
starts every selected test at that instant instead.

The Kafka broker and the ClickHouse engine keep the real time, as servers whose
clocks differ from the application's do. The instants are in the past because
the broker refuses record timestamps more than an hour ahead of its own clock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import settings

from meterstream.clock import utc_now

#: Hypothesis profiles: ``make test`` runs ``full`` (100 examples a property, more where a test
#: asks); ``make test-fast`` picks ``fast`` through this variable for a quick loop. Neither has a
#: per-example deadline: the unit tier runs on every core beside the services, and a test asserts
#: what the code answers, never how fast (bench/ measures that).
HYPOTHESIS_PROFILE_ENV = "METERSTREAM_HYPOTHESIS_PROFILE"
settings.register_profile("full", deadline=None)
settings.register_profile("fast", max_examples=10, deadline=None)
settings.load_profile(os.environ.get(HYPOTHESIS_PROFILE_ENV, "full"))

CLOCK_AT_ENV = "METERSTREAM_TEST_CLOCK_AT"
OFFSET_ENV = "METERSTREAM_TEST_CLOCK_OFFSET"
TRAVEL_DIR = Path(__file__).parent / "clock_travel"

#: Where the ``clock`` tests run besides the real time. A test starts there and its first seconds
#: (starting a worker, say) cross into the next month, so a worker that started in one month
#: rates, alerts and settles in the next.
MONTH_BOUNDARIES = {
    "last-second-of-a-30-day-month": "2026-11-30T23:59:59+00:00",
    "first-of-a-month": "2026-11-01T00:00:00+00:00",
    "last-second-of-29-february": "2024-02-29T23:59:59+00:00",
    "last-second-of-a-31-day-month": "2026-10-31T23:59:59+00:00",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "clock_at" in metafunc.fixturenames and metafunc.definition.get_closest_marker("clock"):
        if not os.environ.get(CLOCK_AT_ENV):
            metafunc.parametrize(
                "clock_at",
                [None, *MONTH_BOUNDARIES.values()],
                ids=["clock=real", *(f"clock={name}" for name in MONTH_BOUNDARIES)],
            )


@pytest.fixture
def clock_at() -> str | None:
    """The instant this test starts at, or None for the real clock."""
    return os.environ.get(CLOCK_AT_ENV) or None


def clock_env() -> dict[str, str]:
    """The variables that move a child process's clock with this one's (none when the clock is real).

    For tests that build a subprocess's environment from scratch instead of inheriting ``os.environ``.
    """
    return {name: os.environ[name] for name in (OFFSET_ENV, "PYTHONPATH") if os.environ.get(OFFSET_ENV)}


@pytest.fixture(autouse=True)
def _moved_clock(clock_at: str | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start the test at ``clock_at`` (and every Python process it starts), ticking from there."""
    if clock_at is None:
        yield
        return
    import time_machine

    at = datetime.fromisoformat(clock_at)
    if at.tzinfo is None:
        raise pytest.UsageError(f"the test clock needs a timezone, got {clock_at!r}")
    offset = at.timestamp() - time.time()
    monkeypatch.setenv(OFFSET_ENV, repr(offset))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TRAVEL_DIR), os.environ.get("PYTHONPATH")])))
    with time_machine.travel(at, tick=True):
        yield


@pytest.fixture
def now(_moved_clock: None) -> datetime:
    """The test's "now": the clock read once, when the test starts."""
    return utc_now()
