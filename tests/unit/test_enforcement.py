"""Enforcement rules (pure) and the SDK guard's local decisions, without a broker."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import time_machine

from meterstream.budgets import (
    Budget,
    BudgetBook,
    RunCap,
    SpikeRule,
    customer_decision,
    is_spike,
    projected_exhaustion,
    run_decision,
)
from meterstream.config import KafkaSettings
from meterstream.pricing.plans import load_catalog
from meterstream.producers import BudgetExceeded, BudgetGuard, CatalogMismatch, Decision, Reason
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import DEFAULT_BUDGET_KEY, HEARTBEAT_KEY

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)


def test_customer_decision_by_spend():
    budget = Budget(monthly_credits="100", thresholds=(50, 80, 100), action="block")
    decide = lambda spent: customer_decision("c", "2026-11", Decimal(spent), budget, watermark=NOW, now=NOW)  # noqa: E731
    assert decide("49.99").decision is Decision.OK
    assert decide("50").decision is Decision.WARN and "50%" in decide("50").reason
    assert decide("100").decision is Decision.BLOCK
    assert decide("30").remaining_credits == Decimal(70)
    alert_only = Budget(monthly_credits="100")
    assert customer_decision("c", "p", Decimal(150), alert_only, watermark=NOW, now=NOW).decision is Decision.WARN


def test_downgrade_needs_a_model_and_profiles_resolve():
    with pytest.raises(ValueError, match="downgrade_to"):
        Budget(monthly_credits="10", action="downgrade")
    book = BudgetBook.model_validate(
        {"profiles": {"free": {"monthly_credits": "1000", "action": "block"}},
         "customers": {"hobby": {"profile": "free", "thresholds": ["100"]}}}
    )  # fmt: skip
    assert book.for_customer("hobby").monthly_credits == Decimal(1000)
    assert book.for_customer("hobby").thresholds == (100,)
    with pytest.raises(ValueError, match="unknown profile"):
        BudgetBook.model_validate({"customers": {"x": {"profile": "nope"}}})


def test_run_decision_on_steps_or_credits():
    cap = RunCap(max_credits="5", max_steps=10)
    state = run_decision("c", "r", "p", Decimal(5), 3, cap, downgrade_to="", watermark=NOW, now=NOW)
    assert state.decision is Decision.BLOCK and state.key == "c|r" and "5 of 5 credits" in state.reason
    assert run_decision("c", "r", "p", Decimal(1), 9, cap, downgrade_to="", watermark=NOW, now=NOW).decision is Decision.OK
    with pytest.raises(ValueError):
        RunCap()


def test_projection_and_spikes():
    assert projected_exhaustion(Decimal(50), Decimal(100), Decimal(0), NOW) is None
    assert projected_exhaustion(Decimal(50), Decimal(100), Decimal("0.5"), NOW) == NOW + timedelta(seconds=100)
    rule = SpikeRule(factor="5", min_credits="10")
    assert is_spike(Decimal(50), Decimal(10), rule)
    assert not is_spike(Decimal(49), Decimal(10), rule)
    assert not is_spike(Decimal(9), Decimal(1), rule)  # below the minimum
    assert not is_spike(Decimal(50), Decimal(0), rule)  # no baseline: a new customer is not a spike


@pytest.fixture
def guard():
    # No consumer is started: states are placed in the view directly; the clock is fixed.
    return BudgetGuard(KafkaSettings(bootstrap_servers="127.0.0.1:1"), catalog=load_catalog(),
                       use_configured_ledger=False, now=lambda: NOW)  # fmt: skip


def _state(spent: str, *, cap: str = "10", action: str = "block", watermark: datetime = NOW, ids=(), **kw):
    budget = Budget(monthly_credits=cap, action=action, **{"thresholds": (100,), **kw})
    return customer_decision("acme", "2026-11", Decimal(spent), budget, watermark=watermark, now=NOW,
                             counted_ids=tuple(ids), catalog_fingerprint=load_catalog().fingerprint())  # fmt: skip


def _event(event_id: str, occurred_at: datetime = NOW) -> UsageEvent:
    return UsageEvent(event_id=event_id, customer_id="acme", occurred_at=occurred_at, model="gpt-4o",
                      input_tokens=2000)  # fmt: skip


def test_reservations_stop_concurrent_calls_at_the_cap(guard):
    guard.view.states["acme"] = _state("7")  # 3 credits left
    decisions = [guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0) for _ in range(4)]  # 1 credit each
    assert [d.decision for d in decisions] == [Decision.OK] * 3 + [Decision.BLOCK]
    assert decisions[3].code is Reason.WOULD_EXCEED_BUDGET
    assert "0.0000 left" in decisions[3].reason and "needs about 1.0000" in decisions[3].reason
    guard.release(decisions[0])
    assert guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0).decision is Decision.OK


def test_settled_calls_are_released_by_event_id_not_by_event_time(guard):
    guard.view.states["acme"] = _state("8")  # 2 credits left
    first = guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0)
    second = guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0)
    # The first call was stamped long before the second (occurred_at at the start of a slow call).
    guard.settle(first, _event("early", NOW - timedelta(minutes=5)))
    guard.settle(second, _event("late", NOW))
    assert guard.in_flight("acme") == Decimal(2)
    # The worker counts the later call first; its watermark passes the earlier one's time, which
    # the old guard took as counted. Released by id, the earlier call still holds its credit.
    counted_late = _state("9", watermark=NOW, ids=["late"])
    guard.view.states["acme"] = counted_late
    guard._on_state(counted_late)
    assert guard.in_flight("acme") == Decimal(1)
    assert guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0).blocked  # 9 + 1 in flight = cap
    counted_both = _state("10", ids=["early"])
    guard._on_state(counted_both)
    assert guard.in_flight("acme") == 0
    # A settle that arrives after the worker counted its event adds nothing.
    guard.view.states["acme"] = _state("9")
    third = guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0)
    guard.settle(third, _event("early"))
    assert guard.in_flight("acme") == 0


def test_a_dead_callers_reservation_is_freed_after_its_hold(guard):
    guard.view.states["acme"] = _state("9")
    held = guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0, hold_seconds=0.05)
    assert held.decision is Decision.OK and guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0).blocked
    deadline = time.monotonic() + 5
    while guard.in_flight("acme") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0).decision is Decision.OK


def test_block_and_downgrade_decisions_use_the_topic_vocabulary(guard):
    guard.view.states["acme"] = _state("10")
    blocked = guard.check("acme", "gpt-4o", input_tokens=1, output_tokens=0)
    assert (blocked.decision, blocked.code) == (Decision.BLOCK, Reason.BUDGET_EXHAUSTED)
    with pytest.raises(BudgetExceeded) as raised:
        guard.require("acme", "gpt-4o", input_tokens=1, output_tokens=0)
    assert raised.value.code is Reason.BUDGET_EXHAUSTED
    guard.view.states["acme"] = _state("10", action="downgrade", downgrade_to="gpt-4o-mini")
    decision = guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0)
    assert (decision.decision, decision.model, decision.code) == (Decision.DOWNGRADE, "gpt-4o-mini", Reason.DOWNGRADED)
    guard.view.states["acme"] = _state("6", cap="10", thresholds=(50, 100))
    assert guard.check("acme", "gpt-4o", input_tokens=2000, output_tokens=0).code is Reason.THRESHOLD_REACHED


def test_the_output_estimate_is_required(guard):
    guard.view.states["acme"] = _state("0")
    with pytest.raises(TypeError):
        guard.check("acme", "gpt-4o", input_tokens=2000)  # forgetting max_tokens voided the guarantee


def test_unknown_customers_follow_the_fail_mode_and_the_default_budget(guard):
    assert guard.check("new", "gpt-4o", input_tokens=10, output_tokens=0).code is Reason.NO_BUDGET
    strict = BudgetGuard(KafkaSettings(bootstrap_servers="127.0.0.1:1"), catalog=load_catalog(), fail_closed=True,
                         use_configured_ledger=False, now=lambda: NOW)  # fmt: skip
    assert strict.check("new", "gpt-4o", input_tokens=10, output_tokens=0).code is Reason.NO_STATE
    # Only a default budget: a first call is allowed within its cap, a call past it is not.
    default = customer_decision(DEFAULT_BUDGET_KEY, "2026-11", Decimal(0),
                                Budget(monthly_credits="2", action="block"), watermark=NOW, now=NOW)  # fmt: skip
    strict.view.states[DEFAULT_BUDGET_KEY] = default
    first = strict.check("new", "gpt-4o", input_tokens=2000, output_tokens=0)
    assert first.decision is Decision.OK
    assert strict.check("new", "gpt-4o", input_tokens=4000, output_tokens=0).code is Reason.WOULD_EXCEED_BUDGET
    assert guard.check("acme", "no-such-model", input_tokens=10, output_tokens=0).code is Reason.CANNOT_PRICE


def test_a_stale_view_fails_closed_past_the_configured_age():
    clock = [NOW]
    guard = BudgetGuard(KafkaSettings(bootstrap_servers="127.0.0.1:1"), catalog=load_catalog(), max_view_age=5,
                        use_configured_ledger=False, now=lambda: clock[0])  # fmt: skip
    guard.view.states["acme"] = _state("0")
    assert guard.check("acme", "gpt-4o", input_tokens=10, output_tokens=0).code is Reason.STALE_VIEW  # no heartbeat
    guard.view.states[HEARTBEAT_KEY] = _state("0").model_copy(update={"key": HEARTBEAT_KEY, "updated_at": NOW})
    clock[0] = NOW + timedelta(seconds=3)
    assert guard.view_age() == 3.0
    assert guard.check("acme", "gpt-4o", input_tokens=10, output_tokens=0).decision is Decision.OK
    clock[0] = NOW + timedelta(seconds=6)
    stale = guard.check("acme", "gpt-4o", input_tokens=10, output_tokens=0)
    assert stale.code is Reason.STALE_VIEW and "6.0 s old" in stale.reason


def test_a_guard_with_another_catalog_blocks_hard_caps(guard):
    guard.view.states["acme"] = _state("0")
    guard.view.catalog_fingerprint = "not-the-same"
    assert guard.catalog_matches is False
    assert guard.check("acme", "gpt-4o", input_tokens=10, output_tokens=0).code is Reason.CATALOG_MISMATCH
    with pytest.raises(CatalogMismatch):
        guard.assert_catalog_matches()
    guard.view.catalog_fingerprint = guard.fingerprint
    assert guard.check("acme", "gpt-4o", input_tokens=10, output_tokens=0).decision is Decision.OK


def test_one_vocabulary_is_exported_from_producers():
    import meterstream.producers as producers

    for name in ("BudgetGuard", "BudgetExceeded", "Decision", "GuardDecision", "Reason", "RedisLedger"):
        assert name in producers.__all__ and hasattr(producers, name)
    assert {d.value for d in Decision} == {"ok", "warn", "downgrade", "block"}


# -- the batch processor's side of enforcement ------------------------------------------------------

from meterstream.stream_processors.processing import BatchProcessor, InboundMessage, MonthToDate  # noqa: E402


class History:
    def __init__(self, runs=None, spend=Decimal(0), recent_baseline=(Decimal(0), Decimal(0))):
        self.runs = runs or {}
        self.spend = spend
        self.baseline = recent_baseline

    def run_totals(self, customer_id, run_id):
        return self.runs.get(f"{customer_id}|{run_id}", (Decimal(0), 0))

    def credits_between(self, customer_id, start, end):
        # 65..5 minutes ago -> baseline window, last 5 minutes -> recent
        return self.baseline[1] * 12 if end - start > timedelta(minutes=30) else self.baseline[0]


def _message(i: int, customer: str = "acme", run_id: str = "r1", tokens: int = 2000) -> InboundMessage:
    event = UsageEvent(event_id=f"e{i}", customer_id=customer, occurred_at=NOW, model="gpt-4o",
                       input_tokens=tokens, run_id=run_id)  # fmt: skip
    return InboundMessage("usage", event.model_dump_json().encode(), "usage.events", 0, i)


def test_a_run_reaching_its_cap_alerts_once_and_is_blocked():
    budgets = BudgetBook.model_validate(
        {"customers": {"acme": {"monthly_credits": "1000", "run_cap": {"max_steps": 3}}}}
    )
    processor = BatchProcessor(load_catalog(), budgets)
    history = History(runs={"acme|r1": (Decimal(2), 2)})
    result = processor.process([_message(i) for i in range(3)], lambda k: MonthToDate(), now=NOW, history=history)
    run_alerts = [a for a in result.alerts if a.kind == "run_cap"]
    assert len(run_alerts) == 1 and run_alerts[0].triggering_event_id == "e0"  # step 3 of 3
    assert result.enforcement["acme|r1"].decision is Decision.BLOCK
    assert result.runs["acme|r1"] == (Decimal(5), 5)
    assert result.enforcement["acme"].decision is Decision.OK


def test_a_spend_spike_is_alerted_with_its_hour():
    budgets = BudgetBook.model_validate({"customers": {"acme": {"monthly_credits": "1000"}}, "spike": {"factor": "5"}})
    processor = BatchProcessor(load_catalog(), budgets)
    calm = processor.process([_message(1, tokens=2000)], lambda k: MonthToDate(), now=NOW,
                             history=History(recent_baseline=(Decimal(1), Decimal(1))))  # fmt: skip
    assert [a for a in calm.alerts if a.kind == "spend_spike"] == []
    spike = processor.process([_message(2, tokens=2000)], lambda k: MonthToDate(), now=NOW,
                              history=History(recent_baseline=(Decimal(20), Decimal(2))))  # fmt: skip
    [alert] = [a for a in spike.alerts if a.kind == "spend_spike"]
    assert alert.spent_credits == Decimal(21) and alert.budget_credits == Decimal(2)


def test_threshold_alerts_carry_a_projected_exhaustion():
    budgets = BudgetBook.model_validate({"customers": {"acme": {"monthly_credits": "2", "thresholds": [50]}}})
    processor = BatchProcessor(load_catalog(), budgets)
    # 3600 credits stored in the last hour + this event's 1 -> 3601/3600 credit/s; 1 of 2 credits left.
    result = processor.process([_message(1)], lambda k: MonthToDate(), now=NOW,
                               history=History(recent_baseline=(Decimal(3600), Decimal(300))))  # fmt: skip
    [alert] = result.alerts
    assert alert.projected_exhaustion_at == NOW + timedelta(seconds=float(Decimal(3600) / Decimal(3601)))


def test_the_first_spend_of_the_hour_projects_an_exhaustion():
    # Nothing stored in the last hour: the batch's own spend is the velocity (1 credit/hour).
    budgets = BudgetBook.model_validate({"customers": {"acme": {"monthly_credits": "2", "thresholds": [50]}}})
    result = BatchProcessor(load_catalog(), budgets).process([_message(1)], lambda k: MonthToDate(), now=NOW,
                                                             history=History())  # fmt: skip
    [alert] = result.alerts
    assert alert.projected_exhaustion_at == NOW + timedelta(hours=1)


def test_a_cap_in_money_is_converted_at_the_plan_credit_value(tmp_path):
    from pathlib import Path

    from meterstream.budgets import BudgetBookError, load_budgets

    plans = Path(__file__).resolve().parents[2] / "examples" / "plans.yaml"
    path = tmp_path / "budgets.yaml"
    path.write_text('customers:\n  acme: {monthly_amount: "250", action: block}\n')
    book = load_budgets(path, load_catalog(plans))
    # acme is on growth, credit_value 0.01 -> 25,000 credits
    assert book.for_customer("acme").monthly_credits == Decimal(25_000)
    assert book.for_customer("acme").monthly_amount == Decimal(250)
    path.write_text('customers:\n  acme: {monthly_amount: "250", monthly_credits: "1"}\n')
    with pytest.raises(BudgetBookError, match="not both"):
        load_budgets(path, load_catalog(plans))


# -- late usage ----------------------------------------------------------------------------------------


def test_events_of_a_closed_period_are_billed_on_the_open_one():
    processor = BatchProcessor(load_catalog(), BudgetBook(), late_grace=timedelta(days=3))
    now = datetime(2026, 11, 20, tzinfo=timezone.utc)

    def rated(occurred_at: datetime):
        event = UsageEvent(event_id=f"e{occurred_at:%m%d}", customer_id="acme", occurred_at=occurred_at,
                           model="gpt-4o", input_tokens=1000)  # fmt: skip
        message = InboundMessage("usage", event.model_dump_json().encode(), "usage.events", 0, 1)
        [row] = processor.process([message], lambda k: MonthToDate(), now=now).rated
        return row

    assert rated(datetime(2026, 11, 2, tzinfo=timezone.utc)).billed_in == ""
    late = rated(datetime(2026, 10, 30, tzinfo=timezone.utc))  # October closed on Nov 3
    assert (late.period, late.billed_in) == ("2026-10", "2026-11")
    within_grace = BatchProcessor(load_catalog(), BudgetBook(), late_grace=timedelta(days=30))
    event = UsageEvent(event_id="g", customer_id="acme", occurred_at=datetime(2026, 10, 30, tzinfo=timezone.utc),
                       model="gpt-4o", input_tokens=1000)  # fmt: skip
    message = InboundMessage("usage", event.model_dump_json().encode(), "usage.events", 0, 2)
    assert within_grace.process([message], lambda k: MonthToDate(), now=now).rated[0].billed_in == ""


def test_a_late_adjustment_line_is_added_to_the_total():
    from meterstream.pricing.invoice import PeriodUsage, compute_invoice, late_adjustment

    catalog = load_catalog()
    before = compute_invoice("acme", "2026-10", PeriodUsage(credits=Decimal(0)), catalog)
    after = compute_invoice("acme", "2026-10", PeriodUsage(credits=Decimal(1234)), catalog)
    line = late_adjustment("2026-10", before, after, 3, Decimal(1234))
    assert line.amount == Decimal("12.34")  # pay as you go: 0.01 per credit
    november = compute_invoice("acme", "2026-11", PeriodUsage(credits=Decimal(100)), catalog, adjustments=[line])
    assert november.total == Decimal("1.00") + Decimal("12.34")
    assert november.lines[-1].kind == "late_adjustment" and "2026-10" in november.lines[-1].description


def test_calls_without_a_hard_cap_hold_nothing_once_settled(guard):
    # An alert-only budget and a customer with no budget: no cap to hold settled calls against.
    guard.view.states["acme"] = _state("0", action="alert")
    for customer in ("acme", "nobody"):
        decision = guard.check(customer, "gpt-4o", input_tokens=2000, output_tokens=0)
        assert guard.in_flight(customer) == Decimal(1)
        guard.settle(decision, _event(f"{customer}-1").model_copy(update={"customer_id": customer}))
        assert guard.in_flight(customer) == 0


ANNIVERSARY_PLANS = {
    "currency": "USD",
    "default_plan": "basic",
    "plans": {"basic": {"versions": [{
        "version": "basic-1", "effective_from": "2025-01-01", "price_book": "default",
        "overage": {"model": "per_unit", "unit_price": "0.01"},
    }]}},  # fmt: skip
    "customers": {"wayne": {"plan": "basic", "effective_from": "2025-08-15", "billing_anchor": "anniversary"}},
}


@pytest.mark.parametrize(
    ("now", "blocked"),
    [
        (datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc), True),  # still 2026-11 (15 Nov - 15 Dec)
        (datetime(2026, 12, 14, 23, 59, tzinfo=timezone.utc), True),
        (datetime(2026, 12, 15, 0, 0, tzinfo=timezone.utc), False),  # 2026-12 begins: nothing counted yet
    ],
)
def test_an_anniversary_customer_is_held_to_its_billing_period_not_the_calendar_month(now, blocked, request):
    """The worker labels an anniversary customer's state with its billing period (the month it
    starts in). Between the 1st and the anchor day the calendar month is already the next one:
    a guard that read the calendar month took the blocked state for last month's and let
    every call through."""
    from meterstream.pricing.plans import parse_catalog

    # The guard's estimate builds an event at its clock's now, which the event's future-time
    # rule checks against the wall clock: stop the wall clock at the same instant.
    traveller = time_machine.travel(now, tick=False)
    traveller.start()
    request.addfinalizer(traveller.stop)
    catalog = parse_catalog(ANNIVERSARY_PLANS)
    guard = BudgetGuard(KafkaSettings(bootstrap_servers="127.0.0.1:1"), catalog=catalog,
                        use_configured_ledger=False, now=lambda: now)  # fmt: skip
    budget = Budget(monthly_credits="10", action="block", thresholds=(100,))
    exhausted = customer_decision("wayne", "2026-11", Decimal(12), budget, watermark=NOW, now=NOW,
                                  catalog_fingerprint=catalog.fingerprint())  # fmt: skip
    assert catalog.billing_period("wayne", now) == ("2026-11" if blocked else "2026-12")
    guard.view.states["wayne"] = exhausted
    decision = guard.check("wayne", "gpt-4o", input_tokens=2000, output_tokens=0)
    assert decision.blocked is blocked, decision.reason
    if blocked:
        assert decision.code is Reason.BUDGET_EXHAUSTED
