"""The worker's real-time state, derived from ClickHouse instead of Faust changelog tables.

Why not Faust tables: with changelog-backed tables, worker restarts were not
exact on faust-streaming 0.15.3 with Kafka 4.4
(tests/system/test_worker_restarts.py): after a SIGKILL 34–111 of 12,000
events had their offsets committed although they were never rated, and after
a SIGTERM the recovered table state ran ahead of the alerts that had been sent
(one alert repeated, three missing). The store
is written before a batch is acknowledged and is idempotent by
``(customer_id, event_id)``, so state rebuilt from it is exact after any crash:

- **month to date** per ``customer|period`` (credits, cost, events, tokens and
  the thresholds already alerted; ``period`` is the customer's *billing* period,
  as on the rated row) is loaded from ``usage_rated FINAL`` and ``budget_alerts``
  for every customer when partitions are assigned, for the periods
  ``preload_periods(now)`` names (this and last calendar month, and the current and
  previous billing period of every anniversary customer), and for any other
  billing period the first time a key of it is seen; then kept in memory;
- **dedupe**: a message at an offset the store has already seen for its
  partition (a replay after a crash or a rebalance) is checked against the
  store by ``(customer_id, event_id)``; newer messages are checked against
  the ids stored within the dedupe horizon (loaded from the store when
  partitions are assigned, then kept up to date; bounded in count). A client's
  resend older than that horizon is counted again in the real-time counters,
  never in invoices;
- **tumbling windows** are kept in memory, loaded from the store for every
  customer when partitions are assigned, for the last ``window_expires`` seconds.

Caches are dropped when partitions are reassigned, because another worker may
have written in the meantime.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from itertools import compress, repeat
from operator import attrgetter, eq, itemgetter
from typing import Any

from meterstream.clock import Clock, utc_now
from meterstream.periods import Period
from meterstream.periods import period_of as calendar_period
from meterstream.pricing.engine import EventRow, RatedBatch, money, units
from meterstream.schemas.records import RatedUsage
from meterstream.storage.clickhouse import ClickHouseStore
from meterstream.stream_processors.processing import (
    BatchResult,
    InboundMessage,
    MonthToDate,
    RecentIds,
    WindowCounts,
    billed_outcomes,
    dedupe_key,
    month_key,
    run_key,
)

log = logging.getLogger(__name__)

_message_of, _event_of, _period_of = itemgetter(0), itemgetter(1), itemgetter(2)
_customer_id, _run_id, _reversal_of = attrgetter("customer_id"), attrgetter("run_id"), attrgetter("reversal_of")
_topic, _partition, _offset = attrgetter("topic"), attrgetter("partition"), attrgetter("offset")

# The outcomes that reversals in a batch name, and the reversals already accepted for them
# (events_raw keeps only accepted events; refused reversals went to the dead-letter topic).
_BILLED_OUTCOMES = """
SELECT * EXCEPT (rated_at)
FROM usage_rated FINAL
WHERE customer_id IN {customers:Array(String)} AND event_id IN {ids:Array(String)} AND kind = 'outcome'
"""
_ACCEPTED_REVERSALS = """
SELECT customer_id, event_id, JSONExtractString(payload, 'reversal_of') AS reversal_of
FROM events_raw FINAL
WHERE kind = 'outcome' AND customer_id IN {customers:Array(String)}
  AND JSONExtractString(payload, 'reversal_of') IN {ids:Array(String)}
"""

_MONTH_TO_DATE = """
SELECT customer_id, period, sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve,
       count() AS events, sum(input_tokens + output_tokens) AS tokens
FROM usage_rated FINAL
WHERE period IN {periods:Array(String)} AND customer_id IN {customers:Array(String)}
GROUP BY customer_id, period
"""
_PERIOD_TOTALS = """
SELECT customer_id, period, sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve,
       count() AS events, sum(input_tokens + output_tokens) AS tokens
FROM usage_rated FINAL
WHERE period IN {periods:Array(String)}
GROUP BY customer_id, period
"""
_PERIOD_ALERTED = """
SELECT DISTINCT customer_id, period, threshold_percent
FROM budget_alerts
WHERE period IN {periods:Array(String)} AND kind IN ('', 'threshold')
"""
_ALL_WINDOWS = """
SELECT customer_id, toStartOfInterval(occurred_at, toIntervalSecond({seconds:UInt32})) AS start,
       sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve, count() AS events,
       sum(input_tokens + output_tokens) AS tokens
FROM usage_rated FINAL
WHERE occurred_at >= {since:DateTime64(3, 'UTC')}
GROUP BY customer_id, start
"""
_ALERTED = """
SELECT DISTINCT customer_id, period, threshold_percent
FROM budget_alerts
WHERE period IN {periods:Array(String)} AND customer_id IN {customers:Array(String)}
  AND kind IN ('', 'threshold')
"""
_STORED_IDS = """
SELECT DISTINCT customer_id, event_id
FROM usage_rated
WHERE period IN {periods:Array(String)} AND customer_id IN {customers:Array(String)}
  AND event_id IN {ids:Array(String)}
"""
_RAW_STORED = """
SELECT DISTINCT source_topic, source_partition, source_offset
FROM events_raw
WHERE customer_id IN {customers:Array(String)} AND event_id IN {ids:Array(String)}
  AND source_topic IN {topics:Array(String)}
"""
_STORED_OFFSETS = """
SELECT source_topic, source_partition, max(source_offset) AS offset
FROM events_raw
WHERE source_topic IN {topics:Array(String)}
GROUP BY source_topic, source_partition
"""
_RECENT_IDS = """
SELECT customer_id, event_id
FROM usage_rated
WHERE rated_at >= {since:DateTime64(3, 'UTC')}
ORDER BY rated_at DESC
LIMIT {limit:UInt64}
"""
_RUN_TOTALS = """
SELECT customer_id, run_id, sum(credits) AS credits, count() AS steps
FROM usage_rated FINAL
WHERE customer_id IN {customers:Array(String)} AND run_id IN {runs:Array(String)} AND kind = 'usage'
GROUP BY customer_id, run_id
"""
_WINDOWS = """
SELECT customer_id, toStartOfInterval(occurred_at, toIntervalSecond({seconds:UInt32})) AS start,
       sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve, count() AS events,
       sum(input_tokens + output_tokens) AS tokens
FROM usage_rated FINAL
WHERE customer_id IN {customers:Array(String)} AND occurred_at >= {since:DateTime64(3, 'UTC')}
GROUP BY customer_id, start
"""


def state_capacities(
    *, recent_ids: int, batch_size: int, writes_in_hand: int, billed: int = 100_000, runs: int = 100_000
) -> dict[str, int]:
    """The capacities to give :class:`StoreBackedState`: each at least what may be unstored at once."""
    unstored = (writes_in_hand + 1) * batch_size
    return {
        "recent_capacity": max(recent_ids, unstored),
        "billed_capacity": max(billed, unstored),
        "runs_capacity": max(runs, unstored),
    }


def calendar_preload(now: datetime) -> list[str]:
    """This and last calendar month (UTC): the billing periods open around ``now`` on calendar billing."""
    this_month = Period.of(now)
    return [str(this_month.previous()), str(this_month)]


class StoreBackedState:
    """Month-to-date totals, dedupe and windows for the worker, rebuilt from the store on demand.

    The state takes a batch before it is stored (the next batch is rated while it is written),
    and what it drops past a capacity (recent ids, billed outcomes, run totals) is read from the
    store again when needed. So each capacity must be at least the events of the batches that
    may be unstored at once: the worker passes at least ``(writes_in_hand + 1) × batch_size``
    (:func:`state_capacities`), and the oldest entries dropped are then always stored.
    """

    def __init__(
        self,
        store: ClickHouseStore,
        *,
        topics: Iterable[str],
        window_seconds: int,
        window_expires_seconds: int,
        recent_capacity: int = 1_000_000,
        billed_capacity: int = 100_000,
        runs_capacity: int = 100_000,
        dedupe_horizon_seconds: int = 3600,
        run_capped: Callable[[str], bool] = lambda customer_id: True,
        clock: Clock = utc_now,
        on_assigned: Callable[[], None] | None = None,
        period_of: Callable[[str, datetime], str] | None = None,
        preload_periods: Callable[[datetime], Iterable[str]] | None = None,
        committed: Callable[[], Mapping[tuple[str, int], int | None]] | None = None,
    ) -> None:
        self.store = store
        #: The group's committed offset of each assigned partition, read at the assignment (the
        #: consumer's): the batches stored past them are written again first (storage/batches.py).
        self.committed = committed
        self.clock = clock
        #: The billing period an event of a customer at a time belongs to (the rated row's period):
        #: the calendar month by default, the catalog's rule in the worker (anniversary periods).
        self.period_of: Callable[[str, datetime], str] = period_of or (lambda customer_id, at: calendar_period(at))
        #: The billing periods whose totals are loaded for every customer when partitions are assigned.
        self.preload_periods: Callable[[datetime], Iterable[str]] = preload_periods or calendar_preload
        #: Run after partitions are (re)assigned, before the totals are loaded (the alert outbox).
        self.on_assigned = on_assigned
        self.topics = list(topics)
        self.window_seconds = window_seconds
        self.window_expires_seconds = window_expires_seconds
        self.recent = RecentIds(recent_capacity)
        self.dedupe_horizon_seconds = dedupe_horizon_seconds
        self.month_to_date_cache: dict[str, MonthToDate] = {}
        #: customer -> window start (ISO, UTC) -> counts
        self.windows: dict[str, dict[str, WindowCounts]] = {}
        self._window_customers: set[str] = set()
        #: customer|run_id -> (credits, steps), for run caps: the ``runs_capacity`` most recently
        #: updated (a run evicted is loaded from the store again when it goes on).
        self.runs: OrderedDict[str, tuple[Decimal, int]] = OrderedDict()
        self.runs_capacity = runs_capacity
        #: Highest offset per (topic, partition) whose event is in the store: below it, replays.
        self.stored_upto: dict[tuple[str, int], int] | None = None
        #: Replayed events found in the store during the current batch.
        self._stored_in_batch: set[str] = set()
        #: Places (topic, partition, offset) of the current batch whose raw row events_raw holds.
        self.raw_stored: set[tuple[str, int, int]] = set()
        self.lookups = 0
        #: Periods whose month-to-date is loaded for every customer (absent keys are zero).
        self._complete_periods: set[str] = set()
        #: Whether every customer's recent windows are loaded.
        self._windows_complete = False
        #: Only customers whose budget caps runs need run totals.
        self.run_capped = run_capped
        #: customer|outcome id -> its billed row (None: not billed; a one-row batch: billed here), for
        #: reversals; the newest ``billed_capacity``, the store answers for the rest.
        self.billed: OrderedDict[str, RatedUsage | RatedBatch | None] = OrderedDict()
        self.billed_capacity = billed_capacity
        #: customer|outcome id -> the accepted reversal of it (dropped with the outcome's entry in ``billed``).
        self.reversed: dict[str, str] = {}

    # -- the SeenEvents protocol -----------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._stored_in_batch or key in self.recent

    def add(self, key: str) -> None:
        self.recent.add(key)

    def seen_among(self, keys: list[str]) -> set[str]:
        return set(filter(self._stored_in_batch.__contains__, keys)) | self.recent.seen_among(keys)

    # -- loading -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything cached: partitions moved, another worker may have written."""
        self.month_to_date_cache.clear()
        self.windows.clear()
        self._window_customers.clear()
        self.runs.clear()
        self.stored_upto = None
        self._complete_periods = set()
        self._windows_complete = False
        self.billed.clear()
        self.reversed.clear()

    def month_to_date(self, key: str) -> MonthToDate:
        return self.month_to_date_cache.get(key) or MonthToDate()

    def _preload(self, now: datetime) -> None:
        """Load this and last month's totals and every recent window for all customers, in three queries.

        Done when partitions are (re)assigned, so that a batch full of customers not seen
        since then costs no store reads: per-batch loads remain only for older periods
        (late events). One row per customer and period is held in memory.
        """
        periods = sorted(set(self.preload_periods(now)))
        alerted: dict[str, set[int]] = {}
        for row in self._query(_PERIOD_ALERTED, {"periods": periods}):
            alerted.setdefault(month_key(row["customer_id"], row["period"]), set()).add(int(row["threshold_percent"]))
        for row in self._query(_PERIOD_TOTALS, {"periods": periods}):
            key = month_key(row["customer_id"], row["period"])
            self.month_to_date_cache[key] = MonthToDate(
                credits=row["credits"], cost_to_serve=row["cost_to_serve"], events=int(row["events"]),
                tokens=int(row["tokens"]), alerted=frozenset(alerted.pop(key, ())),
            )  # fmt: skip
        for key, thresholds in alerted.items():  # alerted, but no rows stored (e.g. rows of another store)
            self.month_to_date_cache[key] = MonthToDate(alerted=frozenset(thresholds))
        self._complete_periods = set(periods)
        since = now - timedelta(seconds=self.window_expires_seconds)
        self._add_windows(self._query(_ALL_WINDOWS, {"seconds": self.window_seconds, "since": since}))
        self._windows_complete = True

    def prepare(self, batch: Sequence[tuple[InboundMessage, EventRow, str]]) -> None:
        """Load what this batch needs from the store, in a few queries per batch at most.

        ``batch``: each valid event with its message and its billing period as rated (``""``
        when it could not be rated: :attr:`period_of` gives it then).
        """
        self._stored_in_batch = set()
        self.raw_stored = set()
        if not batch:
            return
        if self.stored_upto is None:
            # Partitions were (re)assigned, perhaps after a worker or the store was killed
            # mid-write: the batches stored but never committed are written again from their
            # stored rows, which completes every table and view they did not reach. Set
            # stored_upto last: if a load fails, the retried batch loads everything again.
            if self.committed is not None:
                self.store.recover_batches(self.committed())
            if self.on_assigned is not None:
                self.on_assigned()
            stored_upto = self._stored_offsets()
            self._load_recent_ids()
            self._preload(self.clock())
            self.stored_upto = stored_upto
        events = list(map(_event_of, batch))
        periods = list(map(_period_of, batch))
        if "" in periods:  # not rated: the period its customer's billing gives
            periods = [period or self.period_of(e.customer_id, e.occurred_at) for e, period in zip(events, periods, strict=True)]
        customers = list(map(_customer_id, events))
        complete = self._complete_periods
        if not complete.issuperset(periods):
            self._load_month_to_date({key for key, period in zip(map(month_key, customers, periods), periods, strict=True)
                                      if period not in complete} - self.month_to_date_cache.keys())  # fmt: skip
        if not self._windows_complete:
            self._load_windows(set(customers) - self._window_customers)
        run_ids = list(map(_run_id, events))
        if any(run_ids):
            # Run caps are looked up once per customer of the batch, not per event.
            capped = set(filter(self.run_capped, set(compress(customers, run_ids))))
            if capped:
                self._load_runs({run_key(customer, run_id) for customer, run_id in zip(customers, run_ids, strict=True)
                                 if run_id and customer in capped} - self.runs.keys())  # fmt: skip
        if any(map(_reversal_of, events)):
            self._load_reversal_targets(
                {key for e in events if e.reversal_of and (key := dedupe_key(e.customer_id, e.reversal_of)) not in self.billed}
            )
        read_again = self._read_again(batch, periods)
        replayed = [(event, period) for _, event, period in read_again
                    if dedupe_key(event.customer_id, event.event_id) not in self.recent]  # fmt: skip
        if replayed:
            self._stored_in_batch = self._stored_ids(replayed)
        if read_again:
            # A batch cut after its events_raw insert: its raw rows are not written twice.
            self.raw_stored = self._raw_stored([(message, event) for message, event, _ in read_again])

    def _read_again(
        self, batch: Sequence[tuple[InboundMessage, EventRow, str]], periods: list[str]
    ) -> list[tuple[InboundMessage, EventRow, str]]:
        """The batch's events at or below the offset stored on their partition when it was assigned
        (replays: the store may hold them). A partition leaves :attr:`stored_upto` once a batch is
        wholly past it there (a retry of that batch has nothing to read again on it either)."""
        stored_upto = self.stored_upto
        assert stored_upto is not None
        messages = list(map(_message_of, batch))
        places = list(zip(map(_topic, messages), map(_partition, messages), strict=True))
        behind = [place for place in set(places) if place in stored_upto]
        if not behind:
            return []
        offsets = list(map(_offset, messages))
        for place in behind:
            if min(compress(offsets, map(eq, places, repeat(place)))) > stored_upto[place]:
                del stored_upto[place]
        return [
            (message, event, period)
            for (message, event, _), period in zip(batch, periods, strict=True)
            if message.offset <= stored_upto.get((message.topic, message.partition), -1)
        ]

    def _query(self, sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        self.lookups += 1
        return self.store.query(sql, parameters).dicts()

    def _raw_stored(self, read_again: list[tuple[InboundMessage, EventRow]]) -> set[tuple[str, int, int]]:
        places = {(m.topic, m.partition, m.offset) for m, _ in read_again}
        params = {
            "customers": sorted({e.customer_id for _, e in read_again}),
            "ids": sorted({e.event_id for _, e in read_again}),
            "topics": sorted({m.topic for m, _ in read_again}),
        }
        rows = self._query(_RAW_STORED, params)
        return {p for r in rows if (p := (r["source_topic"], int(r["source_partition"]), int(r["source_offset"]))) in places}

    def _stored_offsets(self) -> dict[tuple[str, int], int]:
        rows = self._query(_STORED_OFFSETS, {"topics": self.topics})
        return {(row["source_topic"], int(row["source_partition"])): int(row["offset"]) for row in rows}

    def _load_recent_ids(self) -> None:
        since = self.clock() - timedelta(seconds=self.dedupe_horizon_seconds)
        rows = self._query(_RECENT_IDS, {"since": since, "limit": self.recent.capacity})
        for row in reversed(rows):  # oldest first, so the newest are the last evicted
            self.recent.add(dedupe_key(row["customer_id"], row["event_id"]))

    def _load_month_to_date(self, keys: set[str]) -> None:
        if not keys:
            return
        customers = sorted({k.split("|", 1)[0] for k in keys})
        periods = sorted({k.split("|", 1)[1] for k in keys})
        params = {"customers": customers, "periods": periods}
        totals = {month_key(r["customer_id"], r["period"]): r for r in self._query(_MONTH_TO_DATE, params)}
        alerted: dict[str, set[int]] = {}
        for row in self._query(_ALERTED, params):
            alerted.setdefault(month_key(row["customer_id"], row["period"]), set()).add(int(row["threshold_percent"]))
        for key in keys:
            stored = totals.get(key)
            self.month_to_date_cache[key] = MonthToDate(
                credits=stored["credits"] if stored else Decimal(0),
                cost_to_serve=stored["cost_to_serve"] if stored else Decimal(0),
                events=int(stored["events"]) if stored else 0,
                tokens=int(stored["tokens"]) if stored else 0,
                alerted=frozenset(alerted.get(key, ())),
            )

    def _load_windows(self, customers: set[str]) -> None:
        if not customers:
            return
        since = self.clock() - timedelta(seconds=self.window_expires_seconds)
        params = {"customers": sorted(customers), "seconds": self.window_seconds, "since": since}
        self._add_windows(self._query(_WINDOWS, params))
        self._window_customers |= customers

    def _add_windows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            start = row["start"].strftime("%Y-%m-%dT%H:%M:%SZ")
            self.windows.setdefault(row["customer_id"], {})[start] = WindowCounts(
                units(row["credits"]), units(row["cost_to_serve"]), int(row["events"]), int(row["tokens"])
            )

    def _load_runs(self, keys: set[str]) -> None:
        if not keys:
            return
        params = {
            "customers": sorted({k.split("|", 1)[0] for k in keys}),
            "runs": sorted({k.split("|", 1)[1] for k in keys}),
        }
        found = {run_key(r["customer_id"], r["run_id"]): (r["credits"], int(r["steps"])) for r in self._query(_RUN_TOTALS, params)}
        for key in keys:
            self.runs[key] = found.get(key, (Decimal(0), 0))

    def _load_reversal_targets(self, keys: set[str]) -> None:
        if not keys:
            return
        params = {
            "customers": sorted({k.split("|", 1)[0] for k in keys}),
            "ids": sorted({k.split("|", 1)[1] for k in keys}),
        }
        for key in keys:
            self.billed[key] = None
        fields = RatedUsage.model_fields
        for row in self._query(_BILLED_OUTCOMES, params):
            key = dedupe_key(row["customer_id"], row["event_id"])
            if key in keys:
                values = {name: value for name, value in row.items() if name in fields}
                self.billed[key] = RatedUsage(**values)
        for row in self._query(_ACCEPTED_REVERSALS, params):
            key = dedupe_key(row["customer_id"], row["reversal_of"])
            if key in keys:
                self.reversed.setdefault(key, row["event_id"])

    # -- the BilledOutcomes protocol ---------------------------------------------------------------

    def billed_outcome(self, customer_id: str, event_id: str) -> RatedUsage | None:
        found = self.billed.get(dedupe_key(customer_id, event_id))
        return found.row(0) if isinstance(found, RatedBatch) else found

    def reversed_by(self, customer_id: str, event_id: str) -> str | None:
        return self.reversed.get(dedupe_key(customer_id, event_id))

    def remember(self, result: BatchResult) -> None:
        rated, billed = result.rated, self.billed
        for j in billed_outcomes(rated):
            event = rated.events[j]
            billed[dedupe_key(event.customer_id, event.event_id)] = rated.take([j])  # its row model when asked
        self.reversed.update(result.reversals)
        while len(billed) > self.billed_capacity:
            # The oldest go (a reversal of one loads it from the store again), with what reversed them.
            key, _ = billed.popitem(last=False)
            self.reversed.pop(key, None)

    # -- the SpendHistory protocol -----------------------------------------------------------------

    def run_totals(self, customer_id: str, run_id: str) -> tuple[Decimal, int]:
        return self.runs.get(run_key(customer_id, run_id), (Decimal(0), 0))

    def credits_between(self, customer_id: str, start: datetime, end: datetime) -> Decimal:
        low, high = start.strftime("%Y-%m-%dT%H:%M:%SZ"), end.strftime("%Y-%m-%dT%H:%M:%SZ")
        # A snapshot: this runs in the rating thread while the expiry timer may delete windows.
        windows = list(self.windows.get(customer_id, {}).items())
        return money(sum(c.credits_units for w, c in windows if low <= w < high))

    def _stored_ids(self, events: list[tuple[EventRow, str]]) -> set[str]:
        params = {
            "customers": sorted({e.customer_id for e, _ in events}),
            # usage_rated is partitioned by billing period (an anniversary customer's may not be the month).
            "periods": sorted({period for _, period in events}),
            "ids": sorted({e.event_id for e, _ in events}),
        }
        return {dedupe_key(r["customer_id"], r["event_id"]) for r in self._query(_STORED_IDS, params)}

    # -- after a batch is durable ------------------------------------------------------------------

    def commit(self, result: BatchResult) -> None:
        self.month_to_date_cache.update(result.month_to_date)
        runs = self.runs
        runs.update(result.runs)
        for key in result.runs:
            runs.move_to_end(key)
        for _ in range(len(runs) - self.runs_capacity):
            runs.popitem(last=False)
        windows = self.windows
        for key, counts in result.windows.items():
            customer_id, start = key.split("|", 1)
            of_customer = windows.get(customer_id)
            if of_customer is None:
                windows[customer_id] = {start: counts}
            else:
                current = of_customer.get(start)
                of_customer[start] = counts if current is None else current.plus(counts)
        self.recent.update(result.keys)
        self.remember(result)
        self._stored_in_batch = set()

    def expire_windows(self, now: datetime | None = None) -> int:
        cutoff = ((now or self.clock()) - timedelta(seconds=self.window_expires_seconds)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        dropped = 0
        for customer_id, windows in list(self.windows.items()):
            for start in [w for w in windows if w < cutoff]:
                del windows[start]
                dropped += 1
            if not windows:
                del self.windows[customer_id]
                self._window_customers.discard(customer_id)
        return dropped
