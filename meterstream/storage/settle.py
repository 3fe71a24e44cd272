"""Settle closed days: per-day aggregates of ``usage_rated FINAL`` that invoices read instead of rows.

``invoice_usage``, ``month_to_date`` and ``late_usage`` (sql/queries/) take a
customer-day from ``usage_settled`` when ``usage_settled_days`` says the last run
that settled it saw exactly as many rows for it as ``usage_day_counts`` has
received by now, and read every other day from the rows: ``usage_recent FINAL``
for the last 7 days, ``usage_rated FINAL`` before (sql/007_settled_usage.sql
explains the tables). Settling is therefore an optimisation only: a day never
settled, or changed since, is read from the rows.

One run (:func:`settle`), in three statements, so that a concurrent reader or
writer never sees a wrong figure:

1. snapshot the received-row count of every customer-day before ``before`` whose
   count differs from what its last settle saw (``usage_settle_runs``). The count
   is read *before* the rows, and it is fed by a view on ``usage_recent``, itself a
   view on ``usage_rated``: an insert commits a table's part before it pushes the
   block to that table's views, so every row counted here is already in both
   tables. A row that arrives later raises the live count and so keeps its day off
   the settled path;
2. aggregate those customer-days (``usage_recent FINAL`` for recent days,
   ``usage_rated FINAL`` for older ones) into ``usage_settled`` under this run's
   ``settle_id``;
3. only then publish them in ``usage_settled_days`` (the latest ``settled_at``
   wins), so a reader never follows a run whose rows are not all written.

A customer-period in which some event id reached two different days (the copies of
an event carry the same ``occurred_at``, so this is an id reused for another event)
is not settled, and its earlier settled days are marked unusable: the queries then
read it from the rows (``usage_rated FINAL`` collapses the id over the period). A
reuse on a day not yet settled is only seen at the next run that settles a day of
that customer-period; until then that id is counted on both days.

The worker runs :func:`settle` on a timer under its store lock; ``meterstream settle``
runs it by hand (settling is idempotent, so a run beside a worker's is harmless).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from meterstream.clock import utc_now

log = logging.getLogger(__name__)

#: The queries read a day from usage_recent when it is one of the last RECENT_DAYS days
#: (``day >= toDate(now(), 'UTC') - 7`` in sql/queries); usage_recent keeps 10.
RECENT_DAYS = 7

_SNAPSHOT = """
INSERT INTO usage_settle_runs (settle_id, settled_at, period, customer_id, day, seen_rows, settleable)
WITH
    changed AS
    (
        SELECT c.period AS period, c.customer_id AS customer_id, c.day AS day, c.received AS received
        FROM
        (
            SELECT period, customer_id, day, sum(rows) AS received
            FROM usage_day_counts
            WHERE day < {before:Date}
            GROUP BY period, customer_id, day
        ) AS c
        LEFT JOIN
        (
            SELECT period, customer_id, day, seen_rows
            FROM usage_settled_days FINAL
            WHERE day < {before:Date}
        ) AS s ON c.period = s.period AND c.customer_id = s.customer_id AND c.day = s.day
        WHERE s.seen_rows != c.received
    ),
    -- Customer-periods where no event id was received on two different days: the sum over
    -- days of the distinct ids per day equals the distinct ids over the period (from the
    -- usage_daily rollup; every day of the period, today included). A 64-bit hash
    -- collision can only make them differ, i.e. keep a customer-period off the settled path.
    one_day_per_event AS
    (
        SELECT period, customer_id
        FROM
        (
            SELECT period, customer_id, day, uniqExactMerge(event_ids) AS ids, uniqExactMergeState(event_ids) AS id_set
            FROM usage_daily
            WHERE (period, customer_id) IN (SELECT period, customer_id FROM changed)
            GROUP BY period, customer_id, day
        )
        GROUP BY period, customer_id
        HAVING sum(ids) = uniqExactMerge(id_set)
    )
SELECT
    {settle_id:UUID}, {settled_at:DateTime64(6, 'UTC')}, period, customer_id, day, received,
    (period, customer_id) IN (SELECT period, customer_id FROM one_day_per_event)
FROM changed
"""

# Recent days from usage_recent (its day partitions: only those days are read), older
# ones (late arrivals) from usage_rated FINAL for just the customers concerned.
_AGGREGATE = """
INSERT INTO usage_settled
    (settle_id, period, customer_id, day, kind, meter, model, outcome_type, attribution, plan_version,
     is_reversal, billed_in, events, input_tokens, cached_input_tokens, output_tokens, max_quantity,
     sum_quantity, credits, cost_to_serve)
WITH todo AS
(
    SELECT period, customer_id, day
    FROM usage_settle_runs
    WHERE settle_id = {settle_id:UUID} AND settleable
)
SELECT
    {settle_id:UUID}, period, customer_id, day, kind, meter, model, outcome_type, attribution, plan_version,
    is_reversal, billed_in, count(), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens),
    max(quantity), sum(quantity), sum(credits), sum(cost_to_serve)
FROM
(
    SELECT
        period, customer_id, day, kind, meter, model, outcome_type, attribution, plan_version, is_reversal,
        billed_in, input_tokens, cached_input_tokens, output_tokens, quantity, credits, cost_to_serve
    FROM usage_recent FINAL
    WHERE day >= {recent_from:Date}
      AND day IN (SELECT day FROM todo)
      AND (period, customer_id, day) IN (SELECT period, customer_id, day FROM todo)

    UNION ALL

    SELECT
        period, customer_id, toDate(occurred_at, 'UTC') AS day, kind, meter, model, outcome_type, attribution,
        price_book_version AS plan_version, endsWith(rule, ':reversal') AS is_reversal, billed_in,
        input_tokens, cached_input_tokens, output_tokens, quantity, credits, cost_to_serve
    FROM usage_rated FINAL
    WHERE customer_id IN (SELECT customer_id FROM todo WHERE day < {recent_from:Date})
      AND period IN (SELECT period FROM todo WHERE day < {recent_from:Date})
      AND toDate(occurred_at, 'UTC') < {recent_from:Date}
      AND (period, customer_id, toDate(occurred_at, 'UTC')) IN (SELECT period, customer_id, day FROM todo)
)
GROUP BY period, customer_id, day, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in
"""

# seen_rows = 0 (never a live count) for a customer-period that must be read from the rows.
_PUBLISH = """
INSERT INTO usage_settled_days (period, customer_id, day, settled_at, settle_id, seen_rows)
SELECT period, customer_id, day, settled_at, settle_id, if(settleable, seen_rows, 0)
FROM usage_settle_runs
WHERE settle_id = {settle_id:UUID}
UNION ALL
SELECT s.period, s.customer_id, s.day, {settled_at:DateTime64(6, 'UTC')}, {settle_id:UUID}, 0
FROM usage_settled_days AS s FINAL
WHERE (s.period, s.customer_id) IN
      (SELECT period, customer_id FROM usage_settle_runs WHERE settle_id = {settle_id:UUID} AND NOT settleable)
  AND (s.period, s.customer_id, s.day) NOT IN
      (SELECT period, customer_id, day FROM usage_settle_runs WHERE settle_id = {settle_id:UUID})
  AND s.seen_rows != 0
"""


@dataclass(frozen=True)
class SettleResult:
    settle_id: str
    before: date
    customer_days: int
    unsettleable_customer_days: int
    rows_written: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "settle_id": self.settle_id,
            "before": self.before.isoformat(),
            "customer_days": self.customer_days,
            "unsettleable_customer_days": self.unsettleable_customer_days,
            "rows_written": self.rows_written,
            "seconds": round(self.seconds, 3),
        }


def settle(
    client: Client, before: date | None = None, *, now: datetime | None = None
) -> SettleResult:
    """Settle every customer-day before ``before`` (default: today, UTC) that changed since its last settle.

    Idempotent and incremental: a run with nothing new writes nothing but its empty
    snapshot. Safe while the worker inserts (see the module docstring), but the
    worker runs it under its store lock anyway (chDB serves one caller at a time).
    """
    started = time.monotonic()
    now = now or utc_now()
    before = before or now.date()
    params = {
        "settle_id": str(uuid.uuid4()),
        "settled_at": now,
        "before": before,
        "recent_from": now.date() - timedelta(days=RECENT_DAYS),
    }
    client.command(_SNAPSHOT, parameters=params)
    counts = client.query(
        "SELECT countIf(settleable), countIf(NOT settleable) FROM usage_settle_runs WHERE settle_id = {settle_id:UUID}",
        parameters=params,
    ).result_rows[0]
    written = 0
    if counts[0]:
        client.command(_AGGREGATE, parameters=params)
        written = client.query(
            "SELECT count() FROM usage_settled WHERE settle_id = {settle_id:UUID}",
            parameters=params,
        ).result_rows[0][0]
    if counts[0] or counts[1]:
        client.command(_PUBLISH, parameters=params)
    result = SettleResult(
        settle_id=str(params["settle_id"]),
        before=before,
        customer_days=int(counts[0]),
        unsettleable_customer_days=int(counts[1]),
        rows_written=written,
        seconds=time.monotonic() - started,
    )
    if counts[0] or counts[1]:
        log.info("settled %s", result.as_dict())
    return result


def settle_store(store: Any, before: date | None = None, *, now: datetime | None = None) -> SettleResult:
    """:func:`settle` on a :class:`~meterstream.storage.clickhouse.ClickHouseStore`; failures as ``StoreError``.

    What the worker's timer calls (through its ``with_store``, which retries a
    ``StoreError`` with backoff): a failed run leaves nothing half-published.
    """
    from meterstream.storage.clickhouse import StoreError

    try:
        return settle(store.client, before, now=now)
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        raise StoreError(f"settle failed: {exc}") from exc


