"""Records the pipeline derives from events: rated rows, budget alerts, dead letters."""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Self, TypeVar, overload

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
)


class RatedUsage(BaseModel):
    """One event, priced: the row invoices, audits and margins are computed from.

    ``price_book_version`` and ``rule`` record exactly what priced it, so any
    invoice line can be reproduced and explained in a dispute.
    """

    model_config = ConfigDict(frozen=True)

    event_id: str
    kind: str  # "usage" | "outcome"
    customer_id: str
    occurred_at: AwareDatetime
    period: str
    meter: str
    model: str = ""
    provider: str = ""
    workflow_id: str = ""
    run_id: str = ""
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    quantity: Decimal = Decimal(0)
    unit: str = ""
    outcome_type: str = ""
    attribution: str = ""
    credits: Decimal
    cost_to_serve: Decimal
    currency: str = "USD"
    price_book_version: str
    rule: str
    #: "" when billed in its own period; the open period whose invoice carries it as a
    #: late adjustment when it arrived after its own period had closed.
    billed_in: str = ""

    @classmethod
    def trusted(cls, **values: Any) -> RatedUsage:
        """A row from values the rating engine derived from a validated event and price book.

        No validation (there is nothing left to check) and no per-field bookkeeping: the
        worker builds one per event, and pydantic's ``model_construct`` costs several
        microseconds for 24 fields. Fields not given take their defaults; the result equals
        ``RatedUsage(**values)`` (tests/unit/test_pricing.py checks it).
        """
        data = dict(_RATED_TEMPLATE)  # every field, in declaration order (serialisation follows it)
        data.update(values)
        row = cls.__new__(cls)
        object.__setattr__(row, "__dict__", data)
        object.__setattr__(row, "__pydantic_fields_set__", set(values))
        object.__setattr__(row, "__pydantic_extra__", None)
        object.__setattr__(row, "__pydantic_private__", None)
        return row


#: Required fields hold None here; ``trusted`` callers always give them.
_RATED_TEMPLATE: dict[str, Any] = {
    name: None if field.is_required() else field.default for name, field in RatedUsage.model_fields.items()
}


class ThresholdAction(StrEnum):
    ALERT = "alert"
    DOWNGRADE = "downgrade"
    BLOCK = "block"


class AlertKind(StrEnum):
    THRESHOLD = "threshold"  # month-to-date spend crossed a budget threshold
    RUN_CAP = "run_cap"  # one workflow run reached its cap on credits or steps (a runaway agent loop)
    SPEND_SPIKE = "spend_spike"  # recent spend far above the customer's own trailing baseline


class BudgetAlert(BaseModel):
    """Sent once per customer, period and threshold (or run, or spike hour) to ``budget-alerts``."""

    model_config = ConfigDict(frozen=True)

    alert_id: str = Field(description="Deterministic: consumers dedupe on it.")
    kind: AlertKind = AlertKind.THRESHOLD
    customer_id: str
    period: str
    #: For a threshold alert the percentage of the monthly budget; 100 for a run cap; 0 for a spike.
    threshold_percent: int
    budget_credits: Decimal
    spent_credits: Decimal
    crossed_at: AwareDatetime
    triggering_event_id: str
    action: ThresholdAction = ThresholdAction.ALERT
    run_id: str = ""
    #: When the budget runs out at the spend velocity of the last hour (None: no recent spend).
    projected_exhaustion_at: AwareDatetime | None = None
    detail: str = ""

    @staticmethod
    def make_id(customer_id: str, period: str, threshold_percent: int, *, scope: str = "") -> str:
        """Deterministic id: a threshold per customer and period; ``scope`` names a run or a spike hour."""
        basis = f"{customer_id}|{period}|{threshold_percent}" + (f"|{scope}" if scope else "")
        return f"alert-{hashlib.sha256(basis.encode()).hexdigest()[:24]}"


class Decision(StrEnum):
    OK = "ok"
    WARN = "warn"
    DOWNGRADE = "downgrade"
    BLOCK = "block"


class EnforcementState(BaseModel):
    """The current decision for a customer (or one of its runs): the value of the compacted
    ``enforcement-state`` topic, keyed by :attr:`key`. SDK guards keep a local view of it."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(description="customer_id, or customer_id|run_id for a run cap.")
    customer_id: str
    run_id: str = ""
    period: str
    decision: Decision
    reason: str
    cap_credits: Decimal | None = None
    spent_credits: Decimal
    remaining_credits: Decimal | None = None
    #: What happens when the cap is reached (the guard refuses calls that would pass it).
    at_cap: ThresholdAction = ThresholdAction.ALERT
    downgrade_to: str = ""
    #: The latest ``occurred_at`` of this customer's events that the spend includes (informational:
    #: guards release settled calls by :attr:`counted_ids`, never by event time).
    watermark: AwareDatetime
    updated_at: AwareDatetime
    #: Ids of the customer's usage events this state newly counts (a guard's settled calls
    #: are released by id, so an ``occurred_at`` in the past or future cannot release one early).
    counted_ids: tuple[str, ...] = ()
    #: Guards block this customer's calls while the shared reservation ledger is unreachable.
    fail_closed: bool = False
    #: :meth:`Catalog.fingerprint` of the worker's catalog: a guard pricing with another one
    #: cannot keep the overshoot bound and says so.
    catalog_fingerprint: str = ""


#: Key of the worker's heartbeat on ``enforcement-state``: ``updated_at`` is how current the
#: worker's view is (the newest event it has rated, or now when it has nothing to read).
HEARTBEAT_KEY = "__heartbeat__"
#: Key of the ``default`` budget's state: the cap of a customer with no state of its own.
DEFAULT_BUDGET_KEY = "__default__"


#: Dead letters carry at most this much of a rejected value: base64 makes it ~342 KB, well
#: inside the broker's default 1 MiB message limit and aiokafka's ``max_request_size``.
DEAD_LETTER_RAW_LIMIT = 256 * 1024
#: ... and at most this much of a reason.
DEAD_LETTER_REASON_LIMIT = 4000


class DeadLetter(BaseModel):
    """A rejected message: raw bytes (standard, padded base64 in JSON) and why, with where it came from."""

    model_config = ConfigDict(frozen=True)

    reason: str
    raw: bytes = Field(
        description="The message value exactly as received, base64 (RFC 4648) in JSON; only its first "
        "DEAD_LETTER_RAW_LIMIT bytes when ``truncated`` (the whole value stays on the source topic at "
        "source_partition / source_offset, and ``size`` and ``sha256`` identify it)."
    )
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    rejected_at: datetime
    #: The original value's length in bytes and SHA-256 (hex), whether or not ``raw`` is whole.
    size: int | None = None
    sha256: str | None = None
    truncated: bool = False

    @classmethod
    def of(
        cls,
        value: bytes | None,
        reason: str,
        *,
        rejected_at: datetime,
        source_topic: str | None = None,
        source_partition: int | None = None,
        source_offset: int | None = None,
        raw_limit: int | None = None,
    ) -> DeadLetter:
        """A letter for ``value`` that always fits on the broker: ``raw`` cut to ``raw_limit`` bytes
        (default :data:`DEAD_LETTER_RAW_LIMIT`), the reason to :data:`DEAD_LETTER_REASON_LIMIT` characters."""
        value = value or b""
        limit = DEAD_LETTER_RAW_LIMIT if raw_limit is None else raw_limit
        if len(reason) > DEAD_LETTER_REASON_LIMIT:
            reason = reason[: DEAD_LETTER_REASON_LIMIT - 20] + f"... ({len(reason)} chars)"
        return cls(
            reason=reason,
            raw=value[:limit],
            source_topic=source_topic,
            source_partition=source_partition,
            source_offset=source_offset,
            rejected_at=rejected_at,
            size=len(value),
            sha256=hashlib.sha256(value).hexdigest(),
            truncated=len(value) > limit,
        )

    def compact(self, why: str) -> DeadLetter:
        """The same letter without the raw bytes (size and digest kept), for when the whole one cannot be sent."""
        return self.model_copy(
            update={"raw": b"", "truncated": self.truncated or bool(self.raw), "reason": f"{self.reason} [{why}]"[:DEAD_LETTER_REASON_LIMIT]}
        )

    @field_serializer("raw", when_used="json")
    def _raw_as_base64(self, raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    @field_validator("raw", mode="before")
    @classmethod
    def _raw_from_base64(cls, value: object, info: ValidationInfo) -> object:
        if info.mode == "json" and isinstance(value, str):
            return base64.b64decode(value, validate=True)
        return value


@dataclass(frozen=True)
class RawEvent:
    """An accepted event as it arrived, with where it came from in Kafka."""

    event_id: str
    customer_id: str
    kind: str
    occurred_at: datetime
    period: str
    payload: bytes
    source_topic: str
    source_partition: int
    source_offset: int


_Row = TypeVar("_Row")


class RowColumns(Sequence[_Row]):
    """Rows held as columns (what the worker inserts); the row object of an index built on demand.

    Subclasses give :meth:`row` and ``__len__``; indexing, slicing, iteration and equality with
    another batch or a list of rows follow from them.
    """

    def row(self, i: int) -> _Row:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> _Row: ...

    @overload
    def __getitem__(self, index: slice) -> list[_Row]: ...

    def __getitem__(self, index: int | slice) -> _Row | list[_Row]:
        if isinstance(index, slice):
            return [self.row(i) for i in range(len(self))[index]]
        return self.row(range(len(self))[index])

    def __iter__(self) -> Iterator[_Row]:
        return map(self.row, range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RowColumns, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def concat(cls, batches: Sequence[Self]) -> Self:
        """The rows of ``batches``, in order, as one batch (subclasses are dataclasses of list columns)."""
        if len(batches) == 1:
            return batches[0]
        return cls(*(list(itertools.chain.from_iterable(getattr(b, f.name) for b in batches))
                     for f in fields(cls)))  # type: ignore[arg-type]  # fmt: skip


@dataclass(eq=False)
class RawBatch(RowColumns[RawEvent]):
    """Raw events as columns (what the worker inserts into events_raw); a :class:`RawEvent` per row on demand."""

    event_id: list[str] = field(default_factory=list)
    customer_id: list[str] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    occurred_at: list[datetime] = field(default_factory=list)
    period: list[str] = field(default_factory=list)
    payload: list[bytes] = field(default_factory=list)
    source_topic: list[str] = field(default_factory=list)
    source_partition: list[int] = field(default_factory=list)
    source_offset: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.event_id)

    def row(self, i: int) -> RawEvent:
        return RawEvent(*(getattr(self, f.name)[i] for f in fields(self)))

    @classmethod
    def of(cls, rows: Sequence[RawEvent]) -> RawBatch:
        """Raw event records as a batch."""
        names = [f.name for f in fields(cls)]
        return cls(*([getattr(r, name) for r in rows] for name in names))
