"""The budget guard services call before a model call: allow, downgrade or block, locally.

It answers from a local view of the compacted ``enforcement-state`` topic (a
background consumer keeps it current), so a check costs no network round trip.
Each allowed call **reserves** its estimated credits until the usage event that
settles it has been counted by the worker, so concurrent callers in one process
see each other's calls in flight::

    guard = BudgetGuard(kafka_settings).start()
    verdict = guard.check("acme", "gpt-4o", input_tokens=1200, output_tokens=400, run_id="run-42")
    if verdict.blocked:
        raise BudgetExceeded(verdict.reason)
    response = call_model(verdict.model, ...)           # the model to use (maybe downgraded)
    event = meter.record_openai_usage("acme", verdict.model, response.usage, run_id="run-42")
    guard.settle(verdict, event)                         # or guard.release(verdict) if no call was made

**How far a hard cap can be overshot.** A call is allowed only while
``remaining − reserved − settled-but-not-yet-counted ≥ its estimate``, under one
lock. Within one process the overshoot is therefore bounded by the sum, over
the calls in flight, of (actual − estimated) credits: zero when estimates are
exact (the output-token estimate is the caller's ``max_tokens``, an upper bound,
so the estimate is an upper bound too). Across P processes each sees only its
own reservations, so add what the other P − 1 processes can spend during the
enforcement-state latency (the worker's batch timeout plus processing, about a
second): at most their call rate × that latency × credits per call.

Customers without a state message (no budget, or the worker has not started)
are allowed unless ``fail_closed=True``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from confluent_kafka import Consumer, TopicPartition

from meterstream.clock import utc_now
from meterstream.config import KafkaSettings, get_settings
from meterstream.pricing.plans import Catalog, PlanError, load_catalog
from meterstream.pricing.rating import RatingError
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import Decision, EnforcementState, ThresholdAction
from meterstream.topics import Topics

log = logging.getLogger(__name__)
ZERO = Decimal(0)


class Verdict(StrEnum):
    ALLOW = "allow"
    DOWNGRADE = "downgrade"
    BLOCK = "block"


@dataclass
class Reservation:
    id: int
    customer_id: str
    run_id: str
    credits: Decimal
    created: float


@dataclass
class GuardDecision:
    verdict: Verdict
    #: The model to call: the requested one, or the cheaper one on downgrade.
    model: str
    reason: str
    estimated_credits: Decimal = ZERO
    reservation: Reservation | None = None

    @property
    def blocked(self) -> bool:
        return self.verdict is Verdict.BLOCK


@dataclass
class _Customer:
    reserved: dict[int, Reservation] = field(default_factory=dict)
    #: Settled calls the worker has not counted yet: (occurred_at, credits).
    pending: list[tuple[datetime, Decimal]] = field(default_factory=list)

    def in_flight(self) -> Decimal:
        return sum((r.credits for r in self.reserved.values()), ZERO) + sum((c for _, c in self.pending), ZERO)


class EnforcementView:
    """The latest :class:`EnforcementState` per key, kept current by a background consumer."""

    def __init__(self, kafka: KafkaSettings, topic: str, on_update: object = None) -> None:
        self.kafka = kafka
        self.topic = topic
        self.states: dict[str, EnforcementState] = {}
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_update = on_update

    def start(self) -> EnforcementView:
        self._thread = threading.Thread(target=self._run, name="meterstream-enforcement-view", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        consumer = Consumer(
            {
                **self.kafka.confluent_config(),
                "group.id": "meterstream-guard",  # never committed: every guard reads the whole view
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            metadata = consumer.list_topics(self.topic, timeout=30)
            partitions = list(metadata.topics[self.topic].partitions) if self.topic in metadata.topics else []
            consumer.assign([TopicPartition(self.topic, p, 0) for p in partitions])
            ends = {p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)[1] for p in partitions}
            behind = {p for p, end in ends.items() if end > 0}
            if not behind:
                self.ready.set()
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is None or message.error():
                    continue
                try:
                    state = EnforcementState.model_validate_json(message.value())
                except ValueError:
                    log.warning("unreadable enforcement state at offset %d", message.offset())
                    continue
                self.states[state.key] = state
                if self._on_update is not None:
                    self._on_update(state)  # type: ignore[operator]
                if behind and message.offset() + 1 >= ends[message.partition()]:
                    behind.discard(message.partition())
                    if not behind:
                        self.ready.set()
        except Exception:  # the guard must never take the service down with it
            log.exception("enforcement view stopped")
        finally:
            consumer.close()


class BudgetGuard:
    """Local allow / downgrade / block decisions with reservations for calls in flight."""

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        *,
        catalog: Catalog | None = None,
        fail_closed: bool = False,
        reservation_ttl: float = 300.0,
    ) -> None:
        self.kafka = kafka or get_settings().kafka
        self.catalog = catalog or load_catalog(get_settings().worker.plans_file)
        self.fail_closed = fail_closed
        self.reservation_ttl = reservation_ttl
        self._lock = threading.Lock()
        self._customers: dict[str, _Customer] = {}
        self._ids = itertools.count(1)
        self.view = EnforcementView(self.kafka, Topics.from_settings(self.kafka).enforcement.name, self._on_state)

    def start(self, ready_timeout: float = 30.0) -> BudgetGuard:
        """Start following the topic and wait (bounded) until the view has caught up."""
        self.view.start()
        if not self.view.ready.wait(ready_timeout):
            log.warning("enforcement view not caught up after %.0f s; deciding on what it has", ready_timeout)
        return self

    def stop(self) -> None:
        self.view.stop()

    def __enter__(self) -> BudgetGuard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- decisions ---------------------------------------------------------------------------------

    def estimate(self, customer_id: str, model: str, input_tokens: int, output_tokens: int) -> Decimal:
        probe = UsageEvent(
            event_id="guard-estimate", customer_id=customer_id, occurred_at=utc_now(),
            model=model, input_tokens=input_tokens, output_tokens=output_tokens,
        )  # fmt: skip
        return self.catalog.rate(probe).credits

    def check(
        self, customer_id: str, model: str, *, input_tokens: int, output_tokens: int = 0, run_id: str = ""
    ) -> GuardDecision:
        """Decide before a call; an allowed or downgraded call holds a reservation until settled."""
        with self._lock:
            self._expire()
            run_state = self.view.states.get(f"{customer_id}|{run_id}") if run_id else None
            if run_state is not None and run_state.decision is Decision.BLOCK:
                return GuardDecision(Verdict.BLOCK, model, f"run {run_id}: {run_state.reason}")
            state = self.view.states.get(customer_id)
            if state is None and self.fail_closed:
                return GuardDecision(Verdict.BLOCK, model, f"no enforcement state for {customer_id} (fail closed)")
            if state is not None and state.decision is Decision.BLOCK:
                return GuardDecision(Verdict.BLOCK, model, state.reason)
            verdict, reason = Verdict.ALLOW, state.reason if state else f"no budget known for {customer_id}"
            for source in (run_state, state):
                if source is not None and source.decision is Decision.DOWNGRADE and source.downgrade_to:
                    verdict, model = Verdict.DOWNGRADE, source.downgrade_to
                    reason = f"downgraded to {model}: {source.reason}"
                    break
            try:
                estimate = self.estimate(customer_id, model, input_tokens, output_tokens)
            except (RatingError, PlanError) as exc:
                return GuardDecision(Verdict.BLOCK, model, f"cannot price this call: {exc}")
            if state is None:
                return self._reserve(verdict, customer_id, run_id, model, estimate, reason)
            if state.remaining_credits is not None:
                account = self._customers.setdefault(customer_id, _Customer())
                self._drop_counted(account, state.watermark)
                available = state.remaining_credits - account.in_flight()
                if estimate > available:
                    if state.at_cap is ThresholdAction.BLOCK:
                        return GuardDecision(
                            Verdict.BLOCK, model,
                            f"would exceed the monthly budget of {state.cap_credits} credits: {available:.4f} left "
                            f"after calls in flight, this call needs about {estimate:.4f}",
                            estimate,
                        )  # fmt: skip
                    if state.at_cap is ThresholdAction.DOWNGRADE and state.downgrade_to and model != state.downgrade_to:
                        model = state.downgrade_to
                        verdict, reason = Verdict.DOWNGRADE, f"downgraded to {model}: the budget is nearly used"
                        try:
                            estimate = self.estimate(customer_id, model, input_tokens, output_tokens)
                        except (RatingError, PlanError) as exc:
                            return GuardDecision(Verdict.BLOCK, model, f"cannot price this call: {exc}")
            return self._reserve(verdict, customer_id, run_id, model, estimate, reason)

    def settle(self, decision: GuardDecision, event: UsageEvent) -> None:
        """The call happened and ``event`` records it: hold its actual credits until the worker counts it."""
        reservation = decision.reservation
        if reservation is None:
            return
        try:
            actual = self.catalog.rate(event).credits
        except (RatingError, PlanError):
            actual = reservation.credits
        with self._lock:
            account = self._customers.setdefault(reservation.customer_id, _Customer())
            account.reserved.pop(reservation.id, None)
            account.pending.append((event.occurred_at, actual))
        decision.reservation = None

    def release(self, decision: GuardDecision) -> None:
        """The call did not happen: free its reservation."""
        if decision.reservation is None:
            return
        with self._lock:
            account = self._customers.get(decision.reservation.customer_id)
            if account is not None:
                account.reserved.pop(decision.reservation.id, None)
        decision.reservation = None

    def in_flight(self, customer_id: str) -> Decimal:
        with self._lock:
            account = self._customers.get(customer_id)
            return account.in_flight() if account else ZERO

    # -- internals ----------------------------------------------------------------------------------

    def _reserve(
        self, verdict: Verdict, customer_id: str, run_id: str, model: str, estimate: Decimal, reason: str
    ) -> GuardDecision:
        reservation = Reservation(next(self._ids), customer_id, run_id, estimate, time.monotonic())
        self._customers.setdefault(customer_id, _Customer()).reserved[reservation.id] = reservation
        return GuardDecision(verdict, model, reason, estimate, reservation)

    @staticmethod
    def _drop_counted(account: _Customer, watermark: datetime) -> None:
        # The worker has counted every event of this customer up to its watermark
        # (one partition per customer keeps them in order).
        account.pending = [(at, credits) for at, credits in account.pending if at > watermark]

    def _on_state(self, state: EnforcementState) -> None:
        if state.run_id:
            return
        with self._lock:
            account = self._customers.get(state.customer_id)
            if account is not None:
                self._drop_counted(account, state.watermark)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.reservation_ttl
        for account in self._customers.values():
            for rid in [rid for rid, r in account.reserved.items() if r.created < cutoff]:
                del account.reserved[rid]
