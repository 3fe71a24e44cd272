"""Rating one event: the per-event definition of what an event costs. Pure: no Kafka, no ClickHouse.

Every path prices events through the batch engine (meterstream/pricing/engine.py:
the worker a batch at a time, :meth:`Catalog.rate` a batch of one). :func:`rate_event`
is the rule written one event at a time in ``Decimal``: the oracle the engine's property
tests compare it with, to the last digit (tests/unit/test_engine.py). The cost and
saving helpers below price token counts no single event holds (provider bills).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timezone
from decimal import Decimal

from meterstream.pricing.pricebook import MILLION, PriceBook, TokenRates
from meterstream.schemas.events import Attribution, Meter, OutcomeEvent, UsageEvent
from meterstream.schemas.records import RatedUsage

THOUSAND = Decimal(1000)


class RatingError(ValueError):
    """The event is valid but this price book cannot price it (e.g. an unknown model)."""


def _tokens_amount(rates: TokenRates, per: Decimal, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> Decimal:
    # input_tokens includes the cached part (OpenAI's convention, which the SDK normalises to).
    uncached = input_tokens - cached_input_tokens
    return (
        Decimal(uncached) * rates.input
        + Decimal(cached_input_tokens) * rates.cached_input_rate
        + Decimal(output_tokens) * rates.output
    ) / per


def _token_amount(rates: TokenRates, per: Decimal, event: UsageEvent) -> Decimal:
    return _tokens_amount(rates, per, event.input_tokens, event.cached_input_tokens, event.output_tokens)


def token_cost(book: PriceBook, model: str, *, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> Decimal:
    """Cost to serve of any number of tokens of ``model`` under ``book``: what rating charges per event, summed.

    For counts no single event holds (a provider's daily bill). Raises :class:`RatingError`
    if the book has no price for the model.
    """
    prices = book.models.get(model)
    if prices is None:
        raise RatingError(f"no price for model {model!r} in price book {book.version}")
    return _tokens_amount(prices.cost_per_1m, MILLION, input_tokens, cached_input_tokens, output_tokens)


@dataclass(frozen=True)
class CacheSaving:
    """What prompt caching saved on some cached input tokens of one model, under one price book."""

    #: Customer side: credits the cached tokens would have cost more at the uncached input rate.
    credits: Decimal
    #: Our side: provider cost the cached tokens would have cost more at the uncached input rate.
    cost_to_serve: Decimal


def cache_saving(book: PriceBook, model: str, cached_input_tokens: int) -> CacheSaving:
    """The saving of ``cached_input_tokens`` billed at the cached rate instead of the input rate.

    ``credits = cached × (credits input − credits cached input) / 1,000`` and
    ``cost_to_serve = cached × (cost input − cost cached input) / 1,000,000``: the
    counterfactual of :func:`_token_amount` with every cached token uncached.
    Raises :class:`RatingError` if the book has no price for the model.
    """
    prices = book.models.get(model)
    if prices is None:
        raise RatingError(f"no price for model {model!r} in price book {book.version}")
    cached = Decimal(cached_input_tokens)
    credits, cost = prices.credits_per_1k, prices.cost_per_1m
    return CacheSaving(
        credits=cached * (credits.input - credits.cached_input_rate) / THOUSAND,
        cost_to_serve=cached * (cost.input - cost.cached_input_rate) / MILLION,
    )


def rate_event(event: UsageEvent | OutcomeEvent, book: PriceBook) -> RatedUsage:
    """Price one event under ``book``; raises :class:`RatingError` if the book has no price for it."""
    common = {
        "event_id": event.event_id,
        "customer_id": event.customer_id,
        "occurred_at": event.occurred_at.astimezone(timezone.utc),
        "period": event.period,
        "workflow_id": event.workflow_id or "",
        "run_id": event.run_id or "",
        "currency": book.currency,
        "price_book_version": book.version,
    }
    if isinstance(event, OutcomeEvent):
        price = book.outcomes.get(event.outcome_type)
        if price is None:
            raise RatingError(f"no outcome price for {event.outcome_type!r} in price book {book.version}")
        credits = price.ai_only if event.attribution is Attribution.AI_ONLY else price.human_assisted
        cost = price.cost_per_outcome
        rule = f"outcome:{event.outcome_type}:{event.attribution.value}"
        if event.reversal_of:
            # A reversal credits back the outcome it reverses.
            credits, cost, rule = -credits, -cost, f"{rule}:reversal"
        # Built from a validated event and a validated price book: nothing left to validate.
        return RatedUsage.trusted(
            kind="outcome",
            meter="outcome",
            quantity=Decimal(1),
            outcome_type=event.outcome_type,
            attribution=event.attribution.value,
            credits=credits,
            cost_to_serve=cost,
            rule=rule,
            **common,
        )

    if event.meter is Meter.TOKENS:
        assert event.model is not None  # enforced by the schema
        model = book.models.get(event.model)
        if model is None:
            raise RatingError(f"no price for model {event.model!r} in price book {book.version}")
        credits = _token_amount(model.credits_per_1k, THOUSAND, event)
        cost = _token_amount(model.cost_per_1m, MILLION, event)
        rule = f"tokens:{event.model}"
        provider = event.provider or model.provider
    else:
        meter_price = book.meters.get(event.meter.value)
        if meter_price is None:
            raise RatingError(f"no price for meter {event.meter.value!r} in price book {book.version}")
        credits = event.quantity * meter_price.credits_per_unit
        cost = event.quantity * meter_price.cost_per_unit
        rule = f"meter:{event.meter.value}"
        provider = event.provider or ""
    return RatedUsage.trusted(
        kind="usage",
        meter=event.meter.value,
        model=event.model or "",
        provider=provider,
        input_tokens=event.input_tokens,
        cached_input_tokens=event.cached_input_tokens,
        output_tokens=event.output_tokens,
        quantity=event.quantity,
        unit=event.unit or "",
        credits=credits,
        cost_to_serve=cost,
        rule=rule,
        **common,
    )


