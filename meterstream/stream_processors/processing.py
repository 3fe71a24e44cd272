"""What the worker does to a batch of messages, without Faust or ClickHouse.

decode -> dedupe -> rate -> aggregate per key -> budget thresholds. The worker
(:mod:`meterstream.stream_processors.app`, fed in batches by
:mod:`meterstream.stream_processors.consumer`) only moves the result: rows to
ClickHouse, rejections to the dead-letter topic, alerts to ``budget-alerts`` and
states to ``enforcement-state``; the counters live in
:mod:`meterstream.stream_processors.state`, rebuilt from the store. Keeping this
pure makes it unit-testable and keeps one copy of the rules.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import lru_cache
from itertools import repeat
from operator import add, attrgetter, mod, sub
from typing import Literal, NamedTuple, Protocol

from meterstream.budgets import (
    Budget,
    BudgetBook,
    customer_decision,
    is_spike,
    projected_exhaustion,
    run_decision,
    thresholds_to_alert,
)
from meterstream.clock import Clock, utc_now
from meterstream.pricing.engine import EventRow, RatedBatch, Rating, money, units
from meterstream.pricing.plans import Catalog
from meterstream.pricing.reversals import REVERSAL_SUFFIX, ReversalRefused, reverse_billed_outcome
from meterstream.schemas.records import (
    AlertKind,
    BudgetAlert,
    DeadLetter,
    Decision,
    EnforcementState,
    RatedUsage,
    RawBatch,
    ThresholdAction,
)
from meterstream.stream_processors.decode import decode_batch

Kind = Literal["usage", "outcome"]
ZERO = Decimal(0)


class InboundMessage(NamedTuple):
    """One message as the worker sees it (a tuple: the worker builds one per message)."""

    kind: Kind
    value: bytes | None
    topic: str
    partition: int
    offset: int
    #: The broker timestamp (ms since the epoch), which the future-time limit is checked against.
    timestamp_ms: int | None = None


class MonthToDate(NamedTuple):
    """Running totals for one ``customer|YYYY-MM`` and the thresholds already alerted.

    A tuple: a batch makes one per customer and period it touches (a dataclass' generated
    constructor costs ~2.5 times as much)."""

    credits: Decimal = ZERO
    cost_to_serve: Decimal = ZERO
    events: int = 0
    tokens: int = 0
    alerted: frozenset[int] = frozenset()


class WindowCounts(NamedTuple):
    """One customer's usage in one tumbling window, money in 10**-18 (a batch makes one per window)."""

    credits_units: int = 0
    cost_units: int = 0
    events: int = 0
    tokens: int = 0

    @property
    def credits(self) -> Decimal:
        return money(self.credits_units)

    @property
    def cost_to_serve(self) -> Decimal:
        return money(self.cost_units)

    def plus(self, other: WindowCounts) -> WindowCounts:
        return WindowCounts(self.credits_units + other.credits_units, self.cost_units + other.cost_units,
                            self.events + other.events, self.tokens + other.tokens)  # fmt: skip


_customer_id, _event_id, _kind, _occurred_at = (attrgetter(name) for name in ("customer_id", "event_id", "kind",
                                                                               "occurred_at"))  # fmt: skip
_value, _topic, _partition, _offset = (attrgetter(name) for name in ("value", "topic", "partition", "offset"))
_input_tokens, _output_tokens = attrgetter("input_tokens"), attrgetter("output_tokens")
_reversal_of = attrgetter("reversal_of")
#: The one format of the worker's keys, ``customer|event id`` (:func:`dedupe_key`), ``customer|period``
#: (:func:`month_key`), ``customer|window start``: a bound method, so ``map`` makes them in C.
_pair = "{}|{}".format

#: ``WindowCounts`` of a list ``[credits, cost, events, tokens]``, made in C.
_window_counts = functools.partial(tuple.__new__, WindowCounts)


@dataclass
class BatchResult:
    raw: RawBatch = field(default_factory=RawBatch)
    rated: RatedBatch = field(default_factory=RatedBatch)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    #: New month-to-date values for every ``customer|period`` the batch touched.
    month_to_date: dict[str, MonthToDate] = field(default_factory=dict)
    #: Per ``customer|window-start`` deltas for the tumbling-window counters.
    windows: dict[str, WindowCounts] = field(default_factory=dict)
    alerts: list[BudgetAlert] = field(default_factory=list)
    #: The latest decision per customer (and per capped run) the batch touched.
    enforcement: dict[str, EnforcementState] = field(default_factory=dict)
    #: New ``(credits, steps)`` totals per ``customer|run_id`` the batch touched.
    runs: dict[str, tuple[Decimal, int]] = field(default_factory=dict)
    duplicates: int = 0
    #: The :func:`dedupe_key` of each rated row, in the order of ``rated``.
    keys: list[str] = field(default_factory=list)
    #: ``customer|outcome id`` -> the id of the reversal this batch accepted for it.
    reversals: dict[str, str] = field(default_factory=dict)


class SpendHistory(Protocol):
    """What the worker knows beyond the batch, for run caps, projections and spikes."""

    def run_totals(self, customer_id: str, run_id: str) -> tuple[Decimal, int]: ...

    def credits_between(self, customer_id: str, start: datetime, end: datetime) -> Decimal: ...


class NoHistory:
    """No runs and no recent spend known: offline runs and tests."""

    def run_totals(self, customer_id: str, run_id: str) -> tuple[Decimal, int]:
        return ZERO, 0

    def credits_between(self, customer_id: str, start: datetime, end: datetime) -> Decimal:
        return ZERO


class SeenEvents(Protocol):
    """Where the worker remembers which events it has counted (see :func:`dedupe_key`)."""

    def __contains__(self, key: str) -> bool: ...

    def add(self, key: str) -> None: ...

    def seen_among(self, keys: list[str]) -> set[str]:
        """The keys of ``keys`` already counted (one call per batch)."""
        ...


class BilledOutcomes(Protocol):
    """The outcomes already billed and which of them are reversed (see meterstream.pricing.reversals)."""

    def billed_outcome(self, customer_id: str, event_id: str) -> RatedUsage | None: ...

    def reversed_by(self, customer_id: str, event_id: str) -> str | None: ...

    def remember(self, result: BatchResult) -> None: ...


class OutcomeBook:
    """An in-memory :class:`BilledOutcomes` (offline runs and tests); the worker's lives in the store."""

    def __init__(self) -> None:
        #: customer|outcome id -> its rated row, as a one-row batch (the row model is made when asked for).
        self.outcomes: dict[str, RatedBatch] = {}
        self.reversals: dict[str, str] = {}

    def billed_outcome(self, customer_id: str, event_id: str) -> RatedUsage | None:
        found = self.outcomes.get(dedupe_key(customer_id, event_id))
        return found.row(0) if found is not None else None

    def reversed_by(self, customer_id: str, event_id: str) -> str | None:
        return self.reversals.get(dedupe_key(customer_id, event_id))

    def remember(self, result: BatchResult) -> None:
        rated = result.rated
        for j in billed_outcomes(rated):
            event = rated.events[j]
            self.outcomes[dedupe_key(event.customer_id, event.event_id)] = rated.take([j])
        self.reversals.update(result.reversals)


def billed_outcomes(rated: RatedBatch) -> Iterator[int]:
    """The positions of a batch's outcome rows that are not reversals (what a later reversal may name)."""
    for j, event in enumerate(rated.events):
        if event.kind == "outcome" and not rated.rule[j].endswith(REVERSAL_SUFFIX):
            yield j


def dedupe_key(customer_id: str, event_id: str) -> str:
    """An event's identity: its idempotency key within its customer (as in the store's ORDER BY)."""
    return _pair(customer_id, event_id)


class RecentIds:
    """An in-memory :class:`SeenEvents`, bounded in count (offline runs and tests).

    The worker uses :class:`~meterstream.stream_processors.state.StoreBackedState`, which
    also checks replayed messages against the store.
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def seen_among(self, keys: list[str]) -> set[str]:
        return set(filter(self._ids.__contains__, keys))

    def update(self, event_ids: list[str]) -> None:
        """:meth:`add` each of ``event_ids``, in order (in one C-level update when they are distinct and new,
        as a batch's keys after dedupe are)."""
        ids = self._ids
        new = dict.fromkeys(event_ids)
        if len(new) != len(event_ids) or any(map(ids.__contains__, new)):
            for event_id in event_ids:
                self.add(event_id)
            return
        ids.update(new)
        for _ in range(len(ids) - self.capacity):
            ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


def month_key(customer_id: str, period: str) -> str:
    return _pair(customer_id, period)


def run_key(customer_id: str, run_id: str) -> str:
    """A run's key in the run totals (run caps)."""
    return _pair(customer_id, run_id)


def window_key(customer_id: str, occurred_at: datetime, window_seconds: int) -> str:
    epoch = int(occurred_at.timestamp())
    return _pair(customer_id, _window_start(epoch - epoch % window_seconds))


@lru_cache(maxsize=65_536)
def _window_start(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lowest_bar(budget: Budget, alerted: set[int]) -> int | float:
    """The least month-to-date spend, in 10**-18 credits, at which a threshold not yet alerted is reached.

    A cheap exact pre-check of :func:`~meterstream.budgets.thresholds_to_alert` (``spent × 100 ≥
    monthly × t``), which decides: below this, it would return nothing.
    """
    bars = _bars(budget.monthly_credits, budget.thresholds)
    return min((bar for t, bar in bars if t not in alerted), default=float("inf"))


@lru_cache(maxsize=4096)
def _bars(monthly: Decimal, thresholds: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    numerator, denominator = monthly.as_integer_ratio()
    # ceil(monthly × t / 100) in 10**-18: the least integer spend with spend × 100 ≥ monthly × t.
    return tuple((t, -(-numerator * t * 10**18 // (100 * denominator))) for t in thresholds)


@dataclass(slots=True)
class _Running:
    """A month-to-date total while a batch is aggregated, money in 10**-18 (MonthToDate is the frozen result)."""

    credits: int
    cost_to_serve: int
    events: int
    tokens: int
    alerted: set[int]
    watermark: datetime


class BatchProcessor:
    """Turns a batch of messages into everything the worker must write."""

    def __init__(
        self,
        catalog: Catalog,
        budgets: BudgetBook,
        *,
        window_seconds: int = 60,
        seen: SeenEvents | None = None,
        late_grace: timedelta = timedelta(days=3),
        clock: Clock = utc_now,
        outcomes: BilledOutcomes | None = None,
    ) -> None:
        self.catalog = catalog
        self.clock = clock
        self.late_grace = late_grace
        self.budgets = budgets
        self.window_seconds = window_seconds
        self.seen: SeenEvents = seen if seen is not None else RecentIds()
        self.outcomes: BilledOutcomes = outcomes if outcomes is not None else OutcomeBook()
        self.catalog_fingerprint = catalog.fingerprint()

    def process(
        self,
        messages: Sequence[InboundMessage],
        month_to_date: Callable[[str], MonthToDate],
        now: datetime | None = None,
        prepare: Callable[[Sequence[tuple[InboundMessage, EventRow, str]]], None] | None = None,
        history: SpendHistory | None = None,
    ) -> BatchResult:
        """Decode, dedupe, rate and aggregate one batch, as whole-batch steps over columns.

        ``prepare`` sees the batch's valid events (each with its message and its billing
        period as rated, ``""`` if it has none) before dedupe and aggregation, so a state
        that lives in the store can load what it needs in one round trip.
        """
        now = now or self.clock()
        result = BatchResult()
        decoded = decode_batch(
            [m.value for m in messages], [m.kind for m in messages], [m.timestamp_ms for m in messages], now
        )
        # One engine call prices the whole batch (meterstream/pricing/engine.py); duplicates are
        # priced too and dropped below, which costs less than a second pass.
        rating = self.catalog.rate_rows(decoded.rows)
        rated, errors = rating.rated, rating.errors
        if prepare is not None:
            prepare(list(zip(map(messages.__getitem__, decoded.positions), decoded.rows, rated.period, strict=True)))
        refused: list[tuple[int, str]] = list(decoded.rejections)
        rows_in = decoded.rows
        customers = list(map(_customer_id, rows_in))
        keys = list(map(_pair, customers, map(_event_id, rows_in)))  # dedupe_key, in C
        already = self.seen.seen_among(keys)
        n = len(keys)
        if errors.count(None) == n and not any(map(_reversal_of, rows_in)) and \
                self._none_closed(customers, rated.period, now):  # fmt: skip
            # The usual batch (each row priced, none a reversal, no period closed): only duplicates
            # to drop, in C. The first row of each key is kept unless the key was counted before.
            first = dict(zip(reversed(keys), range(n - 1, -1, -1), strict=True))
            if len(first) == n and not already:
                rows, kept_positions, result.keys = rated, decoded.positions, keys
            else:
                keep = sorted(map(first.__getitem__, first.keys() - already))
                result.duplicates = n - len(keep)
                result.keys = list(map(keys.__getitem__, keep))
                rows, kept_positions = rated.take(keep), list(map(decoded.positions.__getitem__, keep))
        else:
            rows, kept_positions = self._sift(decoded.positions, rows_in, keys, already, rating, refused, result, now)
        result.rated = rows
        if refused:
            refused.sort()
            result.dead_letters = [self._dead_letter(messages[p], reason, now) for p, reason in refused]
        events = rows.events
        kept = list(map(messages.__getitem__, kept_positions))  # every kept message has a value (decoded)
        result.raw = RawBatch(
            event_id=list(map(_event_id, events)),
            customer_id=list(map(_customer_id, events)),
            kind=list(map(_kind, events)),
            occurred_at=list(map(_occurred_at, events)),
            period=rows.period,
            payload=list(map(_value, kept)),
            source_topic=list(map(_topic, kept)),
            source_partition=list(map(_partition, kept)),
            source_offset=list(map(_offset, kept)),
        )
        self._aggregate(result, rows, month_to_date, now, history or NoHistory())
        return result

    def _sift(self, positions: list[int], rows_in: list[EventRow], keys: list[str], already: set[str], rating: Rating,
              refused: list[tuple[int, str]], result: BatchResult, now: datetime) -> tuple[RatedBatch, list[int]]:  # fmt: skip
        """A batch with refusals, reversals or a closed period, row by row: the rows kept (``result.keys``
        and ``result.duplicates`` filled, refusals added to ``refused``) and their positions."""
        rated, errors = rating.rated, rating.errors
        batch_ids: set[str] = set()
        keep: list[int] = []
        kept_positions: list[int] = []
        batch_outcomes: dict[str, int] = {}
        closed: dict[tuple[str, str], bool] = {}
        for j, (position, row, key) in enumerate(zip(positions, rows_in, keys, strict=True)):
            if key in batch_ids or key in already:
                result.duplicates += 1
                continue
            error = errors[j]
            if error is not None:
                refused.append((position, str(error)))
                continue
            place = (row.customer_id, rated.period[j])
            is_closed = closed.get(place)
            if is_closed is None:
                is_closed = closed[place] = self._closed(row.customer_id, rated.period[j], now)
            if is_closed:
                # Billed on the customer's open period (an anniversary period may not match the month).
                rated.billed_in[j] = self.catalog.customer(row.customer_id).billing_period(now)
            if row.kind == "outcome":
                if row.reversal_of:
                    # Matched to a billed outcome, once, at its price; else refused and kept.
                    target = dedupe_key(row.customer_id, row.reversal_of)
                    in_batch = batch_outcomes.get(target)
                    original = rated.row(in_batch) if in_batch is not None else self.outcomes.billed_outcome(
                        row.customer_id, row.reversal_of
                    )
                    reversed_by = result.reversals.get(target) or self.outcomes.reversed_by(
                        row.customer_id, row.reversal_of
                    )
                    try:
                        rated.set_row(j, reverse_billed_outcome(row, rated.row(j), original, reversed_by))
                    except ReversalRefused as exc:
                        refused.append((position, str(exc)))
                        continue
                    result.reversals[target] = row.event_id
                else:
                    batch_outcomes[key] = j
            batch_ids.add(key)
            result.keys.append(key)
            keep.append(j)
            kept_positions.append(position)
        return rated.take(keep), kept_positions

    def _aggregate(self, result: BatchResult, rows: RatedBatch, month_to_date: Callable[[str], MonthToDate],
                   now: datetime, history: SpendHistory) -> None:  # fmt: skip
        """Month-to-date totals, windows, thresholds, run caps and decisions of the batch's rated rows.

        One state change per key per batch: sums run in integers of 10**-18 credits; thresholds
        are checked per event only for customers with a budget.
        """
        running: dict[str, _Running] = {}
        #: Credits of this batch per customer in the last hour: the history does not hold them yet.
        batch_hour: dict[str, int] = {}
        #: Usage event ids per ``customer|period`` under a hard cap: guards release settled calls by id.
        counted_ids: dict[str, list[str]] = {}
        hour_ago = now - timedelta(hours=1)
        windows: dict[str, list[int]] = {}
        events = rows.events
        # The columns each row needs, made in C before the one pass that sums them.
        customers = list(map(_customer_id, events))
        occurred = list(map(_occurred_at, events))
        epochs = list(map(int, map(datetime.timestamp, occurred)))
        starts = map(_window_start, map(sub, epochs, map(mod, epochs, repeat(self.window_seconds))))
        for_customer = self.budgets.for_customer
        budget_of = {customer: for_customer(customer) for customer in set(customers)}
        budgeted = {customer for customer, budget in budget_of.items() if budget is not None}
        for j, (customer, key, wkey, at, credits, cost, tokens) in enumerate(zip(
            customers, map(_pair, customers, rows.period), map(_pair, customers, starts), occurred, rows.credits,
            rows.cost, map(add, map(_input_tokens, events), map(_output_tokens, events)), strict=True,
        )):  # fmt: skip
            acc = running.get(key)
            if acc is None:
                current = month_to_date(key)
                acc = running[key] = _Running(
                    units(current.credits), units(current.cost_to_serve), current.events, current.tokens,
                    set(current.alerted), at,
                )  # fmt: skip
            acc.credits += credits
            acc.cost_to_serve += cost
            acc.events += 1
            acc.tokens += tokens
            if at > acc.watermark:
                acc.watermark = at
            if customer in budgeted:
                self._budget_step(result, history, budget_of[customer], rows, j, acc, key, counted_ids,  # type: ignore[arg-type]
                                  batch_hour, hour_ago, now)  # fmt: skip
            counts = windows.get(wkey)
            if counts is None:
                windows[wkey] = [credits, cost, 1, tokens]
            else:
                counts[0] += credits
                counts[1] += cost
                counts[2] += 1
                counts[3] += tokens
        result.windows = dict(zip(windows, map(_window_counts, windows.values()), strict=True))
        watermarks = {key: acc.watermark for key, acc in running.items()}
        for key, acc in running.items():
            result.month_to_date[key] = MonthToDate(
                money(acc.credits), money(acc.cost_to_serve), acc.events, acc.tokens, frozenset(acc.alerted)
            )

        for key, totals in result.month_to_date.items():
            customer_id, period = key.split("|", 1)
            budget = self.budgets.for_customer(customer_id)
            # The customer's current billing period (an anniversary period may not be this month).
            if budget is None or period != self.catalog.billing_period(customer_id, now):
                continue  # enforcement is about this period's budget; late events for a past period only bill
            result.enforcement[customer_id] = customer_decision(
                customer_id, period, totals.credits, budget, watermark=watermarks[key], now=now,
                counted_ids=tuple(counted_ids.get(key, ())), catalog_fingerprint=self.catalog_fingerprint,
            )  # fmt: skip
        if self.budgets.spike is not None:
            self._spikes(result, history, now)

    def _budget_step(self, result: BatchResult, history: SpendHistory, budget: Budget, rows: RatedBatch, j: int,
                     acc: _Running, key: str, counted_ids: dict[str, list[str]], batch_hour: dict[str, int],
                     hour_ago: datetime, now: datetime) -> None:  # fmt: skip
        """One rated row of a customer with a budget: counted ids, thresholds crossed, the run's cap."""
        event = rows.events[j]
        customer, period = event.customer_id, rows.period[j]
        if budget.action is not ThresholdAction.ALERT and event.kind == "usage":
            counted_ids.setdefault(key, []).append(event.event_id)
        if hour_ago <= event.occurred_at <= now:
            batch_hour[customer] = batch_hour.get(customer, 0) + rows.credits[j]
        if acc.credits < _lowest_bar(budget, acc.alerted):
            return self._run_cap_step(result, history, budget, rows, j, now)
        spent = money(acc.credits)
        crossed = thresholds_to_alert(spent, budget, acc.alerted)
        if crossed:
            # The first spend of the hour counts too: otherwise its velocity is zero
            # and the alert says nothing about when the budget runs out.
            velocity = self._velocity(history, customer, now) + money(batch_hour.get(customer, 0)) / 3600
            eta = projected_exhaustion(spent, budget.monthly_credits, velocity, now)
            for threshold in crossed:
                result.alerts.append(
                    BudgetAlert(
                        alert_id=BudgetAlert.make_id(customer, period, threshold),
                        customer_id=customer,
                        period=period,
                        threshold_percent=threshold,
                        budget_credits=budget.monthly_credits,
                        spent_credits=spent,
                        crossed_at=now,
                        triggering_event_id=event.event_id,
                        action=budget.action if threshold >= 100 else ThresholdAction.ALERT,
                        projected_exhaustion_at=eta,
                    )
                )
            acc.alerted.update(crossed)
        self._run_cap_step(result, history, budget, rows, j, now)

    def _run_cap_step(self, result: BatchResult, history: SpendHistory, budget: Budget, rows: RatedBatch, j: int,
                      now: datetime) -> None:  # fmt: skip
        event = rows.events[j]
        if budget.run_cap is not None and event.run_id and event.kind == "usage":
            self._run_step(result, history, budget, event, rows.period[j], money(rows.credits[j]), now)

    def _none_closed(self, customers: list[str], periods: list[str], now: datetime) -> bool:
        """Whether no row's billing period is closed: checked once per period for the customers the
        catalog does not list (calendar months alike), per (customer, period) for those it does."""
        listed = self.catalog.customers
        if listed.keys().isdisjoint(customers):
            pairs = dict(zip(periods, customers, strict=True)).items()  # a customer of each period, in C
            return not any(self._closed(customer, period, now) for period, customer in pairs)
        return not any(self._closed(customer, period, now) for customer, period in set(zip(customers, periods, strict=True)))

    def _closed(self, customer_id: str, period: str, now: datetime) -> bool:
        """Whether the customer's ``period`` has ended and its grace has passed (its invoice is closed)."""
        return now >= self.catalog.billing_bounds(customer_id, period)[1] + self.late_grace

    @staticmethod
    def _velocity(history: SpendHistory, customer_id: str, now: datetime) -> Decimal:
        """Credits per second over the last hour."""
        return history.credits_between(customer_id, now - timedelta(hours=1), now) / 3600

    def _run_step(
        self,
        result: BatchResult,
        history: SpendHistory,
        budget: Budget,
        event: EventRow,
        period: str,
        event_credits: Decimal,
        now: datetime,
    ) -> None:
        cap = budget.run_cap
        assert cap is not None
        key = run_key(event.customer_id, event.run_id)
        credits, steps = result.runs.get(key) or history.run_totals(event.customer_id, event.run_id)
        credits, steps = credits + event_credits, steps + 1
        result.runs[key] = (credits, steps)
        state = run_decision(
            event.customer_id, event.run_id, period, credits, steps, cap,
            downgrade_to=budget.downgrade_to or "", watermark=event.occurred_at, now=now,
        )  # fmt: skip
        previous = result.enforcement.get(key)
        result.enforcement[key] = state
        reached = state.decision is not Decision.OK and (previous is None or previous.decision is Decision.OK)
        if reached and (cap.max_credits is None or credits - event_credits < cap.max_credits) and (
            cap.max_steps is None or steps - 1 < cap.max_steps
        ):
            result.alerts.append(
                BudgetAlert(
                    alert_id=BudgetAlert.make_id(event.customer_id, period, 100, scope=f"run:{event.run_id}"),
                    kind=AlertKind.RUN_CAP,
                    customer_id=event.customer_id,
                    period=period,
                    threshold_percent=100,
                    budget_credits=cap.max_credits or Decimal(0),
                    spent_credits=credits,
                    crossed_at=now,
                    triggering_event_id=event.event_id,
                    action=cap.action,
                    run_id=event.run_id,
                    detail=state.reason,
                )
            )

    def _spikes(self, result: BatchResult, history: SpendHistory, now: datetime) -> None:
        rule = self.budgets.spike
        assert rule is not None
        recent_start = now - timedelta(minutes=5)
        in_batch: dict[str, int] = {}  # the batch's credits per customer, in 10**-18
        for key, counts in result.windows.items():
            customer_id = key.split("|", 1)[0]
            in_batch[customer_id] = in_batch.get(customer_id, 0) + counts.credits_units
        for key in result.month_to_date:
            customer_id, period = key.split("|", 1)
            recent = history.credits_between(customer_id, recent_start, now) + money(in_batch.get(customer_id, 0))
            baseline = history.credits_between(customer_id, now - timedelta(minutes=65), recent_start) / 12
            if not is_spike(recent, baseline, rule):
                continue
            hour = now.strftime("%Y-%m-%dT%H")
            result.alerts.append(
                BudgetAlert(
                    alert_id=BudgetAlert.make_id(customer_id, period, 0, scope=f"spike:{hour}"),
                    kind=AlertKind.SPEND_SPIKE,
                    customer_id=customer_id,
                    period=period,
                    threshold_percent=0,
                    budget_credits=baseline,
                    spent_credits=recent,
                    crossed_at=now,
                    triggering_event_id="",
                    detail=f"{recent} credits in 5 minutes against a trailing average of {baseline:.4f}",
                )
            )

    def commit(self, result: BatchResult) -> None:
        """Remember the batch's events once its writes have succeeded."""
        for key in result.keys:
            self.seen.add(key)
        self.outcomes.remember(result)

    @staticmethod
    def _dead_letter(message: InboundMessage, reason: str, now: datetime) -> DeadLetter:
        return DeadLetter.of(
            message.value,
            reason,
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            rejected_at=now,
        )
