"""Records the pipeline derives from events: rated rows, budget alerts, dead letters."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

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


class ThresholdAction(StrEnum):
    ALERT = "alert"
    DOWNGRADE = "downgrade"
    BLOCK = "block"


class BudgetAlert(BaseModel):
    """Sent once per customer, period and threshold when month-to-date spend crosses it."""

    model_config = ConfigDict(frozen=True)

    alert_id: str = Field(description="Deterministic: consumers dedupe on it.")
    customer_id: str
    period: str
    threshold_percent: int
    budget_credits: Decimal
    spent_credits: Decimal
    crossed_at: AwareDatetime
    triggering_event_id: str
    action: ThresholdAction = ThresholdAction.ALERT

    @staticmethod
    def make_id(customer_id: str, period: str, threshold_percent: int) -> str:
        digest = hashlib.sha256(f"{customer_id}|{period}|{threshold_percent}".encode()).hexdigest()
        return f"alert-{digest[:24]}"


class DeadLetter(BaseModel):
    """A rejected message: raw bytes (standard, padded base64 in JSON) and why, with where it came from."""

    model_config = ConfigDict(frozen=True)

    reason: str
    raw: bytes = Field(description="The message value exactly as received, base64 (RFC 4648) in JSON.")
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    rejected_at: datetime

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
