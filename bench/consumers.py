"""Reference consumers: how fast can a bare client read the topics the worker reads?

Run in a child process (like the worker, and away from the benchmark's large
heap), from a new consumer group at the earliest offset, decoding nothing::

    python -m bench.consumers aiokafka  --bootstrap 127.0.0.1:19192 --topics a,b --messages 200000
    python -m bench.consumers confluent --bootstrap 127.0.0.1:19192 --topics a,b --messages 200000
    python -m bench.consumers faust     --bootstrap 127.0.0.1:19192 --topics a,b --messages 200000

``faust`` is a no-op Faust agent (raw bytes, each message acked as Faust acks it):
what reading the topics through a Faust stream costs before any work is done,
which is why the worker's rating path reads with ``getmany`` in batches instead.

Prints one JSON object. The rate is counted like the worker's: from the
first batch received to the last expected message, excluding the first batch
(``(messages - first_batch) / seconds``), so group join and the first fetch
are not part of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any


def _result(kind: str, total: int, first_batch: int, t0: float | None, t_end: float, batches: int) -> dict[str, Any]:
    seconds = (t_end - t0) if t0 is not None else 0.0
    counted = total - first_batch
    return {
        "client": kind,
        "messages": total,
        "first_batch": first_batch,
        "batches": batches,
        "seconds": round(seconds, 4),
        "rate": round(counted / seconds) if seconds > 0 else None,
    }


async def run_aiokafka(bootstrap: str, topics: list[str], expected: int, timeout: float, batch: int) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=f"bench-ref-aiokafka-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    total = first = batches = 0
    t0: float | None = None
    deadline = time.monotonic() + timeout
    try:
        while total < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"aiokafka read {total} of {expected} messages in {timeout:.0f} s")
            records = await consumer.getmany(timeout_ms=500, max_records=batch)
            n = sum(len(batch) for batch in records.values())
            if not n:
                continue
            if t0 is None:
                t0, first = time.monotonic(), n
            total += n
            batches += 1
        return _result("aiokafka", total, first, t0, time.monotonic(), batches)
    finally:
        await consumer.stop()


def run_confluent(bootstrap: str, topics: list[str], expected: int, timeout: float, batch: int) -> dict[str, Any]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-ref-confluent-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(topics)
    total = first = batches = 0
    t0: float | None = None
    deadline = time.monotonic() + timeout
    try:
        while total < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"confluent-kafka read {total} of {expected} messages in {timeout:.0f} s")
            messages = consumer.consume(num_messages=batch, timeout=0.1)  # a short wait: the last, partial batch must not idle
            n = sum(1 for m in messages if m.error() is None)
            if not n:
                continue
            if t0 is None:
                t0, first = time.monotonic(), n
            total += n
            batches += 1
        return _result("confluent-kafka", total, first, t0, time.monotonic(), batches)
    finally:
        consumer.close()


def run_faust(bootstrap: str, topics: list[str], expected: int, timeout: float, batch: int) -> dict[str, Any]:
    import faust

    datadir = tempfile.mkdtemp(prefix="bench-ref-faust-")  # Faust's app directory, removed at the end
    app = faust.App(
        f"bench-ref-faust-{uuid.uuid4().hex[:8]}",
        datadir=datadir,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=batch,
    )
    topic = app.topic(*topics, value_serializer="raw", key_serializer="raw")
    state: dict[str, Any] = {"total": 0, "first": 0, "t0": None, "t_end": None}
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)

    @app.agent(topic)
    async def count(stream: Any) -> None:
        async for _ in stream:
            if state["t0"] is None:
                state["t0"], state["first"] = time.monotonic(), 1
            state["total"] += 1
            if state["total"] == expected:
                state["t_end"] = time.monotonic()
                asyncio.ensure_future(worker.stop())

    @app.timer(interval=1.0)
    async def give_up() -> None:
        if state["t_end"] is None and time.monotonic() - started > timeout:
            asyncio.ensure_future(worker.stop())

    started = time.monotonic()
    try:
        worker.execute_from_commandline()
    except SystemExit:
        pass
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
    if state["t_end"] is None:
        raise TimeoutError(f"a Faust agent read {state['total']} of {expected} messages in {timeout:.0f} s")
    return _result("faust-agent", state["total"], state["first"], state["t0"], state["t_end"], state["total"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=["aiokafka", "confluent", "faust"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topics", required=True, help="comma-separated")
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--batch", type=int, default=1000,
                        help="records per getmany()/consume() call (default 1000, the worker's batch size)")
    args = parser.parse_args(argv)
    topics = args.topics.split(",")
    if args.client == "aiokafka":
        result = asyncio.run(run_aiokafka(args.bootstrap, topics, args.messages, args.timeout, args.batch))
    elif args.client == "faust":
        result = run_faust(args.bootstrap, topics, args.messages, args.timeout, args.batch)
    else:
        result = run_confluent(args.bootstrap, topics, args.messages, args.timeout, args.batch)
    print("\n" + json.dumps(result))  # on a line of its own: Faust's worker writes terminal codes to stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())
