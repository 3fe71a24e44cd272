"""Budgets that hold: enforcement state reaches the SDK guard, and concurrency cannot overshoot.

Real broker, real worker, real store. gpt-4o input at the default price book's
0.5 credits per 1K tokens makes a 2,000-token call exactly 1 credit.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from meterstream.pricing.plans import load_catalog
from meterstream.producers import BudgetGuard, Decision, MeterClient, Reason
from meterstream.storage.queries import run_saved_query
from meterstream.topics import ensure_topics

pytestmark = pytest.mark.system

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
    guard = BudgetGuard(pipeline.kafka, catalog=load_catalog(), use_configured_ledger=False).start(ready_timeout=30)
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
            decision = guard.check("capped", "gpt-4o", input_tokens=2000, output_tokens=0)
            if decision.blocked:
                with lock:
                    blocked.append(decision.code)
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
    assert len(blocked) == 50 and set(blocked) <= {Reason.WOULD_EXCEED_BUDGET, Reason.BUDGET_EXHAUSTED}

    pipeline.wait_processed(100)
    stored = run_saved_query(pipeline.clickhouse, "month_to_date", period=time.strftime("%Y-%m"), customer="capped")
    assert stored.dicts()[0]["usage_credits"] == Decimal(100)

    # The worker's block decision reaches the guard through the compacted topic.
    _wait(lambda: guard.view.states["capped"].decision is Decision.BLOCK, 30, "the block decision")
    decision = guard.check("capped", "gpt-4o-mini", input_tokens=10, output_tokens=10)
    assert (decision.decision, decision.code) == (Decision.BLOCK, Reason.BUDGET_EXHAUSTED)
    assert "monthly budget of 100 budget credits (usage + outcome credits) reached" in decision.reason
    assert guard.catalog_matches is True and guard.view_age() is not None
    assert guard.in_flight("capped") == 0  # every settled call has been counted by the worker


def test_downgrade_at_the_cap_moves_callers_to_the_cheaper_model(enforced):
    pipeline, guard = enforced
    with MeterClient(pipeline.kafka) as meter:
        for _ in range(11):  # 11 credits against a cap of 10
            meter.record_llm_call("thrifty", "gpt-4o", input_tokens=2000, output_tokens=0)
    pipeline.wait_processed(11)
    _wait(lambda: guard.view.states.get("thrifty") is not None
          and guard.view.states["thrifty"].decision is Decision.DOWNGRADE, 30, "the downgrade decision")  # fmt: skip
    decision = guard.check("thrifty", "gpt-4o", input_tokens=2000, output_tokens=0)
    assert decision.decision is Decision.DOWNGRADE and decision.model == "gpt-4o-mini"
    guard.release(decision)


def test_a_runaway_run_is_alerted_once_and_blocked(enforced):
    pipeline, guard = enforced
    with MeterClient(pipeline.kafka) as meter:
        for _ in range(8):  # the cap is 5 steps per run
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
    blocked = guard.check("agentic", "gpt-4o-mini", input_tokens=10, output_tokens=10, run_id="loop-1")
    assert (blocked.decision, blocked.code) == (Decision.BLOCK, Reason.RUN_CAP_REACHED)
    allowed = guard.check("agentic", "gpt-4o-mini", input_tokens=10, output_tokens=10, run_id="short-run")
    assert allowed.decision is Decision.OK
    guard.release(allowed)


def test_the_enforcement_topic_is_compacted(enforced):
    pipeline, _ = enforced
    admin = AdminClient(pipeline.kafka.confluent_config())
    resource = ConfigResource(ConfigResource.Type.TOPIC, pipeline.topics.enforcement.name)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["cleanup.policy"].value == "compact"


def test_a_guard_started_before_the_topic_exists_finds_it(kafka_settings):
    """A guard (here fail-closed) that starts before the worker created ``enforcement-state``."""
    guard = BudgetGuard(kafka_settings, catalog=load_catalog(), fail_closed=True, use_configured_ledger=False)
    guard.view.rediscover_seconds = 0.2
    guard.start(ready_timeout=10)
    try:
        assert guard.check("late", "gpt-4o", input_tokens=10, output_tokens=10).code is Reason.NO_STATE
        topics = ensure_topics(kafka_settings)  # created after the guard started
        from meterstream.budgets import Budget, customer_decision
        from meterstream.stream_processors.alerts import publish_states, standalone_outbox

        now = datetime.now(timezone.utc)
        state = customer_decision("late", now.strftime("%Y-%m"), Decimal(0), Budget(monthly_credits="5", action="block"),
                                  watermark=now, now=now)  # fmt: skip
        with standalone_outbox(kafka_settings) as kafka:
            publish_states(kafka, topics.enforcement.name, [state])
        _wait(lambda: "late" in guard.view.states, 30, "the state on a topic created after the guard started")
        assert guard.check("late", "gpt-4o", input_tokens=2000, output_tokens=0).decision is Decision.OK
    finally:
        guard.stop()


def test_fail_closed_with_only_a_default_budget_can_make_a_first_call(pipeline_factory):
    pipeline = pipeline_factory(budgets="default: {monthly_credits: '3', thresholds: [100], action: block}\n")
    guard = BudgetGuard(pipeline.kafka, catalog=load_catalog(), fail_closed=True, use_configured_ledger=False)
    guard.start(ready_timeout=30)
    try:
        _wait(lambda: guard.check("newcomer", "gpt-4o", input_tokens=2000, output_tokens=0).allowed, 30,
              "the default budget's state")  # fmt: skip
        # The default cap applies to the newcomer: 1 credit held above, 2 more fit, a fourth does not.
        held = [guard.check("newcomer", "gpt-4o", input_tokens=2000, output_tokens=0) for _ in range(3)]
        assert [d.decision for d in held] == [Decision.OK, Decision.OK, Decision.BLOCK]
        assert held[2].code is Reason.WOULD_EXCEED_BUDGET
    finally:
        guard.stop()


def test_a_guard_fails_closed_when_its_view_grows_stale(pipeline_factory):
    """The worker's heartbeat keeps the view young; once the worker stops, max_view_age blocks."""
    pipeline = pipeline_factory(budgets=BUDGETS)
    guard = BudgetGuard(pipeline.kafka, catalog=load_catalog(), max_view_age=3, use_configured_ledger=False)
    guard.start(ready_timeout=30)
    try:
        _wait(lambda: guard.check("capped", "gpt-4o", input_tokens=10, output_tokens=10).allowed, 30,
              "a heartbeat younger than 3 s")  # fmt: skip
        assert guard.view_age() is not None and guard.view_age() < 3
        pipeline.worker.stop()
        _wait(lambda: guard.check("capped", "gpt-4o", input_tokens=10, output_tokens=10).code is Reason.STALE_VIEW,
              30, "the stale view to block")  # fmt: skip
        assert guard.view_age() > 3
    finally:
        guard.stop()
