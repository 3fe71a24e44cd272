"""Scale-out for real: several workers in one consumer group, writing to the one ClickHouse server.

Two workers start on a backlog, a third joins mid-stream, and one of the first two is
killed (SIGKILL) while events still flow: its partitions move to the others, which replay
from the last committed offsets. Totals must be exact to the digit (the store is one, so an
event two workers both wrote is one row under FINAL) and every threshold each customer
reached must be on the alert topic exactly once. Every wait is bounded.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import yaml

from meterstream.budgets import BudgetBook, thresholds_to_alert
from meterstream.pricing.plans import load_catalog
from meterstream.producers import MeterClient
from meterstream.schemas.events import UsageEvent
from meterstream.storage.queries import run_saved_query
from meterstream.stream_processors.runner import WorkerProcess
from tests.servers import free_port

pytestmark = pytest.mark.system

NOW = datetime.now(timezone.utc)
PERIOD = NOW.strftime("%Y-%m")
CUSTOMERS = [f"scale-{i}" for i in range(18)]
BUDGETS = "customers:\n" + "".join(
    f'  {c}: {{monthly_credits: "{300 + 100 * i}", thresholds: [25, 50, 75, 100]}}\n' for i, c in enumerate(CUSTOMERS)
)


def _events(start: int, count: int) -> list[UsageEvent]:
    return [
        UsageEvent(
            event_id=f"s{i}", customer_id=CUSTOMERS[(i * 7) % len(CUSTOMERS)], occurred_at=NOW - timedelta(seconds=i % 3000),
            model=("gpt-4o", "gpt-4o-mini", "claude-haiku-4-5")[i % 3], input_tokens=500 + i % 900,
            output_tokens=50 + i % 300,
        )  # fmt: skip
        for i in range(start, start + count)
    ]


def _stored_rows(pipeline) -> int:
    return run_saved_query(pipeline.clickhouse, "store_totals", period=PERIOD).dicts()[0]["rated_rows"]


def _wait(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _messages(worker: WorkerProcess) -> int:
    try:
        return worker.stats()["messages"]
    except Exception:
        return 0


def test_three_workers_one_store_one_killed_one_joining_exact_totals_alerts_once(pipeline_factory, tmp_path):
    pipeline = pipeline_factory(budgets=BUDGETS, start=False)
    pipeline.env["METERSTREAM_KAFKA__PARTITIONS"] = "6"
    pipeline.kafka = pipeline.kafka.model_copy(update={"partitions": 6})
    from meterstream.topics import ensure_topics

    # The fixture made 3-partition topics; this test's prefix gets its own 6-partition ones.
    pipeline.kafka = pipeline.kafka.model_copy(update={"topic_prefix": pipeline.kafka.topic_prefix + "six."})
    pipeline.env["METERSTREAM_KAFKA__TOPIC_PREFIX"] = pipeline.kafka.topic_prefix
    pipeline.topics = ensure_topics(pipeline.kafka)
    pipeline.env["METERSTREAM_WORKER__BATCH_SIZE"] = "300"

    def worker(name: str) -> WorkerProcess:
        port = free_port()
        env = {**pipeline.env, "METERSTREAM_WORKER__WEB_PORT": str(port),
               "METERSTREAM_WORKER__DATA_DIR": str(tmp_path / name)}  # fmt: skip
        return WorkerProcess(env, port, tmp_path / f"{name}.log")

    first = _events(0, 8_000)
    second = _events(8_000, 8_000)
    with MeterClient(pipeline.kafka) as meter:
        for event in first:
            meter.record(event)
        for event in first[:300]:  # client resends: counted once
            meter.record(event)
    assert meter.failed == 0

    a, b, c = worker("a"), worker("b"), worker("c")
    workers = [a, b, c]
    try:
        a.start(ready_timeout=120)
        b.start(ready_timeout=120)
        _wait(lambda: _messages(a) + _messages(b) >= 2_000, "two workers to make progress")
        c.start(ready_timeout=120)  # joins mid-stream: the group rebalances over three workers
        with MeterClient(pipeline.kafka) as meter:
            for event in second:
                meter.record(event)
        assert meter.failed == 0
        # Each of the three has done a share before the kill: the joining worker, and the one that
        # joined a while after the first (its partitions were read up by the first meanwhile, so its
        # share comes from the second half; a worker taking partitions first writes again what the
        # previous owner left uncommitted, storage/batches.py, which can make it start last).
        _wait(lambda: _messages(c) > 0 and _messages(b) > 0, "the joining worker and the second one to take a share")
        handled_before_kill = {"a": _messages(a), "b": _messages(b), "c": _messages(c)}
        b.kill()  # SIGKILL while events still flow: a and c take its partitions
        events = first + second
        _wait(lambda: _stored_rows(pipeline) >= len(events), "every event in the store")
        with MeterClient(pipeline.kafka) as meter:  # the resends came before; a marker closes the stream
            meter.record_llm_call("scale-marker", "gpt-4o-mini", input_tokens=1, output_tokens=1, event_id="marker")
        _wait(lambda: _stored_rows(pipeline) >= len(events) + 1, "the marker")

        assert all(handled_before_kill.values()), handled_before_kill  # each of the three did a share
        catalog = load_catalog()
        expected: dict[str, Decimal] = {}
        for event in events:
            expected[event.customer_id] = expected.get(event.customer_id, Decimal(0)) + catalog.rate(event).credits
        stored = {r["customer_id"]: r for r in run_saved_query(pipeline.clickhouse, "month_to_date", period=PERIOD,
                                                               customer="").dicts()}  # fmt: skip
        for customer, credits in expected.items():
            assert stored[customer]["usage_credits"] + stored[customer]["outcome_credits"] == credits, customer
            assert stored[customer]["events"] == sum(1 for e in events if e.customer_id == customer)
        assert _stored_rows(pipeline) == len(events) + 1

        budgets = BudgetBook.model_validate(yaml.safe_load(BUDGETS))
        expected_alerts = Counter(
            (customer, t)
            for customer, credits in expected.items()
            for t in thresholds_to_alert(credits, budgets.for_customer(customer), frozenset())
        )
        assert len(expected_alerts) > len(CUSTOMERS)
        messages = pipeline.read_topic(pipeline.topics.budget_alerts.name, sum(expected_alerts.values()))
        published = [json.loads(m.value()) for m in messages]
        alerts = Counter((a["customer_id"], a["threshold_percent"]) for a in published)
        print(f"\nscale-out: {len(events)} events + 300 resends, 2 then 3 workers (b SIGKILLed after "
              f"{handled_before_kill}); credits {sum(expected.values())}; {len(expected_alerts)} thresholds, "
              f"{len(published)} alerts on the topic")
        # Once each: the outbox pass runs at assignment for the assigned partitions' customers only (a
        # start-up pass in the joining worker repeated an alert another worker was about to publish).
        assert alerts == expected_alerts
    finally:
        for w in workers:
            w.stop()
