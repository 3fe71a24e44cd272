"""The worker's batch path, driven directly (``app.meterstream_handle_batch``): no broker, no ClickHouse.

The store is an in-memory stand-in for the one-method storage interface, and the
side-topic sends are captured, so this checks the worker's wiring: one batch in,
rows to the store, rejections to the dead-letter topic, alerts to budget-alerts.
(The consumer that feeds it is exercised on the real broker in tests/system.)
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from unittest.mock import AsyncMock

import pytest

from meterstream.clock import fixed_clock
from meterstream.config import Settings, WorkerSettings
from meterstream.schemas.records import HEARTBEAT_KEY
from meterstream.storage.clickhouse import QueryResult, StoreAccessError, StoreStatementError
from meterstream.stream_processors.app import (
    WorkerStats,
    collect_garbage,
    create_app,
    take_over_garbage_collection,
)
from meterstream.stream_processors.processing import InboundMessage


class MemoryStore:
    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.raw: list = []
        self.rated: list = []
        self.alerts: list = []
        self.failures = failures
        self.error = error
        self.attempts = 0

    def insert_batch(self, raw, rated, alerts=(), *, raw_stored=()) -> None:
        from meterstream.storage.clickhouse import StoreError

        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise self.error or StoreError("store down")
        self.raw += raw
        self.rated += rated
        self.alerts += alerts

    def query(self, sql, parameters=None) -> QueryResult:
        return QueryResult([], [], [])

    def recover_batches(self, committed) -> None:
        pass


#: Every event of these tests occurred at the start of November 2026, and the worker's clock
#: reads five minutes later: November is the open period, whatever day the tests run on.
OCCURRED_AT = datetime(2026, 11, 1, tzinfo=timezone.utc)
CLOCK = fixed_clock(OCCURRED_AT + timedelta(minutes=5))


def _event(event_id: str, customer: str = "acme", input_tokens: int = 10_000) -> bytes:
    return json.dumps(
        {
            "event_id": event_id,
            "customer_id": customer,
            "occurred_at": OCCURRED_AT.isoformat(),
            "model": "gpt-4o",
            "input_tokens": input_tokens,
        }
    ).encode()


def _sent_future() -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


async def _run(store: MemoryStore, values: list[bytes], tmp_path: Path, budgets: str | None = None, timeout=10.0, holder=None):
    budgets_file = None
    if budgets:
        budgets_file = tmp_path / "budgets.yaml"
        budgets_file.write_text(budgets)
    settings = Settings(
        worker=WorkerSettings(app_id="unit", batch_timeout=0.05, budgets_file=budgets_file, data_dir=tmp_path)
    )
    app = create_app(settings, store, clock=CLOCK)
    if holder is not None:
        holder["app"] = app
    sent: dict[str, list[bytes]] = {"alerts": [], "dead_letter": [], "enforcement": []}
    names = {"budget-alerts": "alerts", "meterstream.dead-letter": "dead_letter", "enforcement-state": "enforcement"}

    async def capture(topic, key, value, partition, timestamp, headers):
        if key != HEARTBEAT_KEY.encode():  # heartbeats: test_the_state_does_not_wait_for_the_store
            sent[names[topic]].append(value)
        return _sent_future()

    app.producer.send = AsyncMock(side_effect=capture)
    messages = [InboundMessage("usage", value, "usage.events", 0, offset) for offset, value in enumerate(values)]
    await asyncio.wait_for(app.meterstream_handle_batch(messages, [b"acme"] * len(values)), timeout)
    return app, sent


def test_agent_rates_a_batch_and_writes_it_to_the_store(tmp_path):
    store = MemoryStore()
    app, sent = asyncio.run(_run(store, [_event("e1"), _event("e2"), _event("e1")], tmp_path))
    assert [row.event_id for row in store.rated] == ["e1", "e2"]
    assert all(row.credits == Decimal("5") for row in store.rated)  # 10K tokens x 0.5 per 1K
    assert len(store.raw) == 2
    assert app.meterstream_stats.duplicates == 1
    assert sent == {"alerts": [], "dead_letter": [], "enforcement": []}  # no budgets: no states


def test_agent_sends_rejections_to_the_dead_letter_topic_and_keeps_going(tmp_path):
    store = MemoryStore()
    app, sent = asyncio.run(_run(store, [b"{broken", _event("ok-1"), b"\xff"], tmp_path))
    assert [row.event_id for row in store.rated] == ["ok-1"]
    letters = [json.loads(v) for v in sent["dead_letter"]]
    assert len(letters) == 2
    assert {letter["reason"].split(":")[0] for letter in letters} == {"invalid event"}


def test_agent_raises_each_threshold_once(tmp_path):
    budgets = 'customers:\n  acme: {monthly_credits: "10", thresholds: [50, 100]}\n'
    store = MemoryStore()
    # 3 events x 5 credits = 15 credits against a budget of 10: 50% and 100%, once each.
    app, sent = asyncio.run(_run(store, [_event(f"e{i}") for i in range(3)], tmp_path, budgets))
    alerts = [json.loads(v) for v in sent["alerts"]]
    assert sorted(a["threshold_percent"] for a in alerts) == [50, 100]
    assert len(store.alerts) == 2
    states = [json.loads(v) for v in sent["enforcement"]]
    assert [(s["customer_id"], s["decision"]) for s in states] == [("acme", "warn")]


def test_the_state_and_the_alerts_do_not_wait_for_the_store(tmp_path):
    """Enforcement states and alerts go out as soon as the batch is rated; the store write comes after.

    The alerts' rows are written with the batch (the outbox, alerts.py): a crash before that
    replays the batch, and the outbox pass finds the alerts on the topic and records them once.
    """
    budgets = 'customers:\n  acme: {monthly_credits: "10", thresholds: [50, 100], action: block}\n'
    store = MemoryStore(failures=10**9)  # the store never accepts the write
    holder: dict = {}
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(_run(store, [_event(f"e{i}") for i in range(3)], tmp_path, budgets, timeout=1.0, holder=holder))
    calls = holder["app"].producer.send.await_args_list
    topics_sent = [(c.args[0], c.args[1]) for c in calls]
    assert ("enforcement-state", b"acme") in topics_sent and ("enforcement-state", HEARTBEAT_KEY.encode()) in topics_sent
    state = json.loads(next(c.args[2] for c in calls if c.args[:2] == ("enforcement-state", b"acme")))
    assert (state["decision"], state["counted_ids"]) == ("block", ["e0", "e1", "e2"])
    alerts = [json.loads(c.args[2]) for c in calls if c.args[0] == "budget-alerts"]
    assert sorted(a["threshold_percent"] for a in alerts) == [50, 100] and store.rated == [] and store.alerts == []


def test_agent_retries_the_store_and_loses_nothing(tmp_path):
    store = MemoryStore(failures=2)
    app, _ = asyncio.run(_run(store, [_event("r1"), _event("r2")], tmp_path))
    assert [row.event_id for row in store.rated] == ["r1", "r2"]
    assert app.meterstream_stats.store_retries == 2
    assert app.meterstream_stats.as_dict()["store"] == "ok"  # available again


@pytest.mark.parametrize("error", [
    StoreStatementError("statement failed, not retried: 'INSERT INTO usage_rated': UNKNOWN_TABLE", "INSERT INTO usage_rated"),
    StoreAccessError("the ClickHouse server refused the credentials or grants (AUTHENTICATION_FAILED)"),
])  # fmt: skip
def test_a_programming_or_access_error_is_not_retried_and_nothing_is_written(tmp_path, error):
    store = MemoryStore(failures=100, error=error)
    with pytest.raises(type(error), match=str(error)[:20]):
        asyncio.run(_run(store, [_event("p1")], tmp_path))
    assert store.attempts == 1 and store.rated == []


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setenv("METERSTREAM_CLICKHOUSE__RETRY_BACKOFF_INITIAL", "0.01")


def test_the_heartbeat_says_how_far_the_view_has_reached(tmp_path):
    """A batch read from a backlog publishes the produce time it reached on its slowest partition."""
    settings = Settings(worker=WorkerSettings(app_id="unit", batch_timeout=0.05, data_dir=tmp_path))
    app = create_app(settings, MemoryStore(), clock=CLOCK)
    beats: list[dict] = []

    async def capture(topic, key, value, partition, timestamp, headers):
        if key == HEARTBEAT_KEY.encode():
            beats.append(json.loads(value))
        return _sent_future()

    app.producer.send = AsyncMock(side_effect=capture)
    behind = int((OCCURRED_AT + timedelta(seconds=10)).timestamp() * 1000)  # 4 min 50 s before the clock
    ahead = int((OCCURRED_AT + timedelta(minutes=4)).timestamp() * 1000)
    messages = [InboundMessage("usage", _event("p0"), "usage.events", 0, 0, behind),
                InboundMessage("usage", _event("p1"), "usage.events", 1, 0, ahead)]  # fmt: skip
    asyncio.run(asyncio.wait_for(app.meterstream_handle_batch(messages, [b"acme", b"acme"]), 10))
    [beat] = beats
    assert beat["updated_at"] == (OCCURRED_AT + timedelta(seconds=10)).isoformat().replace("+00:00", "Z")


def test_batches_waiting_for_a_slow_store_go_as_one_insert_and_each_is_stored_once(tmp_path):
    """Batch 1's insert hangs; batches 2 and 3 are rated meanwhile and written by one insert."""

    class SlowFirstStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.inserts: list[list[str]] = []

        def insert_batch(self, raw, rated, alerts=(), *, raw_stored=()) -> None:
            if not self.inserts:
                assert self.release.wait(10)
            self.inserts.append([r.event_id for r in rated])
            super().insert_batch(raw, rated, alerts, raw_stored=raw_stored)

    store = SlowFirstStore()
    settings = Settings(worker=WorkerSettings(app_id="unit", batch_timeout=0.05, data_dir=tmp_path,
                                              insert_linger_seconds=0))  # fmt: skip
    app = create_app(settings, store, clock=CLOCK)

    async def capture(topic, key, value, partition, timestamp, headers):
        return _sent_future()

    app.producer.send = AsyncMock(side_effect=capture)
    messages = [InboundMessage("usage", _event(f"s{i}"), "usage.events", 0, i) for i in range(6)]

    async def run():
        stage = app.meterstream_stage_batch
        first = asyncio.ensure_future((await stage(messages[0:2], [b"acme"] * 2))())
        await asyncio.sleep(0.1)  # the first insert is hanging in its thread
        second = await stage(messages[2:4], [b"acme"] * 2)
        third = await stage(messages[4:6], [b"acme"] * 2)
        store.release.set()
        await asyncio.wait_for(first, 10)
        await asyncio.wait_for(second(), 10)  # stores batches 2 and 3
        await asyncio.wait_for(third(), 10)  # finds its rows stored

    asyncio.run(run())
    assert store.inserts == [["s0", "s1"], ["s2", "s3", "s4", "s5"]]
    assert [r.event_id for r in store.rated] == [f"s{i}" for i in range(6)]
    assert [r.event_id for r in store.raw] == [f"s{i}" for i in range(6)]
    stats = app.meterstream_stats.as_dict()
    assert (stats["batches"], stats["inserts"], stats["messages"], stats["staged"]) == (3, 2, 6, 6)


@pytest.mark.parametrize("linger", [0.0, 5.0])
def test_a_write_lingers_for_the_batches_rated_after_it_then_stores_them_in_one_insert(tmp_path, linger):
    """Small batches in quick succession: one insert with the linger (until writes_in_hand wait), one each without."""

    class CountingStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.inserts: list[list[str]] = []

        def insert_batch(self, raw, rated, alerts=(), *, raw_stored=()) -> None:
            self.inserts.append([r.event_id for r in rated])
            super().insert_batch(raw, rated, alerts, raw_stored=raw_stored)

    store = CountingStore()
    settings = Settings(worker=WorkerSettings(app_id="unit", batch_timeout=0.05, data_dir=tmp_path,
                                              insert_linger_seconds=linger, writes_in_hand=3))  # fmt: skip
    app = create_app(settings, store, clock=CLOCK)

    async def capture(topic, key, value, partition, timestamp, headers):
        return _sent_future()

    app.producer.send = AsyncMock(side_effect=capture)
    messages = [InboundMessage("usage", _event(f"l{i}"), "usage.events", 0, i) for i in range(3)]

    async def chained(previous, write):  # as the consumer runs them: each after the one before
        if previous is not None:
            await previous
        await write()

    async def run():
        last = None
        for i in range(3):
            last = asyncio.ensure_future(chained(last, await app.meterstream_stage_batch(messages[i : i + 1], [b"acme"])))
            await asyncio.sleep(0.05)
        # With a 5 s linger the third batch (writes_in_hand) ends the wait: no 5 s pause.
        await asyncio.wait_for(last, 2.0)

    asyncio.run(run())
    expected = [["l0", "l1", "l2"]] if linger else [["l0"], ["l1"], ["l2"]]
    assert store.inserts == expected
    assert [r.event_id for r in store.rated] == ["l0", "l1", "l2"]


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_worker_collects_garbage_itself_once_it_took_over() -> None:
    stats = WorkerStats()
    collect_garbage(stats)
    assert stats.gc_collections == 0  # Python's automatic collector is on: nothing to do
    try:
        take_over_garbage_collection()
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        del cycle
        assert alive() is not None  # unreachable, but only a collection frees a cycle
        collect_garbage(stats)
        assert alive() is None
        assert stats.gc_collections == 1 and stats.gc_last_seconds > 0
        assert stats.as_dict()["gc"] == {"automatic": False, "collections": 1,
                                         "last_seconds": round(stats.gc_last_seconds, 4)}  # fmt: skip
    finally:
        gc.enable()
        gc.unfreeze()
