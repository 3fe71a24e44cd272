"""The shared reservation ledger on a real redis-server, and hard caps across processes.

The bound stated in meterstream/producers/guard.py: with the ledger, P processes x
T threads store at most ``cap + sum over calls in flight of (actual - estimate)``;
with ``max_tokens`` as the output estimate that sum is <= 0, so stored <= cap.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from meterstream.budgets import Budget, customer_decision
from meterstream.config import KafkaSettings
from meterstream.pricing.plans import load_catalog
from meterstream.producers import BudgetGuard, Decision, LedgerUnavailable, Reason, RedisLedger
from meterstream.services.redis import RedisServer
from meterstream.storage.queries import run_saved_query

pytestmark = pytest.mark.system
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def ledger(redis_server):
    ledger = RedisLedger(redis_server.url, reservation_ttl=30, settled_ttl=60)
    ledger.client.flushdb()
    yield ledger
    ledger.close()


def test_reserve_settle_count_release(ledger):
    c, p = "acme", "2026-11"
    call, res = ledger.reserve(c, p, Decimal("1.5"), Decimal(3))
    assert res.ok and res.available == Decimal("1.5")
    assert not ledger.reserve(c, p, Decimal("1.6"), Decimal(3))[1].ok
    ledger.settle(c, p, call, "e1", Decimal("1.2"))  # actual below the estimate: 0.3 comes back
    snap = ledger.snapshot(c, p)
    assert (snap.reserved, snap.settled, snap.settled_calls) == (0, Decimal("1.2"), 1)
    other, res = ledger.reserve(c, p, Decimal("1.8"), Decimal(3))
    assert res.ok and res.available == 0
    ledger.release(c, p, other)
    # The worker stored the event: counted rises and the settled entry leaves in the same step.
    ledger.count(c, p, Decimal("1.2"), ["e1"])
    snap = ledger.snapshot(c, p)
    assert (snap.counted, snap.reserved, snap.settled) == (Decimal("1.2"), 0, 0)
    # A settle that arrives after the worker counted its event adds nothing (keyed by event id).
    late, _ = ledger.reserve(c, p, Decimal(1), Decimal(3))
    ledger.settle(c, p, late, "e1", Decimal(1))
    assert ledger.snapshot(c, p).settled == 0
    # Sub-micro amounts are rounded up: the ledger never holds less than the money.
    ledger.reserve(c, p, Decimal("0.0000001"), Decimal(3))
    assert ledger.snapshot(c, p).reserved == Decimal("0.000001")


def test_a_dead_callers_reservation_expires(ledger):
    _, res = ledger.reserve("dead", "2026-11", Decimal(1), Decimal(1), ttl=0.2)
    assert res.ok and not ledger.reserve("dead", "2026-11", Decimal(1), Decimal(1))[1].ok
    deadline = time.monotonic() + 10
    while not ledger.reserve("dead", "2026-11", Decimal(1), Decimal(1), ttl=0.2)[1].ok:
        assert time.monotonic() < deadline, "the reservation never expired"
        time.sleep(0.05)


def test_sixty_four_threads_take_exactly_the_cap(ledger):
    wins: list[str] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(10):
            call, res = ledger.reserve("busy", "2026-11", Decimal("0.25"), Decimal(100))
            if res.ok:
                with lock:
                    wins.append(call)

    threads = [threading.Thread(target=take) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(wins) == 400 and ledger.snapshot("busy", "2026-11").reserved == Decimal(100)


def _guard(ledger: RedisLedger, **states) -> BudgetGuard:
    guard = BudgetGuard(KafkaSettings(bootstrap_servers="127.0.0.1:1"), catalog=load_catalog(), ledger=ledger,
                        use_configured_ledger=False, now=lambda: NOW)  # fmt: skip
    for customer, budget in states.items():
        guard.view.states[customer] = customer_decision(customer, "2026-11", Decimal(0), budget, watermark=NOW, now=NOW)
    return guard


def test_when_the_ledger_is_down_the_budget_decides(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    ledger = RedisLedger(server.url, timeout=0.3)
    hard = Budget(monthly_credits="10", action="block")  # fails closed by default
    lenient = Budget(monthly_credits="10", action="block", if_ledger_down="fail_open")
    guard = _guard(ledger, hard=hard, lenient=lenient)
    try:
        assert guard.check("hard", "gpt-4o", input_tokens=2000, output_tokens=0).reservation.in_ledger
        server.stop()
        with pytest.raises(LedgerUnavailable):
            ledger.reserve("hard", "2026-11", Decimal(1), Decimal(10))
        closed = guard.check("hard", "gpt-4o", input_tokens=2000, output_tokens=0)
        assert (closed.decision, closed.code) == (Decision.BLOCK, Reason.LEDGER_UNAVAILABLE)
        # Fail open: decided within this process, still against the cap and its own calls in flight.
        opened = [guard.check("lenient", "gpt-4o", input_tokens=2000, output_tokens=0) for _ in range(11)]
        assert [d.decision for d in opened] == [Decision.OK] * 10 + [Decision.BLOCK]
        assert not opened[0].reservation.in_ledger
        server = RedisServer(tmp_path / "redis", port=server.port).start()  # the ledger comes back
        assert guard.check("hard", "gpt-4o", input_tokens=2000, output_tokens=0).decision is Decision.OK
    finally:
        ledger.close()
        server.stop()


def test_processes_and_threads_cannot_pass_a_hard_cap(pipeline_factory, redis_server):
    """2 processes x 4 threads, estimates from max_tokens: the worker stores at most the cap."""
    from bench.caps import run_trial

    cap = Decimal(60)
    pipeline = pipeline_factory(
        budgets=f"customers:\n  shared: {{monthly_credits: '{cap}', thresholds: [100], action: block}}\n",
        env={"METERSTREAM_LEDGER__REDIS_URL": redis_server.url},
    )
    ledger = RedisLedger(redis_server.url)
    period = datetime.now(timezone.utc).strftime("%Y-%m")  # the worker's current month (no clock to inject yet)

    def stored() -> Decimal:
        rows = run_saved_query(pipeline.clickhouse, "month_to_date", period=period, customer="shared").dicts()
        return rows[0]["usage_credits"] + rows[0]["outcome_credits"] if rows else Decimal(0)  # budget credits

    result = run_trial(pipeline.kafka, "shared", cap, 2, 4, redis_url=redis_server.url, duration=12,
                       wait_processed=pipeline.wait_processed, stored_credits=stored, call_ms=30)  # fmt: skip
    assert result.estimation_error <= 0  # actual output <= max_tokens
    assert result.stored <= cap + max(result.estimation_error, Decimal(0))
    assert result.stored >= cap - 2  # the callers were not stopped early: less than one call is left
    assert result.blocked_reasons and set(result.blocked_reasons) <= {"would_exceed_budget", "budget_exhausted"}
    # No drift: once the worker has written everything, the ledger holds exactly the stored money.
    deadline = time.monotonic() + 30
    while (snap := ledger.snapshot("shared", period)).counted != result.stored or snap.settled:
        assert time.monotonic() < deadline, f"ledger {snap} != stored {result.stored}"
        time.sleep(0.2)
    assert snap.reserved == 0
    ledger.close()
