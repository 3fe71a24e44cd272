"""Wire formats and derived records. The pydantic models are the single definition."""

from meterstream.schemas.events import (
    SCHEMA_VERSION,
    Attribution,
    Meter,
    OutcomeEvent,
    UsageEvent,
)
from meterstream.schemas.records import (
    AlertKind,
    BudgetAlert,
    DeadLetter,
    Decision,
    EnforcementState,
    RatedUsage,
    ThresholdAction,
)

__all__ = [
    "SCHEMA_VERSION",
    "AlertKind",
    "Decision",
    "EnforcementState",
    "Attribution",
    "BudgetAlert",
    "DeadLetter",
    "Meter",
    "OutcomeEvent",
    "RatedUsage",
    "ThresholdAction",
    "UsageEvent",
]
