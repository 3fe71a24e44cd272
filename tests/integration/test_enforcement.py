"""Budgets that hold: enforcement state reaches the SDK guard, and concurrency cannot overshoot.

Real broker, real worker, real store. gpt-4o input at the default price book's
0.5 credits per 1K tokens makes a 2,000-token call exactly 1 credit.
"""

from __future__ import annotations

import json
import threading
import time
from decimal import Decimal

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from meterstream.pricing.plans import load_catalog
from meterstream.producers import MeterClient
from meterstream.producers.guard import BudgetGuard, Verdict
from meterstream.schemas.records import Decision
from meterstream.storage.queries import run_saved_query

pytestmark = pytest.mark.integration

BUDGETS = """
customers:
  capped: {monthly_credits: "100", thresholds: [50, 100], action: block}
  thrifty: {monthly_credits: "10", action: downgrade, downgrade_to: gpt-4o-mini}
  agentic:
    monthly_credits: "100000"
    run_cap: {max_steps: 5, action: block}
"""


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def enforced(pipeline_factory):
    pipeline = pipeline_factory(budgets=BUDGETS)
    guard = BudgetGuard(pipeline.kafka, catalog=load_catalog()).start(ready_timeout=30)
    _wait(lambda: "capped" in guard.view.states, 30, "the initial state of 'capped'")
    yield pipeline, guard
    guard.stop()


def test_fifty_concurrent_callers_cannot_overshoot_a_hard_cap(enforced):
    pipeline, guard = enforced
    assert guard.view.states["capped"].remaining_credits == Decimal(100)
    allowed: list[int] = []
    blocked: list[str] = []
    lock = threading.Lock()
    meter = MeterClient(pipeline.kafka)
    deadline = time.monotonic() + 60

    def caller(n: int) -> None:
        while time.monotonic() < deadline:
            decision = guard.check("capped", "gpt-4o", input_tokens=2000)
            if decision.blocked:
                with lock:
                    blocked.append(decision.reason)
                return
            event = meter.record_llm_call("capped", decision.model, input_tokens=2000, output_tokens=0)
            guard.settle(decision, event)
            with lock:
                allowed.append(n)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    meter.close()
    assert meter.failed == 0
    # Exact estimates: the documented bound on overshoot within one process is zero.
    assert len(allowed) == 100
    assert len(blocked) == 50 and all("monthly budget" in reason for reason in blocked)

    pipeline.wait_processed(100)
    stored = run_saved_query(pipeline.clickhouse, "month_to_date", period=time.strftime("%Y-%m"), customer="capped")
    assert stored.dicts()[0]["credits"] == Decimal(100)

    # The worker's block decision reaches the guard through the compacted topic.
    _wait(lambda: guard.view.states["capped"].decision is Decision.BLOCK, 30, "the block decision")
    decision = guard.check("capped", "gpt-4o-mini", input_tokens=10)
    assert decision.verdict is Verdict.BLOCK
    assert "monthly budget of 100 credits reached" in decision.reason
    assert guard.in_flight("capped") == 0  # every settled call has been counted by the worker


def test_downgrade_at_the_cap_moves_callers_to_the_cheaper_model(enforced):
    pipeline, guard = enforced
    with MeterClient(pipeline.kafka) as meter:
        for _ in range(11):  # 11 credits against a cap of 10
            meter.record_llm_call("thrifty", "gpt-4o", input_tokens=2000, output_tokens=0)
    pipeline.wait_processed(11)
    _wait(lambda: guard.view.states.get("thrifty") is not None
          and guard.view.states["thrifty"].decision is Decision.DOWNGRADE, 30, "the downgrade decision")  # fmt: skip
    decision = guard.check("thrifty", "gpt-4o", input_tokens=2000)
    assert decision.verdict is Verdict.DOWNGRADE and decision.model == "gpt-4o-mini"
    guard.release(decision)


def test_a_runaway_run_is_alerted_once_and_blocked(enforced):
    pipeline, guard = enforced
    with MeterClient(pipeline.kafka) as meter:
        for step in range(8):  # the cap is 5 steps per run
            meter.record_llm_call("agentic", "gpt-4o-mini", input_tokens=100, output_tokens=10, run_id="loop-1")
        meter.record_llm_call("agentic", "gpt-4o-mini", input_tokens=100, output_tokens=10, run_id="short-run")
    pipeline.wait_processed(9)
    alerts = [json.loads(m.value()) for m in pipeline.read_topic(pipeline.topics.budget_alerts.name, 1)]
    run_alerts = [a for a in alerts if a["kind"] == "run_cap"]
    # gpt-4o-mini: 100 x 0.03/1K + 10 x 0.12/1K = 0.0042 credits a step; the alert comes at step 5 of 5.
    assert [(a["run_id"], Decimal(a["spent_credits"]), a["action"]) for a in run_alerts] == [
        ("loop-1", Decimal("0.021"), "block")
    ]
    _wait(lambda: "agentic|loop-1" in guard.view.states, 30, "the run's state")
    assert guard.check("agentic", "gpt-4o-mini", input_tokens=10, run_id="loop-1").verdict is Verdict.BLOCK
    allowed = guard.check("agentic", "gpt-4o-mini", input_tokens=10, run_id="short-run")
    assert allowed.verdict is Verdict.ALLOW
    guard.release(allowed)


def test_the_enforcement_topic_is_compacted(enforced):
    pipeline, _ = enforced
    admin = AdminClient(pipeline.kafka.confluent_config())
    resource = ConfigResource(ConfigResource.Type.TOPIC, pipeline.topics.enforcement.name)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["cleanup.policy"].value == "compact"
