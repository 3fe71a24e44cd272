"""What the worker does to a batch of messages, without Faust or ClickHouse.

decode -> dedupe -> rate -> aggregate per key -> budget thresholds. The Faust
agent (:mod:`meterstream.stream_processors.app`) only moves the result: rows to
the sink, rejections to the dead-letter topic, alerts to ``budget-alerts`` and
counters to its tables. Keeping this pure makes it unit-testable and keeps one
copy of the rules.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Literal, Protocol

from meterstream.budgets import BudgetBook, thresholds_to_alert
from meterstream.pricing.plans import Catalog, PlanError
from meterstream.pricing.rating import RatingError
from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.schemas.records import BudgetAlert, DeadLetter, RatedUsage, RawEvent, ThresholdAction
from meterstream.stream_processors.decode import Rejection, decode_event

Kind = Literal["usage", "outcome"]
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    kind: Kind
    value: bytes | None
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class MonthToDate:
    """Running totals for one ``customer|YYYY-MM`` and the thresholds already alerted."""

    credits: Decimal = ZERO
    cost_to_serve: Decimal = ZERO
    events: int = 0
    tokens: int = 0
    alerted: frozenset[int] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {
            "credits": str(self.credits),
            "cost_to_serve": str(self.cost_to_serve),
            "events": self.events,
            "tokens": self.tokens,
            "alerted": sorted(self.alerted),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> MonthToDate:
        if not data:
            return cls()
        return cls(
            credits=Decimal(data["credits"]),
            cost_to_serve=Decimal(data["cost_to_serve"]),
            events=int(data["events"]),
            tokens=int(data["tokens"]),
            alerted=frozenset(int(t) for t in data.get("alerted", ())),
        )


@dataclass
class WindowCounts:
    """One customer's usage in one tumbling window."""

    credits: Decimal = ZERO
    cost_to_serve: Decimal = ZERO
    events: int = 0
    tokens: int = 0

    def add(self, row: RatedUsage) -> None:
        self.credits += row.credits
        self.cost_to_serve += row.cost_to_serve
        self.events += 1
        self.tokens += row.input_tokens + row.output_tokens

    def merged_json(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        prev = previous or {}
        return {
            "credits": str(Decimal(prev.get("credits", "0")) + self.credits),
            "cost_to_serve": str(Decimal(prev.get("cost_to_serve", "0")) + self.cost_to_serve),
            "events": int(prev.get("events", 0)) + self.events,
            "tokens": int(prev.get("tokens", 0)) + self.tokens,
        }


@dataclass
class BatchResult:
    raw: list[RawEvent] = field(default_factory=list)
    rated: list[RatedUsage] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    #: New month-to-date values for every ``customer|period`` the batch touched.
    month_to_date: dict[str, MonthToDate] = field(default_factory=dict)
    #: Per ``customer|window-start`` deltas for the tumbling-window counters.
    windows: dict[str, WindowCounts] = field(default_factory=dict)
    alerts: list[BudgetAlert] = field(default_factory=list)
    duplicates: int = 0


class SeenEvents(Protocol):
    """Where the worker remembers which events it has counted (see :func:`dedupe_key`)."""

    def __contains__(self, key: str) -> bool: ...

    def add(self, key: str) -> None: ...


def dedupe_key(customer_id: str, event_id: str) -> str:
    """An event's identity: its idempotency key within its customer (as in the store's ORDER BY)."""
    return f"{customer_id}|{event_id}"


class RecentIds:
    """An in-memory :class:`SeenEvents`, bounded in count (offline runs and tests).

    The worker uses a Faust table instead, so what it has counted survives a restart.
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

    def __len__(self) -> int:
        return len(self._ids)


def month_key(customer_id: str, period: str) -> str:
    return f"{customer_id}|{period}"


def window_key(customer_id: str, occurred_at: datetime, window_seconds: int) -> str:
    epoch = int(occurred_at.timestamp())
    start = datetime.fromtimestamp(epoch - epoch % window_seconds, tz=timezone.utc)
    return f"{customer_id}|{start.strftime('%Y-%m-%dT%H:%M:%SZ')}"


class BatchProcessor:
    """Turns a batch of messages into everything the worker must write."""

    def __init__(
        self,
        catalog: Catalog,
        budgets: BudgetBook,
        *,
        window_seconds: int = 60,
        seen: SeenEvents | None = None,
    ) -> None:
        self.catalog = catalog
        self.budgets = budgets
        self.window_seconds = window_seconds
        self.seen: SeenEvents = seen if seen is not None else RecentIds()

    def process(
        self,
        messages: Sequence[InboundMessage],
        month_to_date: Callable[[str], MonthToDate],
        now: datetime | None = None,
    ) -> BatchResult:
        now = now or datetime.now(timezone.utc)
        result = BatchResult()
        batch_ids: set[str] = set()
        accepted: list[tuple[UsageEvent | OutcomeEvent, RatedUsage]] = []

        for message in messages:
            decoded = decode_event(message.value, message.kind)
            if isinstance(decoded, Rejection):
                result.dead_letters.append(self._dead_letter(message, decoded.reason, now))
                continue
            key = dedupe_key(decoded.customer_id, decoded.event_id)
            if key in batch_ids or key in self.seen:
                result.duplicates += 1
                continue
            try:
                # The rate card of the customer's plan version in effect when the event occurred.
                rated = self.catalog.rate(decoded)
            except (RatingError, PlanError) as exc:
                result.dead_letters.append(self._dead_letter(message, str(exc), now))
                continue
            batch_ids.add(key)
            accepted.append((decoded, rated))
            result.rated.append(rated)
            result.raw.append(
                RawEvent(
                    event_id=decoded.event_id,
                    customer_id=decoded.customer_id,
                    kind=message.kind,
                    occurred_at=rated.occurred_at,
                    period=rated.period,
                    payload=message.value or b"",
                    source_topic=message.topic,
                    source_partition=message.partition,
                    source_offset=message.offset,
                )
            )

        # Aggregate per key before touching any table: one table write per key per batch.
        for event, rated in accepted:
            key = month_key(rated.customer_id, rated.period)
            current = result.month_to_date.get(key) or month_to_date(key)
            updated = replace(
                current,
                credits=current.credits + rated.credits,
                cost_to_serve=current.cost_to_serve + rated.cost_to_serve,
                events=current.events + 1,
                tokens=current.tokens + rated.input_tokens + rated.output_tokens,
            )
            budget = self.budgets.for_customer(rated.customer_id)
            if budget is not None:
                crossed = thresholds_to_alert(updated.credits, budget, updated.alerted)
                for threshold in crossed:
                    result.alerts.append(
                        BudgetAlert(
                            alert_id=BudgetAlert.make_id(rated.customer_id, rated.period, threshold),
                            customer_id=rated.customer_id,
                            period=rated.period,
                            threshold_percent=threshold,
                            budget_credits=budget.monthly_credits,
                            spent_credits=updated.credits,
                            crossed_at=now,
                            triggering_event_id=event.event_id,
                            action=budget.action if threshold >= 100 else ThresholdAction.ALERT,
                        )
                    )
                if crossed:
                    updated = replace(updated, alerted=updated.alerted | set(crossed))
            result.month_to_date[key] = updated
            wkey = window_key(rated.customer_id, rated.occurred_at, self.window_seconds)
            result.windows.setdefault(wkey, WindowCounts()).add(rated)
        return result

    def commit(self, result: BatchResult) -> None:
        """Remember the batch's events once its writes have succeeded."""
        for row in result.rated:
            self.seen.add(dedupe_key(row.customer_id, row.event_id))

    @staticmethod
    def _dead_letter(message: InboundMessage, reason: str, now: datetime) -> DeadLetter:
        return DeadLetter(
            reason=reason,
            raw=message.value or b"",
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            rejected_at=now,
        )
