"""The SDK services use to publish usage and outcome events, and to enforce budgets before a call.

One vocabulary for budgets: :class:`BudgetGuard` answers with a :class:`GuardDecision`
whose ``decision`` is a :class:`Decision` (``ok``, ``warn``, ``downgrade``, ``block`` —
the same values the worker publishes on ``enforcement-state``) and whose ``code`` is a
:class:`Reason`; a blocked call is raised as :class:`BudgetExceeded`.

The guard (it loads the price catalog: PyYAML) and the Redis ledger are imported on first
use, so ``pip install meterstream`` (no extras) still records events;
``pip install 'meterstream[guard]'`` adds what the guard needs.
"""

from importlib import import_module
from typing import Any

from meterstream.producers.client import DeliveryFailure, MeterClient, ProducerClosed
from meterstream.producers.llm import TokenUsage, usage_from_anthropic, usage_from_openai
from meterstream.schemas.records import Decision

_LAZY = {
    "BudgetExceeded": "meterstream.producers.guard",
    "BudgetGuard": "meterstream.producers.guard",
    "CatalogMismatch": "meterstream.producers.guard",
    "EnforcementView": "meterstream.producers.guard",
    "GuardDecision": "meterstream.producers.guard",
    "Reason": "meterstream.producers.guard",
    "LedgerUnavailable": "meterstream.producers.ledger",
    "RedisLedger": "meterstream.producers.ledger",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meterstream.producers' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
