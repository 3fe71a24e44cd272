"""The SDK services use to publish usage and outcome events, and to enforce budgets before a call.

One vocabulary for budgets: :class:`BudgetGuard` answers with a :class:`GuardDecision`
whose ``decision`` is a :class:`Decision` (``ok``, ``warn``, ``downgrade``, ``block`` —
the same values the worker publishes on ``enforcement-state``) and whose ``code`` is a
:class:`Reason`; a blocked call is raised as :class:`BudgetExceeded`.
"""

from meterstream.producers.client import DeliveryFailure, MeterClient, ProducerClosed
from meterstream.producers.guard import (
    BudgetExceeded,
    BudgetGuard,
    CatalogMismatch,
    EnforcementView,
    GuardDecision,
    Reason,
)
from meterstream.producers.ledger import LedgerUnavailable, RedisLedger
from meterstream.producers.llm import TokenUsage, usage_from_anthropic, usage_from_openai
from meterstream.schemas.records import Decision

__all__ = [
    "BudgetExceeded",
    "BudgetGuard",
    "CatalogMismatch",
    "Decision",
    "DeliveryFailure",
    "EnforcementView",
    "GuardDecision",
    "LedgerUnavailable",
    "MeterClient",
    "ProducerClosed",
    "Reason",
    "RedisLedger",
    "TokenUsage",
    "usage_from_anthropic",
    "usage_from_openai",
]
