"""Shared fixtures for the unit tests: small price books, event factories, deterministic hypothesis."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from meterstream.pricing.pricebook import PriceBook, parse_price_book
from meterstream.schemas.events import OutcomeEvent, UsageEvent

# Deterministic property tests: the same examples on every run, no example database on disk.
settings.register_profile(
    "meterstream-unit",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("meterstream-unit")

#: A fixed instant in the past, so events never trip the "too far in the future" check.
T0 = datetime(2025, 3, 15, 12, 0, 0, tzinfo=timezone.utc)

#: The price book of ../shared/PRICING.md ("Credits conversion"), plus meters and outcomes.
SMALL_BOOK: dict[str, Any] = {
    "version": "test-book-1",
    "currency": "USD",
    "models": {
        "large-model": {
            "provider": "example",
            # No cached_input credits rate: it defaults to the input rate.
            "credits_per_1k": {"input": "0.25", "output": "1.0"},
            "cost_per_1m": {"input": "2.50", "cached_input": "1.25", "output": "10.00"},
        },
        "small-model": {
            "provider": "example",
            "credits_per_1k": {"input": "0.02", "cached_input": "0.01", "output": "0.08"},
            "cost_per_1m": {"input": "0.15", "cached_input": "0.075", "output": "0.60"},
        },
    },
    "meters": {
        "requests": {"credits_per_unit": "0.01"},
        "documents": {"credits_per_unit": "2", "cost_per_unit": "0.004"},
    },
    "outcomes": {
        "resolved_ticket": {"ai_only": "90", "human_assisted": "0"},
        "verified_application": {"ai_only": "150", "human_assisted": "50", "cost_per_outcome": "0.40"},
    },
}


@pytest.fixture(scope="session")
def book() -> PriceBook:
    return parse_price_book(SMALL_BOOK, source="conftest")


@pytest.fixture(scope="session")
def make_usage() -> Callable[..., UsageEvent]:
    """Factory: a valid large-model tokens event at T0; keyword arguments override fields."""

    def factory(**overrides: Any) -> UsageEvent:
        fields: dict[str, Any] = {
            "event_id": "evt-1",
            "customer_id": "acme",
            "occurred_at": T0,
            "model": "large-model",
            "input_tokens": 12_000,
            "output_tokens": 3_000,
        }
        fields.update(overrides)
        return UsageEvent(**fields)

    return factory


@pytest.fixture(scope="session")
def make_outcome() -> Callable[..., OutcomeEvent]:
    def factory(**overrides: Any) -> OutcomeEvent:
        fields: dict[str, Any] = {
            "event_id": "out-1",
            "customer_id": "acme",
            "occurred_at": T0,
            "outcome_type": "verified_application",
            "attribution": "ai_only",
        }
        fields.update(overrides)
        return OutcomeEvent(**fields)

    return factory
