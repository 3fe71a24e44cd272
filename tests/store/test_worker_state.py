"""The worker's in-memory state is bounded, and what it drops comes back from the store, against the real engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meterstream.budgets import BudgetBook
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.events import UsageEvent
from meterstream.storage.clickhouse import open_store
from meterstream.stream_processors.processing import BatchProcessor, InboundMessage
from meterstream.stream_processors.state import StoreBackedState, state_capacities

pytestmark = pytest.mark.store

T0 = datetime(2026, 10, 5, 9, tzinfo=UTC)
NOW = datetime(2026, 10, 25, tzinfo=UTC)  # the period is open: nothing is late


def _step(event_id: str, run_id: str | None, offset: int) -> InboundMessage:
    event = UsageEvent(event_id=event_id, customer_id="acme", occurred_at=T0 + timedelta(seconds=offset),
                       model="gpt-4o", input_tokens=1000, run_id=run_id)  # fmt: skip
    return InboundMessage("usage", event.model_dump_json().encode(), "usage.events", 0, offset)


def test_a_long_running_worker_keeps_the_most_recently_updated_runs_and_reads_the_rest_from_the_store(clickhouse):
    """Run totals (for run caps) are kept for the newest-updated runs only; a run that goes on after
    leaving memory is read back from the store, so its cap is reached on the same step either way."""
    store = open_store(clickhouse)
    try:
        state = StoreBackedState(store, topics=["usage.events"], window_seconds=60, window_expires_seconds=3600,
                                 runs_capacity=2)  # fmt: skip
        budgets = BudgetBook.model_validate({"customers": {"acme": {"monthly_credits": "1000000",
                                                                     "run_cap": {"max_steps": 3}}}})  # fmt: skip
        processor = BatchProcessor(load_catalog(), budgets, seen=state, outcomes=state)
        offsets = iter(range(1_000))

        def batch(steps: list[tuple[str, str]]):
            result = processor.process([_step(e, r, next(offsets)) for e, r in steps], state.month_to_date,
                                       now=NOW, prepare=state.prepare, history=state)  # fmt: skip
            store.insert_batch(result.raw, result.rated)
            state.commit(result)
            assert len(state.runs) <= 2
            return result

        batch([("a1", "r1"), ("a2", "r1"), ("b1", "r2"), ("c1", "r3")])
        assert list(state.runs) == ["acme|r2", "acme|r3"]  # r1 was updated least recently
        batch([("b2", "r2")])  # r2 goes on: r3 is now the least recent
        assert list(state.runs) == ["acme|r3", "acme|r2"]
        third = batch([("a3", "r1")])  # r1's two steps come from the store: this is its third
        assert third.runs["acme|r1"][1] == 3
        assert [a.triggering_event_id for a in third.alerts if a.kind == "run_cap"] == ["a3"]
        assert list(state.runs) == ["acme|r2", "acme|r1"]
    finally:
        store.close()


def test_the_worker_keeps_at_least_what_may_be_unstored_at_once():
    """Dropped entries are read back from the store, so none may belong to a batch not yet stored."""
    small = state_capacities(recent_ids=1_000, batch_size=100_000, writes_in_hand=16)
    assert small == {"recent_capacity": 1_700_000, "billed_capacity": 1_700_000, "runs_capacity": 1_700_000}
    default = state_capacities(recent_ids=1_000_000, batch_size=5_000, writes_in_hand=3)
    assert default == {"recent_capacity": 1_000_000, "billed_capacity": 100_000, "runs_capacity": 100_000}


def test_after_a_restart_only_messages_up_to_the_stored_offset_are_checked_against_the_store(clickhouse):
    """Replays (offsets the store already holds on their partition) are found in the store and
    dropped; once a batch is wholly past the stored offset, the partition is not looked at again."""
    store = open_store(clickhouse)
    try:
        def worker() -> tuple[StoreBackedState, BatchProcessor]:
            state = StoreBackedState(store, topics=["usage.events"], window_seconds=60, window_expires_seconds=3600,
                                     clock=lambda: NOW)  # fmt: skip
            return state, BatchProcessor(load_catalog(), BudgetBook(), seen=state, outcomes=state)

        def batch(state: StoreBackedState, processor: BatchProcessor, offsets: range):
            result = processor.process([_step(f"e{o}", None, o) for o in offsets], state.month_to_date, now=NOW,
                                       prepare=state.prepare, history=state)  # fmt: skip
            store.insert_batch(result.raw, result.rated, raw_stored=state.raw_stored)
            state.commit(result)
            return result

        batch(*worker(), range(0, 5))
        state, processor = worker()  # a restart: nothing in memory
        replay = batch(state, processor, range(3, 8))
        assert replay.duplicates == 2 and [r.event_id for r in replay.rated] == ["e5", "e6", "e7"]
        assert state.stored_upto == {("usage.events", 0): 4}  # offset 3 was behind it: looked at
        later = batch(state, processor, range(8, 10))
        assert later.duplicates == 0 and state.stored_upto == {}  # wholly past it: no more lookups there
        rows = store.query("SELECT count(), uniqExact(event_id) FROM events_raw").rows
        assert rows == [[10, 10]]
    finally:
        store.close()
