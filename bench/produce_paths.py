"""The SDK's produce paths weighed (issue 16): ``produce()`` in a loop against ``produce_batch``, and delivery reports.

    .venv/bin/python -m bench.produce_paths            # ~1 min; the broker of the settings (127.0.0.1:9092)

- **partitions**: the same keys through ``produce()`` and ``Producer.produce_batch`` (no
  partition given) with the SDK's guarantees (``PRODUCER_GUARANTEES``: murmur2_random,
  idempotence, acks=all), to a 3-partition topic of its own (deleted afterwards): the
  partition each delivery report gives, message by message, the key and value each
  per-message callback receives, and the order of one key's messages by offset;
- **queue full**: what ``produce_batch`` does when the local queue fills part-way (no broker,
  ``queue.buffering.max.messages`` 100, a batch of 250): the count it returns and which
  message dicts get an ``_error``;
- **produce CPU**: thread CPU µs per message of ``record_many``'s produce phase, the loop of
  positional ``produce()`` calls as the SDK has it against ``produce_batch`` per topic (the
  message dicts built inside the timing, as ``record_many`` would have to), best of 15 runs
  over the same 20,000 messages, no broker (the messages are queued, then purged);
- **delivery reports**: thread CPU µs per message of ``flush()`` serving the reports of
  100,000 delivered messages, with a Python callback per message (the SDK's), with
  ``delivery.report.only.error`` (a callback only for failures), and with none.

Results are printed and written to ``bench/results/produce-paths-<timestamp>.json`` with the load
average. No figure here is asserted by a test.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.workload import generate
from meterstream.config import PRODUCER_GUARANTEES, get_settings
from meterstream.producers.client import _wire_many

RESULTS = Path(__file__).parent / "results"
#: The SDK's own producer settings (MeterClient), the guarantees last.
SDK_CONFIG = {"linger.ms": 5, "compression.type": "lz4", **PRODUCER_GUARANTEES}


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def partitions(bootstrap: str) -> dict[str, Any]:
    """produce() and produce_batch() of the same keys: the partitions, keys and per-key order in the reports."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"bench-produce-paths-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(30)
    keys = [f"cust-{i}".encode() for i in range(3_000)] + [b"acme"] * 100
    try:
        reports: dict[str, dict[bytes, tuple[bytes | None, int, int]]] = {"produce": {}, "produce_batch": {}}

        def on_delivery(into: dict[bytes, tuple[bytes | None, int, int]]) -> Callable[[Any, Any], None]:
            def report(err: Any, msg: Any) -> None:
                if err is not None:
                    raise RuntimeError(f"delivery failed: {err}")
                into[msg.value()] = (msg.key(), msg.partition(), msg.offset())

            return report

        one = Producer({"bootstrap.servers": bootstrap, **SDK_CONFIG})
        for i, key in enumerate(keys):
            one.produce(topic, b"p%d" % i, key, -1, on_delivery(reports["produce"]))
        batch = Producer({"bootstrap.servers": bootstrap, **SDK_CONFIG})
        messages = [{"key": key, "value": b"b%d" % i} for i, key in enumerate(keys)]
        queued = batch.produce_batch(topic, messages, on_delivery=on_delivery(reports["produce_batch"]))
        if one.flush(60) or batch.flush(60):
            raise RuntimeError("messages unconfirmed after 60 s")
        single, batched = reports["produce"], reports["produce_batch"]
        differ = sum(single[b"p%d" % i][1] != batched[b"b%d" % i][1] for i in range(len(keys)))
        wrong_key = sum(batched[b"b%d" % i][0] != key for i, key in enumerate(keys))
        acme = sorted(
            (offset, int(value[1:])) for value, (key, _, offset) in batched.items() if key == b"acme"
        )
        spread = [sum(p == n for _, p, _ in single.values()) for n in range(3)]
        return {"messages": len(keys), "queued_by_produce_batch": queued, "reports": [len(single), len(batched)],
                "partition_spread_produce": spread, "partitions_differing": differ,
                "callbacks_with_another_key": wrong_key,
                "one_key_in_batch_order_by_offset": [i for _, i in acme] == sorted(i for _, i in acme)}  # fmt: skip
    finally:
        admin.delete_topics([topic])[topic].result(30)


def queue_full() -> dict[str, Any]:
    """produce_batch into a local queue with room for 100 messages: what is queued, what is reported."""
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "queue.buffering.max.messages": 100,
                         "message.timeout.ms": 10, "log_level": 0, **PRODUCER_GUARANTEES})  # fmt: skip
    messages = [{"key": b"k%d" % (i % 7), "value": b"v%d" % i} for i in range(250)]
    raised = None
    try:
        queued = producer.produce_batch("t", messages, on_delivery=lambda err, msg: None)
    except BufferError as exc:  # the docstring says it may; 2.16 marks the messages instead
        queued, raised = -1, str(exc)
    failed = [i for i, m in enumerate(messages) if "_error" in m]
    producer.flush(10)
    return {"batch": len(messages), "room": 100, "returned": queued, "raised": raised,
            "messages_with__error": len(failed), "failed_are_the_tail": failed == list(range(queued, len(messages))),
            "error": str(messages[failed[0]]["_error"]) if failed else None}  # fmt: skip


def produce_cpu() -> dict[str, Any]:
    """Thread CPU µs/message: record_many's produce loop against produce_batch per topic (dicts built in the timing)."""
    specs = generate(20_000, 1_000, seed=1).messages
    items: list[Any] = [
        spec.fields if spec.kind == "usage" else {**spec.fields, "type": "outcome"} for spec in specs
    ]
    batches = [_wire_many(items[i : i + 1_000]) for i in range(0, len(items), 1_000)]
    n = sum(map(len, batches))
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 600_000, "log_level": 0,
                         "queue.buffering.max.messages": 1_000_000, **SDK_CONFIG})  # fmt: skip
    usage, outcomes = "usage.events", "outcome.events"
    sent = itertools.count()
    count = sent.__next__

    def callback(err: Any, msg: Any) -> None:
        pass

    def loop() -> None:  # as MeterClient.record_many
        produce = producer.produce
        for messages in batches:
            for outcome, key, value in messages:
                try:
                    produce(outcomes if outcome else usage, value, key, -1, callback)
                except BufferError:
                    raise
                count()

    def batched() -> None:  # one produce_batch per topic per batch, the sent counter advanced in C
        produce_batch = producer.produce_batch
        for messages in batches:
            for topic, is_outcome in ((usage, False), (outcomes, True)):
                group = [
                    {"key": key, "value": value} for outcome, key, value in messages if outcome is is_outcome
                ]
                if group:
                    if produce_batch(topic, group, on_delivery=callback) != len(group):
                        raise BufferError("queue full")
                    deque(itertools.islice(sent, len(group)), maxlen=0)

    def best(run: Callable[[], None], reps: int = 15) -> float:
        fastest = float("inf")
        for _ in range(reps):
            gc.collect()
            gc.disable()
            started = time.thread_time()
            run()
            fastest = min(fastest, time.thread_time() - started)
            gc.enable()
            producer.purge()
            producer.poll(0)
        return round(fastest / n * 1e6, 3)

    rounds = [(best(loop), best(batched)) for _ in range(3)]
    return {
        "messages": n,
        "produce_loop_us": [a for a, _ in rounds],
        "produce_batch_us": [b for _, b in rounds],
    }


class _Counting:
    """A delivery callback as MeterClient's: a bound method counting successes with an itertools.count."""

    def __init__(self) -> None:
        self._delivered = itertools.count()
        self._count_delivered = self._delivered.__next__

    def on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self._count_delivered()
            return
        raise RuntimeError(f"delivery failed: {err}")


def delivery_reports(bootstrap: str, n: int = 100_000) -> dict[str, Any]:
    """Thread CPU µs/message of producing n messages and of flush() serving their reports, per way of reporting."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"bench-produce-paths-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(30)
    payloads = [(b"cust-%d" % (i % 1_000), b"x" * 390) for i in range(n)]  # the SDK's mean value size
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        for _ in range(3):
            for kind in ("python_callback", "only_error", "none"):
                extra = {"delivery.report.only.error": True} if kind == "only_error" else {}
                producer = Producer({"bootstrap.servers": bootstrap, "queue.buffering.max.messages": 1_000_000,
                                     **extra, **SDK_CONFIG})  # fmt: skip
                callback = None if kind == "none" else _Counting().on_delivery
                producer.produce(topic, b"warm-up", b"w", -1, callback)
                producer.flush(30)
                gc.collect()
                gc.disable()
                started = time.thread_time()
                for key, value in payloads:
                    producer.produce(topic, value, key, -1, callback)
                produced = time.thread_time()
                if producer.flush(120):
                    raise RuntimeError("messages unconfirmed after 120 s")
                served = time.thread_time()
                gc.enable()
                results.setdefault(kind, []).append(
                    (round((produced - started) / n * 1e6, 3), round((served - produced) / n * 1e6, 3))
                )
    finally:
        admin.delete_topics([topic])[topic].result(30)
    return {"messages": n, **{kind: {"produce_us": [p for p, _ in runs], "flush_us": [f for _, f in runs]}
                              for kind, runs in results.items()}}  # fmt: skip


def main() -> None:
    bootstrap = get_settings().kafka.bootstrap_servers
    started = loadavg()
    out = {"bootstrap": bootstrap, "cores": os.cpu_count(), "load_average_at_start": started,
           "partitions": partitions(bootstrap), "queue_full": queue_full(), "produce_cpu": produce_cpu(),
           "delivery_reports": delivery_reports(bootstrap), "load_average_at_end": loadavg()}  # fmt: skip
    print(json.dumps(out, indent=1))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"produce-paths-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
