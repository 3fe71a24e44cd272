"""The worker's batch consumer without a broker: stages overlap, writes and offsets stay in order.

A fake aiokafka consumer records commits; the stager records when each batch is
rated and written. The real consumer on the real broker (rebalances, SIGKILL,
SIGTERM) is exercised in tests/system/test_worker_restarts.py and the
pipeline tests.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from meterstream.config import KafkaSettings
from meterstream.stream_processors.consumer import BatchConsumer

TP0 = TopicPartition("usage.events", 0)
TP1 = TopicPartition("outcome.events", 0)


class FakeKafkaConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TP0, TP1}

    async def commit(self, offsets) -> None:
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})


def _records(tp: TopicPartition, first: int, n: int) -> dict[TopicPartition, list[SimpleNamespace]]:
    return {tp: [SimpleNamespace(offset=first + i, value=b"{}", key=b"acme", timestamp=1_764_547_200_000) for i in range(n)]}


def _consumer(
    stage, commit_interval: float = 0.0, on_revoked=lambda: None, writes_in_hand: int = 1
) -> tuple[BatchConsumer, FakeKafkaConsumer]:
    consumer = BatchConsumer(
        KafkaSettings(),
        topics=[TP0.topic, TP1.topic],
        kinds={TP0.topic: "usage", TP1.topic: "outcome"},
        group_id="unit",
        stage=stage,
        on_revoked=on_revoked,
        batch_size=100,
        batch_timeout=0.05,
        commit_interval=commit_interval,
        session_timeout=10,
        shutdown_drain=5,
        writes_in_hand=writes_in_hand,
    )
    fake = FakeKafkaConsumer()
    consumer.consumer = fake  # type: ignore[assignment]
    return consumer, fake


def _logging_stage(log: list[str], release_first_write: asyncio.Event, slower: str | None = None):
    """A stager that logs ``rate bN`` / ``write bN``; b0's write waits for the event, ``slower``'s sleeps."""

    async def stage(messages, keys):
        name = f"b{messages[0].offset}"
        log.append(f"rate {name}")

        async def write():
            if name == "b0":
                await release_first_write.wait()  # the first write is slow
            await asyncio.sleep(0.01 if name == slower else 0)  # a later write finishing out of step
            log.append(f"write {name}")

        return write

    return stage


def test_the_next_batch_is_rated_while_the_previous_one_is_written_and_writes_stay_in_order():
    log: list[str] = []
    release_first_write = asyncio.Event()
    stage = _logging_stage(log, release_first_write)

    async def run():
        consumer, fake = _consumer(stage)
        await consumer._process(_records(TP0, 0, 3))
        # Batch 1 is rated while batch 0's write is still waiting.
        second = asyncio.ensure_future(consumer._process(_records(TP0, 3, 2)))
        await asyncio.sleep(0.05)
        assert log == ["rate b0", "rate b3"]
        assert fake.commits == []  # nothing is durable yet
        release_first_write.set()
        await second
        await consumer._settle()
        return log, fake.commits

    log, commits = asyncio.run(run())
    assert log == ["rate b0", "rate b3", "write b0", "write b3"]
    # Each offset is committed only after its batch's write; the last commit is the next offset to read.
    assert commits == [{TP0: 3}, {TP0: 5}]


def test_batches_are_rated_ahead_of_a_slow_write_up_to_writes_in_hand_and_written_in_order():
    log: list[str] = []
    release_first_write = asyncio.Event()
    stage = _logging_stage(log, release_first_write, slower="b2")

    async def run():
        consumer, fake = _consumer(stage, writes_in_hand=2)
        await consumer._process(_records(TP0, 0, 2))
        await consumer._process(_records(TP0, 2, 2))
        # Two writes in hand: the third batch is rated, then held until the first write is done.
        third = asyncio.ensure_future(consumer._process(_records(TP0, 4, 2)))
        await asyncio.sleep(0.05)
        assert log == ["rate b0", "rate b2", "rate b4"]
        assert not third.done() and fake.commits == []
        assert consumer.in_hand == "usage.events:0@0-1; usage.events:0@2-3; usage.events:0@4-5"
        release_first_write.set()
        await third
        await consumer._settle()
        return log, fake.commits

    log, commits = asyncio.run(run())
    assert log == ["rate b0", "rate b2", "rate b4", "write b0", "write b2", "write b4"]
    assert commits == [{TP0: 2}, {TP0: 4}, {TP0: 6}]


def test_a_failed_write_fails_the_writes_queued_behind_it_and_nothing_after_it_is_committed():
    release = asyncio.Event()

    async def stage(messages, keys):
        first = messages[0].offset

        async def write():
            await release.wait()
            if first == 2:
                raise RuntimeError("store refused the batch")

        return write

    async def run():
        consumer, fake = _consumer(stage, writes_in_hand=3)
        for first in (0, 2, 4):
            await consumer._process(_records(TP0, first, 2))
        release.set()
        with pytest.raises(RuntimeError, match="refused"):
            await consumer._settle()
        return fake.commits

    # The first batch is durable and committed; the failed one and the one after it are not.
    assert asyncio.run(run()) == [{TP0: 2}]


def test_a_failed_write_is_never_committed_and_surfaces():
    async def stage(messages, keys):
        async def write():
            raise RuntimeError("broker refused the dead letters")

        return write

    async def run():
        consumer, fake = _consumer(stage)
        await consumer._process(_records(TP1, 10, 2))
        with pytest.raises(RuntimeError, match="refused"):
            await consumer._settle()
        return fake.commits

    assert asyncio.run(run()) == []


def test_records_of_a_partition_revoked_since_the_fetch_are_not_processed():
    seen: list[tuple[str, int]] = []

    async def stage(messages, keys):
        seen.extend((m.topic, m.offset) for m in messages)

        async def write():
            return None

        return write

    async def run():
        consumer, fake = _consumer(stage)
        revoked = TopicPartition("usage.events", 7)
        await consumer._process({**_records(revoked, 0, 2), **_records(TP1, 4, 1)})
        await consumer._settle()
        return fake.commits

    commits = asyncio.run(run())
    assert seen == [("outcome.events", 4)]
    assert commits == [{TP1: 5}]


def test_commits_are_batched_by_the_commit_interval_and_forced_on_revocation():
    async def stage(messages, keys):
        async def write():
            return None

        return write

    async def run():
        consumer, fake = _consumer(stage, commit_interval=3600)
        consumer._last_commit = asyncio.get_running_loop().time() + 10**9  # a commit was just made
        await consumer._process(_records(TP0, 0, 2))
        await consumer._process(_records(TP1, 0, 4))
        await consumer._settle()
        assert fake.commits == []  # within the interval: held
        await consumer.revoked({TP0})
        return fake.commits

    assert asyncio.run(run()) == [{TP0: 2, TP1: 4}]


def test_a_stop_during_a_rebalance_still_finishes_the_write_in_hand():
    """SIGTERM while revoked() waits for a write: the waiter is cancelled, the write is not."""
    release = asyncio.Event()
    written: list[str] = []

    async def stage(messages, keys):
        async def write():
            await release.wait()
            written.append("b0")

        return write

    async def run():
        consumer, fake = _consumer(stage)
        await consumer._process(_records(TP0, 0, 3))
        rebalance = asyncio.ensure_future(consumer.revoked({TP0}))
        await asyncio.sleep(0.02)
        rebalance.cancel()  # what consumer.stop() does to the coordinator task running revoked()
        await asyncio.sleep(0.02)
        stop = asyncio.ensure_future(consumer._settle())  # on_stop's wait
        await asyncio.sleep(0.02)
        assert not stop.done()  # the stop waits for the write instead of skipping it
        release.set()
        await stop
        await consumer._commit(force=True)
        return fake.commits

    assert asyncio.run(run()) == [{TP0: 3}]
    assert written == ["b0"]


def test_the_state_is_reset_on_revocation_only_after_the_writes_in_hand():
    events: list[str] = []
    release = asyncio.Event()

    async def stage(messages, keys):
        async def write():
            await release.wait()
            events.append("write done")

        return write

    async def run():
        consumer, fake = _consumer(stage, on_revoked=lambda: events.append("reset"))
        await consumer._process(_records(TP0, 0, 1))
        rebalance = asyncio.ensure_future(consumer.revoked({TP0}))
        await asyncio.sleep(0.02)
        assert events == []
        release.set()
        await rebalance
        return fake.commits

    assert asyncio.run(run()) == [{TP0: 1}]
    assert events == ["write done", "reset"]


def test_the_fatal_path_commits_nothing_closes_the_store_and_flushes_the_log(monkeypatch, tmp_path):
    import logging
    import os

    closed: list[str] = []
    consumer, fake = _consumer(stage=None)
    consumer.on_fatal = lambda: closed.append("store")
    consumer._pending = {TP0: 10}
    handler = logging.FileHandler(tmp_path / "worker.log")
    logging.getLogger("meterstream").addHandler(handler)

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_)
    try:
        try:
            raise RuntimeError("the store refused the batch")
        except RuntimeError:
            with pytest.raises(SystemExit) as exited:
                consumer.fatal("batch failed; exiting without committing it")
    finally:
        logging.getLogger("meterstream").removeHandler(handler)
    assert exited.value.code == 1
    assert closed == ["store"]
    written = (tmp_path / "worker.log").read_text()
    assert "batch failed; exiting without committing it" in written and "the store refused the batch" in written
    # Nothing pending is committed later, even if the shutdown path asks.
    asyncio.run(consumer._commit(force=True))
    assert fake.commits == []
