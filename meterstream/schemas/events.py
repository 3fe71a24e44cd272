"""Usage and outcome events: the wire format services produce.

The pydantic models *are* the wire format: the SDK dumps them, the worker
validates them, and ``meterstream schemas export`` writes their JSON Schema
for producers in other languages. Validation is strict (no silent coercion
of strings to numbers, no naive datetimes, no unknown top-level fields) so a
bad event is rejected with a reason instead of being billed wrongly.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from enum import StrEnum
from time import time
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from meterstream.clock import utc_now

SCHEMA_VERSION: Final = 1

#: Bounds on free-form attributes, so one event cannot blow up a row or a table.
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_LENGTH = 64
MAX_ATTRIBUTE_VALUE_LENGTH = 256
#: Events dated further ahead than this are rejected (clock skew allowance).
MAX_FUTURE_SKEW = timedelta(minutes=5)

Identifier = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/\-]*$"),
]
"""Ids and names: printable ASCII without spaces, so they are safe as Kafka keys and SQL values."""

OptionalIdentifier = Identifier | None
TokenCount = Annotated[int, Field(strict=True, ge=0, le=100_000_000)]
AttributeValue = StrictStr | StrictBool | StrictInt


class Meter(StrEnum):
    """What a usage event counts. Token meters carry token counts; the others a quantity."""

    TOKENS = "tokens"
    REQUESTS = "requests"
    ACTIONS = "actions"
    DOCUMENTS = "documents"
    SEATS = "seats"


class Attribution(StrEnum):
    """Who achieved an outcome: the AI alone, or with a human's help."""

    AI_ONLY = "ai_only"
    HUMAN_ASSISTED = "human_assisted"


def _check_attributes(attributes: dict[str, AttributeValue]) -> dict[str, AttributeValue]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValueError(f"at most {MAX_ATTRIBUTES} attributes are allowed, got {len(attributes)}")
    for key, value in attributes.items():
        if not key or len(key) > MAX_ATTRIBUTE_KEY_LENGTH:
            raise ValueError(f"attribute keys must be 1..{MAX_ATTRIBUTE_KEY_LENGTH} characters: {key[:80]!r}")
        if isinstance(value, str) and len(value) > MAX_ATTRIBUTE_VALUE_LENGTH:
            raise ValueError(
                f"attribute {key!r} is {len(value)} characters; at most {MAX_ATTRIBUTE_VALUE_LENGTH} are allowed"
            )
    return attributes


Attributes = Annotated[dict[str, AttributeValue], AfterValidator(_check_attributes)]


#: Earlier timestamps are not plausible usage and do not fit ClickHouse's DateTime64.
EARLIEST_OCCURRED_AT = datetime(2000, 1, 1, tzinfo=timezone.utc)


_UTC = timezone.utc
#: YYYY-MM-DDTHH:MM:SS with no fraction or milliseconds, in UTC ("Z"): see _occurred_at.
_CANONICAL_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{3})?Z")
_MAX_FUTURE_SKEW_S = MAX_FUTURE_SKEW.total_seconds()


def _occurred_at(value: Any, parse: ValidatorFunctionWrapHandler, info: ValidationInfo) -> datetime:
    """An aware datetime, converted to UTC, not before 2000 and not more than the skew in the future.

    One Python call per event. A ``datetime`` already in UTC (the SDK's own
    timestamps) is what pydantic's aware-datetime validator would return
    unchanged, so it skips that validator and the conversion; anything else
    (JSON strings, other timezones, subclasses) goes through both.
    """
    if type(value) is str and _CANONICAL_UTC.fullmatch(value):
        # The wire format's usual shape (2026-11-27T10:15:00Z, or .123Z): the standard library
        # reads it to the same UTC datetime pydantic would, in a fraction of the time (backfills
        # and the worker validate every event). Anything it refuses goes to pydantic for the error.
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            value = parse(value)
    elif not (type(value) is datetime and value.tzinfo is _UTC):
        # pydantic would read a bare number as Unix seconds; the wire format is an RFC 3339 string.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError("occurred_at must be an RFC 3339 date-time string with a timezone, not a number")
        value = parse(value)
    # The limit is against the time the message reached the broker when the caller knows it
    # (validation context ``received_at``: the worker and reconcile pass the message's broker
    # timestamp, so a verdict does not change with the time it is checked); else the wall clock,
    # in seconds first (cheaper than datetime.now()) and near the limit exactly.
    context = info.context
    received_at = context.get("received_at") if context else None
    if received_at is not None:
        if value - received_at > MAX_FUTURE_SKEW:
            raise ValueError(
                f"occurred_at {value.isoformat()} is more than {int(MAX_FUTURE_SKEW.total_seconds())} s "
                f"in the future of the message's broker timestamp {received_at.isoformat()}"
            )
    elif value.timestamp() - time() > _MAX_FUTURE_SKEW_S - 1 and value - utc_now() > MAX_FUTURE_SKEW:
        raise ValueError(
            f"occurred_at {value.isoformat()} is more than {int(MAX_FUTURE_SKEW.total_seconds())} s in the future"
        )
    utc: datetime = value
    if value.tzinfo is not _UTC:
        try:
            utc = value.astimezone(_UTC)
        except OverflowError:
            # e.g. 0001-01-01T00:30:00+01:00 is before datetime.min in UTC; a ValueError
            # makes it a validation error (a Rejection), not an exception in the worker.
            raise ValueError(f"occurred_at {value.isoformat()} is out of range in UTC") from None
    if utc < EARLIEST_OCCURRED_AT:
        raise ValueError(f"occurred_at {value.isoformat()} is before {EARLIEST_OCCURRED_AT.date()}")
    return utc


OccurredAt = Annotated[AwareDatetime, WrapValidator(_occurred_at)]


class _Event(BaseModel):
    # Lax model mode so JSON strings become enums and datetimes, but numbers and
    # ids are strict types below: "12" is not a token count and 7 is not an id.
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Identifier = Field(description="Idempotency key: the same id is billed once.")
    customer_id: Identifier
    occurred_at: OccurredAt = Field(description="When it happened, timezone-aware (RFC 3339).")
    workflow_id: OptionalIdentifier = None
    run_id: OptionalIdentifier = None
    attributes: Attributes = Field(default_factory=dict)

    @property
    def period(self) -> str:
        """The billing period (calendar month, UTC) the event belongs to."""
        at = self.occurred_at  # UTC (the validator converts it)
        return f"{at.year:04d}-{at.month:02d}"  # strftime costs ~5x this, and the worker asks per event

    def wire_bytes(self) -> bytes:
        """The event as the SDK sends it: UTF-8 JSON without null fields.

        The same bytes as ``model_dump_json(exclude_none=True).encode()``, without
        the decode/encode round trip through ``str``.
        """
        return self.__pydantic_serializer__.to_json(self, exclude_none=True)


_TOKENS = Meter.TOKENS  # a module constant: looking up an enum member costs more than the whole check


class UsageEvent(_Event):
    """One metered use: an LLM call (token meter) or a count of something else."""

    type: Literal["usage"] = "usage"
    meter: Meter = Meter.TOKENS
    model: OptionalIdentifier = Field(default=None, description="Model name as priced, e.g. gpt-4o-mini.")
    provider: OptionalIdentifier = None
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cached_input_tokens: TokenCount = Field(
        default=0, description="Part of input_tokens served from the provider's prompt cache."
    )
    quantity: Annotated[Decimal, Field(ge=0, le=Decimal("1e12"), max_digits=24, decimal_places=9)] = Decimal(0)
    unit: Annotated[str, StringConstraints(max_length=32)] | None = None

    @field_validator("quantity", mode="before")
    @classmethod
    def _quantity_from_json(cls, value: Any) -> Any:
        # Accept JSON numbers/strings for quantity, but never through float
        # arithmetic: floats are re-read from their shortest repr.
        if isinstance(value, bool):
            raise ValueError("quantity must be a number, not a boolean")
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("quantity must be a finite number")
            return Decimal(repr(value))
        if isinstance(value, (int, str)):
            return Decimal(value) if isinstance(value, int) else value
        return value

    @model_validator(mode="after")
    def _meter_shape(self) -> UsageEvent:
        if self.meter is _TOKENS:
            if not self.model:
                raise ValueError("a tokens event needs a model")
            if self.quantity:
                raise ValueError("a tokens event carries token counts, not quantity")
            if self.cached_input_tokens > self.input_tokens:
                raise ValueError("cached_input_tokens cannot exceed input_tokens")
        else:
            if self.input_tokens or self.output_tokens or self.cached_input_tokens:
                raise ValueError(f"a {self.meter.value} event carries quantity, not token counts")
            if self.quantity <= 0:
                raise ValueError(f"a {self.meter.value} event needs a positive quantity")
        return self

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class OutcomeEvent(_Event):
    """A business outcome (a resolved ticket, a verified application) priced by value."""

    type: Literal["outcome"] = "outcome"
    outcome_type: Identifier
    attribution: Attribution
    #: True when this event reverses an earlier outcome (e.g. the ticket reopened).
    reversal_of: OptionalIdentifier = None


Event = UsageEvent | OutcomeEvent
