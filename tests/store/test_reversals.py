"""Outcome reversals in the worker, against the real engine: matched to an outcome found in the store,
at most once (also across a restart, from events_raw), at the price it was billed; refused ones
are dead-lettered with the reason and never reach an invoice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from meterstream.billing import invoice_from_store
from meterstream.budgets import BudgetBook
from meterstream.pricing.plans import parse_catalog
from meterstream.schemas.events import OutcomeEvent
from meterstream.storage.clickhouse import open_store
from meterstream.storage.queries import saved_query
from meterstream.stream_processors.processing import BatchProcessor, InboundMessage
from meterstream.stream_processors.state import StoreBackedState

pytestmark = pytest.mark.store

T0 = datetime(2026, 10, 5, 9, tzinfo=UTC)
AFTER = datetime(2027, 1, 1, tzinfo=UTC)
BOOK = {"outcomes": {"resolved_ticket": {"ai_only": "1", "human_assisted": "0"}}}
CATALOG = parse_catalog(
    {
        "currency": "USD",
        "default_plan": "p",
        "plans": {
            "p": {
                "versions": [
                    {"version": "p-1", "effective_from": "2026-01-01", "price_book": BOOK,
                     "overage": {"model": "per_unit", "unit_price": "0"},
                     "outcome_prices": {"resolved_ticket": {"ai_only": "1.00"}}},
                    # From the 10th an outcome costs 4.00: reversals after it still credit 1.00.
                    {"version": "p-2", "effective_from": "2026-10-10", "price_book": BOOK,
                     "overage": {"model": "per_unit", "unit_price": "0"},
                     "outcome_prices": {"resolved_ticket": {"ai_only": "4.00"}}},
                ]
            }
        },
    }
)  # fmt: skip


def _outcome(event_id: str, at: datetime, reversal_of: str | None = None) -> InboundMessage:
    event = OutcomeEvent(event_id=event_id, customer_id="acme", occurred_at=at, outcome_type="resolved_ticket",
                         attribution="ai_only", reversal_of=reversal_of)  # fmt: skip
    return InboundMessage("outcome", event.model_dump_json().encode(), "outcome.events", 0, hash(event_id) % 10_000)


def _worker_batch(store, messages: list[InboundMessage]):
    """One batch as the worker runs it, with state rebuilt from the store (a fresh worker each time)."""
    state = StoreBackedState(store, topics=["outcome.events"], window_seconds=60, window_expires_seconds=3600)
    processor = BatchProcessor(CATALOG, BudgetBook(), seen=state, outcomes=state)
    now = datetime(2026, 10, 25, tzinfo=UTC)  # the period is open: nothing is late
    result = processor.process(messages, state.month_to_date, now=now, prepare=state.prepare, history=state)
    store.insert_batch(result.raw, result.rated)
    state.commit(result)
    return result


def test_reversals_are_matched_once_at_the_billed_price_across_restarts(clickhouse) -> None:
    store = open_store(clickhouse)
    try:
        first = _worker_batch(store, [_outcome("o1", T0), _outcome("o2", T0)])
        assert len(first.rated) == 2 and not first.dead_letters

        later = T0 + timedelta(days=10)  # under p-2, where an outcome costs 4.00
        second = _worker_batch(
            store,
            [_outcome("r1", later, "o1"), _outcome("r2", later, "o1"), _outcome("r3", later, "nope"),
             _outcome("r4", T0 - timedelta(days=1), "o2")],  # fmt: skip
        )
        assert [r.event_id for r in second.rated] == ["r1"]
        (reversal,) = second.rated
        assert (reversal.price_book_version, reversal.credits) == ("p-1", Decimal(-1))
        reasons = sorted(d.reason for d in second.dead_letters)
        assert reasons == [
            "outcome 'o1' was already reversed by 'r1'",
            "reversal at 2026-10-04T09:00:00+00:00 precedes outcome 'o2' at 2026-10-05T09:00:00+00:00",
            "reversal_of 'nope': no billed outcome with that id for customer 'acme'",
        ]
        assert {OutcomeEvent.model_validate_json(d.raw).event_id for d in second.dead_letters} == {"r2", "r3", "r4"}

        # A new worker finds r1 in events_raw: another reversal of o1 is refused; o2 can still be reversed.
        third = _worker_batch(store, [_outcome("r5", later, "o1"), _outcome("r6", later, "o2")])
        assert [d.reason for d in third.dead_letters] == ["outcome 'o1' was already reversed by 'r1'"]
        assert [r.event_id for r in third.rated] == ["r6"]

        def run(name: str, **params: str):
            return store.query(saved_query(name), params)

        invoice = invoice_from_store(run, CATALOG, "acme", "2026-10", as_of=AFTER)
        # 2 outcomes at 1.00, 2 reversals at the 1.00 they were billed (not 4.00).
        outcome_lines = [(line.quantity, line.unit_price, line.amount) for line in invoice.lines if line.kind == "outcomes"]
        assert outcome_lines == [(Decimal(2), Decimal("1.00"), Decimal("2.00")), (Decimal(-2), Decimal("1.00"), Decimal("-2.00"))]
        assert invoice.total == Decimal("0.00")
    finally:
        store.close()


def test_a_long_running_worker_keeps_only_the_newest_billed_outcomes_and_asks_the_store_for_the_rest(clickhouse) -> None:
    """The outcomes a reversal may name are kept in memory up to a bound; the older ones (and what
    reversed them) come from the store, so a reversal is matched and refused the same either way."""
    store = open_store(clickhouse)
    try:
        state = StoreBackedState(store, topics=["outcome.events"], window_seconds=60, window_expires_seconds=3600,
                                 billed_capacity=2)  # fmt: skip
        processor = BatchProcessor(CATALOG, BudgetBook(), seen=state, outcomes=state)
        now = datetime(2026, 10, 25, tzinfo=UTC)

        def batch(messages: list[InboundMessage]):
            result = processor.process(messages, state.month_to_date, now=now, prepare=state.prepare, history=state)
            store.insert_batch(result.raw, result.rated)
            state.commit(result)
            assert len(state.billed) <= 2
            return result

        batch([_outcome(f"k{i}", T0) for i in range(5)])
        assert list(state.billed) == ["acme|k3", "acme|k4"]  # the newest two
        later = T0 + timedelta(days=10)
        second = batch([_outcome("q1", later, "k0"), _outcome("q2", later, "k4")])  # k0 from the store, k4 in memory
        assert [(r.event_id, r.credits, r.price_book_version) for r in second.rated] == [
            ("q1", Decimal(-1), "p-1"), ("q2", Decimal(-1), "p-1")]  # fmt: skip
        batch([_outcome(f"m{i}", later) for i in range(3)])  # k0, k4 and their reversals leave memory
        assert "acme|k0" not in state.reversed and "acme|k4" not in state.reversed
        third = batch([_outcome("q3", later, "k0"), _outcome("q4", later, "k4"), _outcome("q5", later, "k1")])
        assert sorted(d.reason for d in third.dead_letters) == [
            "outcome 'k0' was already reversed by 'q1'", "outcome 'k4' was already reversed by 'q2'"]  # fmt: skip
        assert [r.event_id for r in third.rated] == ["q5"]
    finally:
        store.close()
