"""The worker's batch consumer: aiokafka ``getmany`` inside the Faust app, offsets committed after the store.

Why not a Faust agent. Faust delivers messages one at a time, through a
thread hand-off and a ``wait_first`` per message, before ``take_events``
regroups them: measured on a quiet 2-core machine on 2026-11-27, a Faust agent
that does nothing with its messages read ~3,200 events/s with
``take_events(1000)`` and ~4,100/s with ``stream.events()``, where aiokafka's
``getmany`` — the client Faust itself uses — read ~200,000/s on the same topic
(BENCHMARKS.md; ``bench.run`` measures the no-op agent in every worker phase).
The worker does all its work per batch anyway, so it asks aiokafka for
batches directly and keeps Faust for what Faust does well here: the app's
lifecycle and signals, the side topics (declared with ``app.topic``, sent
through Faust's producer), timers and the web views. One client family: this
consumer is aiokafka, the client under Faust, with the credentials Faust's own
clients get (meterstream/kafka_clients.py).

Guarantees, as with the agent before it (at least once; the store makes
replays harmless):

- a batch's offsets are committed only after its rows are in the store and
  its side-topic messages are confirmed by the broker; commits are batched
  every ``commit_interval`` seconds, and always made before partitions are
  revoked and before a clean stop;
- two stages overlap: batches are rated (and their decisions and alerts
  published) while the batches before them are written (the store works
  outside the GIL, so the two use both cores); writes start in batch order and
  each waits for the previous one; at most ``writes_in_hand`` writes wait, so a
  slow store holds the reading back instead of filling memory;
- a rebalance waits for the batches in hand (they are finished and committed
  first); records of partitions no longer assigned are not processed;
- on shutdown the batches in hand are finished (within ``shutdown_drain``); if
  they cannot finish, the process exits without committing them, so they are
  replayed.

Partitions are assigned with aiokafka's default range assignor: partition *p*
of the usage topic and partition *p* of the outcome topic go to the same
worker, so one customer's usage and outcomes (keyed by customer id, murmur2,
same partition count) are always rated by one worker.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any, NoReturn

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from mode import Service

from meterstream.config import KafkaSettings
from meterstream.kafka_clients import aiokafka_client_args
from meterstream.stream_processors.processing import InboundMessage

log = logging.getLogger(__name__)

_inbound = functools.partial(tuple.__new__, InboundMessage)
_value, _key, _offset, _timestamp = (attrgetter(name) for name in ("value", "key", "offset", "timestamp"))

#: Stage one of a batch: rate the messages (in offset order per partition; keys for dead
#: letters) and return stage two, the write that makes the batch durable.
#: The write returns the messages it could not make durable, ``{(topic, partition): offset}``
#: (a dead letter the broker refuses): those partitions are held at that offset.
BatchStager = Callable[
    [Sequence[InboundMessage], Sequence[bytes | None]],
    Awaitable[Callable[[], Awaitable[dict[tuple[str, int], int] | None]]],
]


def describe_ranges(last: dict[TopicPartition, int], first: dict[TopicPartition, int]) -> str:
    """``usage.events:3@100-599, ...``: where a batch's messages are (for logs an operator acts on)."""
    return ", ".join(f"{tp.topic}:{tp.partition}@{first[tp]}-{last[tp]}" for tp in sorted(last))


SKIP_HINT = (
    "if it fails again at the same place, stop the worker and move the message to the dead-letter topic: "
    "meterstream dlq skip TOPIC:PARTITION:OFFSET --reason '...'"
)


class BatchConsumer(Service):
    """Reads ``topics`` in batches for one consumer group and hands each batch to ``handle``."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        topics: Sequence[str],
        kinds: dict[str, str],
        group_id: str,
        stage: BatchStager,
        on_revoked: Callable[[], None],
        batch_size: int,
        batch_timeout: float,
        commit_interval: float,
        session_timeout: float,
        shutdown_drain: float,
        writes_in_hand: int = 2,
        on_fatal: Callable[[], None] = lambda: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        #: Run on the fatal path before the process exits (the app closes the store with it).
        self.on_fatal = on_fatal
        self._fatal = False
        self.kafka = kafka
        self.topics = list(topics)
        self.kinds = kinds
        self.group_id = group_id
        self.stage = stage
        self.on_revoked = on_revoked
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.commit_interval = commit_interval
        self.session_timeout = session_timeout
        self.shutdown_drain = shutdown_drain
        self.consumer: AIOKafkaConsumer | None = None
        self.assigned: set[TopicPartition] = set()
        #: The group's committed offset of each partition, read when it was assigned (None:
        #: nothing committed): the store writes again what it holds past them (storage/batches.py).
        self.committed_at_assignment: dict[tuple[str, int], int | None] = {}
        self.rebalancing = True
        self._pending: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()
        self._in_flight: asyncio.Future[None] | None = None
        #: The newest batch's write (it waits for the writes before it), running while the next batch is rated.
        self._write: asyncio.Future[None] | None = None
        #: Every write in hand, oldest first; at most ``writes_in_hand`` of them.
        self._writes: collections.deque[tuple[asyncio.Future[None], str]] = collections.deque()
        self.writes_in_hand = writes_in_hand
        self._stopping = False
        self._commit_lock = asyncio.Lock()
        #: Partitions held at an offset whose message could not be made durable (see hold).
        self.held: dict[TopicPartition, int] = {}
        #: Where the batches in hand are, for the log when one fails.
        self.in_hand = ""
        #: Broker reachability, for /stats/ and the log (see _watch_broker).
        self.broker_down_since: float | None = None
        self.broker_outages = 0
        self.last_outage_seconds: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            client_id=f"{self.group_id}-worker",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.batch_size,
            session_timeout_ms=int(self.session_timeout * 1000),
            heartbeat_interval_ms=int(self.session_timeout * 1000 / 4),
            # A batch (store write included) must finish well within this, or the member is dropped.
            max_poll_interval_ms=300_000,
            # Between reconnect and metadata retries while the broker is away (default 100 ms).
            retry_backoff_ms=500,
            **aiokafka_client_args(self.kafka),  # servers and credentials, as Faust's own clients get them
        )
        await self.consumer.start()
        self.consumer.subscribe(self.topics, listener=_Listener(self))

    async def on_stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group."""
        self._stopping = True
        try:
            await asyncio.wait_for(self._settle(), timeout=self.shutdown_drain)
        except Exception:  # a timeout, or a batch that failed: its offsets must not be committed
            self.fatal("in-flight batch not finished at shutdown; exiting without committing it", level=logging.ERROR)
        if self.consumer is not None:
            try:
                await self._commit(force=True)
            except KafkaError as exc:  # the batch is stored: a replay is recognised
                log.warning("final commit failed (%s); the last batches will be replayed and recognised", exc)
            await self.consumer.stop()

    @Service.task
    async def _run(self) -> None:
        assert self.consumer is not None
        while not self._stopping and not self.should_stop:
            try:
                records = await self.consumer.getmany(
                    timeout_ms=int(self.batch_timeout * 1000), max_records=self.batch_size
                )
            except asyncio.CancelledError:
                return  # stopping
            except (IllegalStateError, ConsumerStoppedError):
                if self._stopping or self.should_stop:
                    return
                # Not stopping, yet the consumer cannot read: exit rather than stay up reading nothing.
                self.fatal("the consumer stopped reading; exiting")
            if self._stopping:
                return  # fetched after the stop began: not processed, not committed
            try:
                if records:
                    # Shielded: a cancellation (shutdown) must not cut a batch in half; on_stop waits for it.
                    self._in_flight = asyncio.ensure_future(self._process(records))
                    await asyncio.shield(self._in_flight)
                elif self._write is not None and self._write.done():
                    await self._finish_write()
                elif self._pending:
                    await self._commit(force=False)
            except asyncio.CancelledError:
                return  # on_stop finishes (or abandons) the batches in hand
            except Exception:
                # Not a store outage (those are retried inside the batch): a defect or a broker
                # that refused the side-topic messages. Nothing of this batch is committed;
                # exit so that a supervisor restarts the worker and the batch is replayed.
                self.fatal(f"batch failed (messages in hand: {self.in_hand}); exiting without committing it; {SKIP_HINT}")

    @Service.task
    async def _watch_broker(self) -> None:
        """Once a second: can the consumer reach a broker? Logs an outage once, and its end."""
        while not self.should_stop and not self._stopping:
            await self.sleep(1.0)
            if self.consumer is None or self._stopping:
                continue
            up = await self._broker_reachable()
            now = time.time()
            if not up and self.broker_down_since is None:
                self.broker_down_since = now
                self.broker_outages += 1
                log.warning("broker unreachable (%s); reconnecting with back-off, offsets held", self.kafka.bootstrap_servers)
            elif up and self.broker_down_since is not None:
                self.last_outage_seconds = round(now - self.broker_down_since, 1)
                self.broker_down_since = None
                log.warning("broker is back after %.1f s", self.last_outage_seconds)

    async def _broker_reachable(self) -> bool:
        assert self.consumer is not None
        client = self.consumer._client  # aiokafka's client: the connections the consumer itself uses
        nodes = [broker.nodeId for broker in client.cluster.brokers()]
        for node in nodes:
            try:
                if await asyncio.wait_for(client.ready(node), timeout=5.0):
                    return True
            except (TimeoutError, KafkaError, OSError):
                continue
        return not nodes and self.broker_down_since is None  # no metadata yet: nothing known

    def broker_stats(self) -> dict[str, Any]:
        since = self.broker_down_since
        return {
            "reachable": since is None,
            "down_seconds": round(time.time() - since, 1) if since is not None else 0.0,
            "outages": self.broker_outages,
            "last_outage_seconds": self.last_outage_seconds,
        }

    async def _settle(self) -> None:
        """Wait until no batch is being rated or written; raises if one failed.

        Loops because a batch being rated starts its write before it finishes.
        """
        while True:
            busy = [f for f in (self._in_flight, self._write) if f is not None and not f.done()]
            if not busy:
                break
            await asyncio.wait(busy)  # a cancelled waiter leaves the batches running
        in_flight = self._in_flight
        if in_flight is not None and not in_flight.cancelled() and in_flight.exception() is not None:
            raise in_flight.exception()  # type: ignore[misc]
        await self._finish_write()

    async def _finish_write(self) -> None:
        """Wait for the previous batch's write (its offsets become committable when it is done)."""
        write = self._write
        if write is None:
            return
        # Shielded: whoever waits may be cancelled (a stop during a rebalance); the write goes on.
        await asyncio.shield(write)
        if self._write is write:
            self._write = None  # the last write waits for all the others: none is left
            self._writes.clear()

    async def _durable(
        self,
        write: Callable[[], Awaitable[dict[tuple[str, int], int] | None]],
        last: dict[TopicPartition, int],
        where: str,
    ) -> None:
        try:
            held = await write() or {}
        except Exception:
            log.error("write of the batch at %s failed", where)
            raise
        for tp, offset in last.items():
            if tp in self.held:
                continue  # held earlier: nothing past the held message is committed
            stop = held.get((tp.topic, tp.partition))
            if stop is not None:
                self._pending[tp] = stop  # everything before the message is durable
                self.hold(tp, stop)
                continue
            self._pending[tp] = offset + 1
        await self._commit(force=False)

    def hold(self, tp: TopicPartition, offset: int) -> None:
        """Stop reading ``tp``: the message at ``offset`` cannot be made durable. The others go on.

        The offset stays uncommitted, so a restart reads the message again; an operator
        moves it away with ``meterstream dlq skip`` (the worker stopped).
        """
        self.held[tp] = offset
        if self.consumer is not None and tp in self.consumer.assignment():
            self.consumer.pause(tp)
        log.critical(
            "partition %s:%d held at offset %d: that message cannot be made durable; the other partitions "
            "go on. Stop the worker and run: meterstream dlq skip %s:%d:%d --reason '...'",
            tp.topic, tp.partition, offset, tp.topic, tp.partition, offset,
        )  # fmt: skip

    async def _process(self, records: dict[TopicPartition, list[Any]]) -> None:
        assert self.consumer is not None
        owned = self.consumer.assignment()
        messages: list[InboundMessage] = []
        keys: list[bytes | None] = []
        last: dict[TopicPartition, int] = {}
        first: dict[TopicPartition, int] = {}
        for tp, batch in records.items():
            if tp not in owned or not batch or tp in self.held:
                continue  # revoked since the fetch (its new owner reads it), or held
            # One message per record, made in C (a NamedTuple's constructor is a Python call per record).
            n = len(batch)
            messages.extend(map(_inbound, zip(repeat(self.kinds[tp.topic], n), map(_value, batch), repeat(tp.topic, n),
                                              repeat(tp.partition, n), map(_offset, batch), map(_timestamp, batch), strict=True)))  # fmt: skip
            keys.extend(map(_key, batch))
            last[tp] = batch[-1].offset
            first[tp] = batch[0].offset
        if not messages:
            return
        if self._write is not None and self._write.done():
            await self._finish_write()  # surfaces a failed write before anything more is rated
        where = describe_ranges(last, first)
        self.in_hand = "; ".join([*(w for f, w in self._writes if not f.done()), where])
        # Two stages: this batch is rated (and its decisions published) while the batches before
        # it are still being written; its write starts when the previous write is done, so
        # writes, and offsets, stay in order. At most ``writes_in_hand`` writes wait: the rating
        # stage keeps up with the topic (decisions stay fresh) while a slow write catches up.
        write = await self.stage(messages, keys)
        self._write = asyncio.ensure_future(self._durable_after(self._write, write, last, where))
        self._writes.append((self._write, where))
        while len(self._writes) > self.writes_in_hand:
            oldest, _ = self._writes.popleft()
            await asyncio.shield(oldest)  # raises if it failed: nothing after it is committed
        if self._write.done():
            await self._finish_write()

    async def _durable_after(
        self,
        previous: asyncio.Future[None] | None,
        write: Callable[[], Awaitable[dict[tuple[str, int], int] | None]],
        last: dict[TopicPartition, int],
        where: str,
    ) -> None:
        """This batch's write, once the previous one is durable (if that failed, this one fails too)."""
        if previous is not None:
            await asyncio.shield(previous)
        await self._durable(write, last, where)

    def fatal(self, message: str, *, level: int = logging.CRITICAL) -> NoReturn:
        """End the process now and commit nothing: the next worker replays the batches in hand.

        Faust's graceful stop would run :meth:`on_stop`, which commits, so this path leaves by
        ``os._exit``; before that it does what the skipped shutdown would have done and a
        replay needs: closes the store's connections (``on_fatal``) and flushes every log
        handler, so the reason is on disk. Called from an ``except`` block, it logs the error.
        """
        self._fatal = True
        self._pending = {}
        log.log(level, message, exc_info=True)
        try:
            self.on_fatal()
        except Exception:  # the exit must happen whatever the store says
            log.warning("closing the store on the way out failed", exc_info=True)
        _flush_logs()
        os._exit(1)

    async def _commit(self, *, force: bool) -> None:
        # One commit at a time, so that an older offset can never land after a newer one.
        async with self._commit_lock:
            await self._commit_locked(force=force)

    async def _commit_locked(self, *, force: bool) -> None:
        if self._fatal or not self._pending or self.consumer is None:
            return
        if not force and time.monotonic() - self._last_commit < self.commit_interval:
            return
        # The metadata is the commit time (ms): `reconcile` tells a stuck group from a slow one by it.
        stamp = str(int(time.time() * 1000))
        offsets = {tp: OffsetAndMetadata(offset, stamp) for tp, offset in self._pending.items()}
        self._pending = {}
        self._last_commit = time.monotonic()
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group moved on (a rebalance): the new owner replays from the last commit and
            # the store recognises what this worker already wrote.
            log.warning("commit of %d partitions failed (%s); they will be replayed and recognised", len(offsets), exc)

    # -- rebalances ------------------------------------------------------------------------------

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        self.rebalancing = True
        try:
            await self._settle()
        except Exception:
            self.fatal("batch failed during a rebalance; exiting without committing it")
        await self._commit(force=True)
        # Nothing is being rated or written now, and getmany waits for the new assignment: the
        # moment to drop what the state cached (another worker may write for these partitions).
        self.on_revoked()
        for tp in revoked:
            self.held.pop(tp, None)

    def assigned_now(self, assigned: set[TopicPartition]) -> None:
        self.assigned = set(assigned)
        self.rebalancing = False
        log.info("assigned %s", ", ".join(sorted(f"{tp.topic}:{tp.partition}" for tp in self.assigned)) or "nothing")


def _flush_logs() -> None:
    """Flush every handler of every logger (``os._exit`` skips logging's own flush at exit)."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers}:
        try:
            handler.flush()
        except Exception:  # a broken handler must not keep the process alive
            pass


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: BatchConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.owner.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        committed: dict[tuple[str, int], int | None] = {}
        if self.owner.consumer is not None:
            for tp in assigned:
                try:
                    committed[(tp.topic, tp.partition)] = await self.owner.consumer.committed(tp)
                except Exception as exc:  # the coordinator away: that partition is not checked
                    log.warning("committed offset of %s:%d unknown (%s): no recovery of its batches", tp.topic,
                                tp.partition, exc)  # fmt: skip
        self.owner.committed_at_assignment = committed
        self.owner.assigned_now(set(assigned))
