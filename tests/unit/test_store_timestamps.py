"""Timestamps read back from the store are timezone-aware UTC, whichever way the rows arrive."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from meterstream.storage.clickhouse import QueryResult, as_utc

UTC = timezone.utc


def test_naive_values_are_utc_and_aware_values_are_converted():
    assert as_utc(datetime(2026, 11, 20, 12, 0)) == datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    plus_two = timezone(timedelta(hours=2))
    converted = as_utc(datetime(2026, 11, 20, 14, 0, tzinfo=plus_two))
    assert converted == datetime(2026, 11, 20, 12, 0, tzinfo=UTC) and converted.tzinfo is UTC


def test_every_datetime_column_of_a_result_is_aware():
    result = QueryResult(
        columns=["crossed_at", "maybe", "days", "n"],
        types=["DateTime64(3, 'UTC')", "Nullable(DateTime64(3, 'UTC'))", "Array(DateTime('UTC'))", "UInt64"],
        rows=[[datetime(2026, 11, 20, 12, 0), None, [datetime(2026, 11, 1)], 3]],
    )
    [row] = result.dicts()
    assert row["crossed_at"].tzinfo is UTC and row["maybe"] is None and row["days"][0].tzinfo is UTC
    # The same through the worker's JSON endpoint (the CLI's path while a worker owns chDB).
    scalars = QueryResult(columns=result.columns[:2], types=result.types[:2], rows=[r[:2] for r in result.rows])
    [revived] = QueryResult.from_json_dict(scalars.to_json_dict()).dicts()
    assert revived == {"crossed_at": row["crossed_at"], "maybe": None} and revived["crossed_at"].tzinfo is not None
