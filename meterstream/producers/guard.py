"""The budget guard services call before a model call: ok, warn, downgrade or block.

It answers from a local view of the compacted ``enforcement-state`` topic (a
background consumer keeps it current) and, for hard caps, from the shared
reservation ledger (:mod:`meterstream.producers.ledger`, on Redis) when one is
configured::

    from meterstream.producers import BudgetExceeded, BudgetGuard, MeterClient

    guard = BudgetGuard(kafka_settings).start()
    decision = guard.check("acme", "gpt-4o", input_tokens=1200, output_tokens=max_tokens, run_id="run-42")
    if decision.blocked:
        raise BudgetExceeded(decision)                  # decision.code: a machine-readable Reason
    response = call_model(decision.model, ...)           # the model to use (maybe downgraded)
    event = meter.record_openai_usage("acme", decision.model, response.usage, run_id="run-42")
    guard.settle(decision, event)                        # or guard.release(decision) if no call was made

Decisions use the topic's vocabulary (:class:`Decision`: ``ok``, ``warn``,
``downgrade``, ``block``); every decision carries a :class:`Reason` code and a
sentence for people.

**How far a hard cap can be overshot.** Each allowed call *reserves* its
estimated credits (rated with the worker's catalog: the guard checks the
fingerprint) until the worker has counted the usage event that settles it —
released by the event's id, never by its ``occurred_at``. A call is allowed only
while ``counted + reserved + settled-but-not-counted + estimate <= cap``:

- with the shared ledger, atomically across every process and host, so P
  processes x T threads pass the cap by at most the sum, over the calls in
  flight, of (actual - estimated) credits — zero when the output estimate is
  ``max_tokens`` (an upper bound) — plus usage recorded without a guard check;
- without it, the same within one process, while other processes are seen only
  through the worker's published spend (published as soon as a batch is rated;
  :meth:`BudgetGuard.view_age` says how old that view is).

If the ledger is unreachable, the budget's ``if_ledger_down`` decides: fail
closed (block) or fail open (decide within this process). A reservation whose
caller died is freed after ``hold_seconds`` (default: the ledger's
``reservation_ttl_seconds``, 60 s).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from confluent_kafka import Consumer, TopicPartition

from meterstream.clock import Clock, utc_now
from meterstream.config import KafkaSettings, get_settings
from meterstream.pricing.plans import Catalog, PlanError, load_catalog
from meterstream.pricing.rating import RatingError
from meterstream.producers.ledger import LedgerUnavailable, RedisLedger
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import (
    DEFAULT_BUDGET_KEY,
    HEARTBEAT_KEY,
    Decision,
    EnforcementState,
    ThresholdAction,
)
from meterstream.topics import Topics

log = logging.getLogger(__name__)
ZERO = Decimal(0)
#: A downgraded call past the cap is still held in the ledger (so it counts), against no cap.
_NO_CAP = Decimal(10) ** 12


class Reason(StrEnum):
    """Why the guard decided what it did (machine-readable; ``GuardDecision.reason`` says it in words)."""

    WITHIN_BUDGET = "within_budget"
    THRESHOLD_REACHED = "threshold_reached"  # allowed; a budget threshold below the cap is crossed
    NO_BUDGET = "no_budget"  # the customer has no budget: allowed
    DOWNGRADED = "downgraded"
    BUDGET_EXHAUSTED = "budget_exhausted"  # the worker has counted the cap
    WOULD_EXCEED_BUDGET = "would_exceed_budget"  # this call's estimate does not fit what is left
    RUN_CAP_REACHED = "run_cap_reached"
    NO_STATE = "no_state"  # fail_closed and nothing is known about the customer's budget
    STALE_VIEW = "stale_view"  # the view is older than max_view_age
    LEDGER_UNAVAILABLE = "ledger_unavailable"  # the ledger is down and the budget fails closed
    CATALOG_MISMATCH = "catalog_mismatch"  # this guard prices with another catalog than the worker
    CANNOT_PRICE = "cannot_price"  # the model or customer cannot be rated


@dataclass
class Reservation:
    id: str
    customer_id: str
    period: str
    run_id: str
    credits: Decimal
    #: When a caller that never settles nor releases frees it (time.monotonic()).
    expires: float
    #: Held in the shared ledger (else only in this process).
    in_ledger: bool = False
    #: Under a hard cap: once settled, held until the worker counts the event (else dropped at settle).
    capped: bool = True


@dataclass
class GuardDecision:
    decision: Decision
    #: The model to call: the requested one, or the cheaper one on downgrade.
    model: str
    code: Reason
    reason: str
    estimated_credits: Decimal = ZERO
    reservation: Reservation | None = None

    @property
    def blocked(self) -> bool:
        return self.decision is Decision.BLOCK

    @property
    def allowed(self) -> bool:
        return self.decision is not Decision.BLOCK


class BudgetExceeded(RuntimeError):
    """Raised by callers (or :meth:`BudgetGuard.require`) for a blocked call; carries the decision."""

    def __init__(self, decision: GuardDecision) -> None:
        super().__init__(f"{decision.code.value}: {decision.reason}")
        self.decision = decision
        self.code = decision.code


class CatalogMismatch(RuntimeError):
    """The guard's catalog fingerprint differs from the worker's (see :attr:`BudgetGuard.catalog_matches`)."""


@dataclass
class _Customer:
    reserved: dict[str, Reservation] = field(default_factory=dict)
    #: Settled calls the worker has not counted yet: event_id -> (credits, settled at, monotonic).
    pending: dict[str, tuple[Decimal, float]] = field(default_factory=dict)
    #: Ids the worker has counted recently: a settle arriving after its count adds nothing.
    counted: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def in_flight(self) -> Decimal:
        return sum((r.credits for r in self.reserved.values()), ZERO) + sum((c for c, _ in self.pending.values()), ZERO)


class EnforcementView:
    """The latest :class:`EnforcementState` per key, kept current by a background consumer.

    A topic that does not exist yet (a guard started before the worker) is looked
    for again every ``rediscover_seconds``, and so are partitions added later.
    """

    def __init__(
        self, kafka: KafkaSettings, topic: str, on_update: object = None, *, rediscover_seconds: float = 1.0,
        lock: threading.Lock | None = None,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.states: dict[str, EnforcementState] = {}
        self.ready = threading.Event()
        self.rediscover_seconds = rediscover_seconds
        #: The worker's catalog fingerprint, from the latest state that carries one.
        self.catalog_fingerprint = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_update = on_update
        #: Held while a state is stored and ``on_update`` runs: a guard deciding under the same
        #: lock never sees a new state's spend with its counted calls still in flight (or the reverse).
        self._lock = lock or threading.Lock()

    def start(self) -> EnforcementView:
        self._thread = threading.Thread(target=self._run, name="meterstream-enforcement-view", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def age(self, now: datetime) -> float | None:
        """Seconds since the worker's view was current (its heartbeat); None before any message."""
        beat = self.states.get(HEARTBEAT_KEY)
        if beat is None:
            return None
        return max(0.0, (now - beat.updated_at).total_seconds())

    def _partitions(self, consumer: Consumer) -> list[int]:
        metadata = consumer.list_topics(self.topic, timeout=10)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            return []
        return sorted(topic.partitions)

    def _run(self) -> None:
        consumer = Consumer(
            {
                **self.kafka.confluent_config(),
                "group.id": "meterstream-guard",  # never committed: every guard reads the whole view
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "topic.metadata.refresh.interval.ms": 5000,
            }
        )
        try:
            assigned: list[int] = []
            behind: set[int] = set()
            ends: dict[int, int] = {}
            next_look = 0.0
            while not self._stop.is_set():
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + self.rediscover_seconds * (1 if not assigned else 10)
                    try:
                        partitions = self._partitions(consumer)
                        new = [p for p in partitions if p not in assigned]
                        # A topic just created may have no leader yet: then this raises, and the
                        # next look (a second later) tries again.
                        new_ends = {
                            p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1] for p in new
                        }
                    except Exception as exc:  # the broker is away or the topic is not ready: look again later
                        log.debug("enforcement topic %s not readable yet: %s", self.topic, exc)
                        new, next_look = [], time.monotonic() + self.rediscover_seconds
                    if new:
                        ends.update(new_ends)
                        behind.update(p for p in new if new_ends[p] > 0)
                        assigned = sorted(set(assigned) | set(new))
                        # Only the new partitions, from their start: the others keep their position
                        # (re-reading them would briefly put older states back in the view).
                        consumer.incremental_assign([TopicPartition(self.topic, p, 0) for p in new])
                    if not behind:
                        self.ready.set()  # nothing to catch up with (maybe no topic yet: keep looking)
                    if not assigned:
                        self._stop.wait(0.2)
                        continue
                message = consumer.poll(0.2)
                if message is None or message.error():
                    continue
                partition, offset = message.partition(), message.offset()
                try:
                    state = EnforcementState.model_validate_json(message.value() or b"")
                except ValueError:
                    log.warning("unreadable enforcement state at offset %d", message.offset())
                    continue
                with self._lock:
                    self.states[state.key] = state
                    if self._on_update is not None:
                        self._on_update(state)  # type: ignore[operator]
                if state.catalog_fingerprint:
                    self.catalog_fingerprint = state.catalog_fingerprint
                if behind and offset is not None and offset + 1 >= ends.get(partition or 0, 0):
                    behind.discard(partition)
                    if not behind:
                        self.ready.set()
        except Exception:  # the guard must never take the service down with it
            log.exception("enforcement view stopped")
        finally:
            consumer.close()


class BudgetGuard:
    """Local decisions with reservations for calls in flight, shared through the ledger when configured."""

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        *,
        catalog: Catalog | None = None,
        ledger: RedisLedger | None = None,
        use_configured_ledger: bool = True,
        fail_closed: bool = False,
        max_view_age: float | None = None,
        reservation_ttl: float | None = None,
        settled_ttl: float | None = None,
        now: Clock = utc_now,
    ) -> None:
        """``ledger``: the shared reservation ledger (default: ``METERSTREAM_LEDGER__REDIS_URL`` if set).

        ``fail_closed`` blocks customers the view knows nothing about; ``max_view_age``
        (seconds) blocks every call while the worker's view is older than that.
        """
        settings = get_settings()
        self.kafka = kafka or settings.kafka
        self.catalog = catalog or load_catalog(settings.worker.plans_file)
        self.fingerprint = self.catalog.fingerprint()
        if ledger is None and use_configured_ledger:
            ledger = RedisLedger.from_settings(settings.ledger)
        self.ledger = ledger
        self.fail_closed = fail_closed
        self.max_view_age = max_view_age
        self.reservation_ttl = reservation_ttl or (ledger.reservation_ttl if ledger else settings.ledger.reservation_ttl_seconds)
        self.settled_ttl = settled_ttl or settings.ledger.settled_ttl_seconds
        self._now = now
        self._lock = threading.Lock()
        self._customers: dict[str, _Customer] = {}
        self._mismatch_logged = False
        self.view = EnforcementView(
            self.kafka, Topics.from_settings(self.kafka).enforcement.name, self._on_state, lock=self._lock
        )

    def start(self, ready_timeout: float = 30.0) -> BudgetGuard:
        """Start following the topic and wait (bounded) until the view has caught up."""
        self.view.start()
        if not self.view.ready.wait(ready_timeout):
            log.warning("enforcement view not caught up after %.0f s; deciding on what it has", ready_timeout)
        if self.catalog_matches is False:
            log.error("guard catalog %s differs from the worker's %s: hard caps block until they match",
                      self.fingerprint, self.view.catalog_fingerprint)  # fmt: skip
        return self

    def stop(self) -> None:
        self.view.stop()

    def __enter__(self) -> BudgetGuard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the guard knows ---------------------------------------------------------------------

    def view_age(self) -> float | None:
        """Seconds since the worker's published view was current; None if nothing was received."""
        return self.view.age(self._now())

    @property
    def catalog_matches(self) -> bool | None:
        """Whether this guard prices like the worker (None until the worker has said which catalog)."""
        theirs = self.view.catalog_fingerprint
        return None if not theirs else theirs == self.fingerprint

    def assert_catalog_matches(self) -> None:
        """Raise :class:`CatalogMismatch` if the worker has published a different catalog fingerprint."""
        if self.catalog_matches is False:
            raise CatalogMismatch(
                f"this guard's price catalog ({self.fingerprint}) is not the worker's ({self.view.catalog_fingerprint})"
            )

    def in_flight(self, customer_id: str) -> Decimal:
        """Credits this process holds for the customer: reservations and settled calls not yet counted."""
        with self._lock:
            account = self._customers.get(customer_id)
            if account is None:
                return ZERO
            self._expire(account)
            return account.in_flight()

    def estimate(self, customer_id: str, model: str, input_tokens: int, output_tokens: int) -> Decimal:
        probe = UsageEvent(
            event_id="guard-estimate", customer_id=customer_id, occurred_at=self._now(),
            model=model, input_tokens=input_tokens, output_tokens=output_tokens,
        )  # fmt: skip
        return self.catalog.rate(probe).credits

    # -- decisions ---------------------------------------------------------------------------------

    def require(self, customer_id: str, model: str, **kwargs: object) -> GuardDecision:
        """:meth:`check`, raising :class:`BudgetExceeded` when the call is blocked."""
        decision = self.check(customer_id, model, **kwargs)  # type: ignore[arg-type]
        if decision.blocked:
            raise BudgetExceeded(decision)
        return decision

    def check(
        self,
        customer_id: str,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        run_id: str = "",
        hold_seconds: float | None = None,
    ) -> GuardDecision:
        """Decide before a call; an allowed call holds a reservation until settled or released.

        ``output_tokens`` is required: pass the call's ``max_tokens`` (an upper bound), or the
        estimate is too low and the cap can be passed by the difference. ``hold_seconds``:
        how long the reservation outlives a caller that never settles (default 60 s).
        """
        if output_tokens is None:
            raise TypeError("check() needs output_tokens: pass the call's max_tokens")
        now = self._now()
        # The customer's billing period, as the worker labels its state (an anniversary customer's
        # runs from its anchor day, and its label is the month it starts in).
        period = self.catalog.billing_period(customer_id, now)
        if self.max_view_age is not None:
            age = self.view.age(now)
            if age is None or age > self.max_view_age:
                seen = "no heartbeat from the worker yet" if age is None else f"{age:.1f} s old"
                return GuardDecision(Decision.BLOCK, model, Reason.STALE_VIEW,
                                     f"the enforcement view is {seen} (max {self.max_view_age} s)")  # fmt: skip
        run_state = self.view.states.get(f"{customer_id}|{run_id}") if run_id else None
        if run_state is not None and run_state.decision is Decision.BLOCK:
            return GuardDecision(Decision.BLOCK, model, Reason.RUN_CAP_REACHED, f"run {run_id}: {run_state.reason}")
        state = self._state_for(customer_id, period, now)
        if state is None and self.fail_closed:
            return GuardDecision(Decision.BLOCK, model, Reason.NO_STATE,
                                 f"no enforcement state for {customer_id} (fail closed)")  # fmt: skip
        if state is not None and state.decision is Decision.BLOCK:
            return GuardDecision(Decision.BLOCK, model, Reason.BUDGET_EXHAUSTED, state.reason)
        hard_cap = state is not None and state.remaining_credits is not None and state.at_cap is not ThresholdAction.ALERT
        if hard_cap and self.catalog_matches is False:
            if not self._mismatch_logged:
                self._mismatch_logged = True
                log.error("guard catalog %s differs from the worker's %s: hard caps block until they match",
                          self.fingerprint, self.view.catalog_fingerprint)  # fmt: skip
            return GuardDecision(Decision.BLOCK, model, Reason.CATALOG_MISMATCH,
                                 f"this guard's price catalog ({self.fingerprint}) is not the worker's "
                                 f"({self.view.catalog_fingerprint}): estimates cannot keep the cap")  # fmt: skip

        decision, code = Decision.OK, Reason.WITHIN_BUDGET if state is not None else Reason.NO_BUDGET
        reason = state.reason if state is not None else f"no budget known for {customer_id}"
        if state is not None and state.decision is Decision.WARN:
            decision, code = Decision.WARN, Reason.THRESHOLD_REACHED
        for source in (run_state, state):
            if source is not None and source.decision is Decision.DOWNGRADE and source.downgrade_to:
                decision, code, model = Decision.DOWNGRADE, Reason.DOWNGRADED, source.downgrade_to
                reason = f"downgraded to {model}: {source.reason}"
                break
        try:
            estimate = self.estimate(customer_id, model, input_tokens, output_tokens)
        except (RatingError, PlanError) as exc:
            return GuardDecision(Decision.BLOCK, model, Reason.CANNOT_PRICE, f"cannot price this call: {exc}")
        hold = hold_seconds if hold_seconds is not None else self.reservation_ttl
        if not hard_cap:
            # No hard cap: nothing to hold against once the call is settled.
            return self._held(decision, code, reason, customer_id, period, run_id, model, estimate, hold,
                              uuid.uuid4().hex, in_ledger=False, capped=False)  # fmt: skip
        assert state is not None and state.cap_credits is not None and state.remaining_credits is not None
        fits, available, in_ledger, call_id = self._try_reserve(state, customer_id, period, estimate, hold)
        if fits is None:
            return GuardDecision(Decision.BLOCK, model, Reason.LEDGER_UNAVAILABLE,
                                 "the reservation ledger is unreachable and this budget fails closed", estimate)  # fmt: skip
        if fits:
            return self._held(decision, code, reason, customer_id, period, run_id, model, estimate, hold, call_id,
                              in_ledger=in_ledger)  # fmt: skip
        if state.at_cap is ThresholdAction.DOWNGRADE and state.downgrade_to:
            # At a downgrade cap calls go on with the cheaper model: held (so they count), against no cap.
            if model != state.downgrade_to:
                model = state.downgrade_to
                try:
                    estimate = self.estimate(customer_id, model, input_tokens, output_tokens)
                except (RatingError, PlanError) as exc:
                    return GuardDecision(Decision.BLOCK, model, Reason.CANNOT_PRICE, f"cannot price this call: {exc}")
            reason = f"downgraded to {model}: the budget is nearly used"
            if in_ledger:
                downgraded_call, res = self._ledger_reserve(customer_id, period, estimate, _NO_CAP, hold)
                if res is not None:
                    return self._held(Decision.DOWNGRADE, Reason.DOWNGRADED, reason, customer_id, period, run_id,
                                      model, estimate, hold, downgraded_call, in_ledger=True)  # fmt: skip
            return self._held(Decision.DOWNGRADE, Reason.DOWNGRADED, reason, customer_id, period, run_id,
                              model, estimate, hold, uuid.uuid4().hex, in_ledger=False)  # fmt: skip
        return GuardDecision(
            Decision.BLOCK, model, Reason.WOULD_EXCEED_BUDGET,
            f"would exceed the monthly budget of {state.cap_credits} budget credits: {available:.4f} left "
            f"after calls in flight, this call needs about {estimate:.4f}",
            estimate,
        )  # fmt: skip

    def settle(self, decision: GuardDecision, event: UsageEvent) -> None:
        """The call happened and ``event`` records it: hold its actual credits until the worker counts it."""
        reservation = decision.reservation
        if reservation is None:
            return
        try:
            actual = self.catalog.rate(event).credits
        except (RatingError, PlanError):
            actual = reservation.credits
        if reservation.in_ledger and self.ledger is not None:
            try:
                self.ledger.settle(reservation.customer_id, reservation.period, reservation.id, event.event_id, actual)
            except LedgerUnavailable as exc:
                # The worker still counts the event; the reservation expires with its hold.
                log.warning("could not settle call %s in the ledger: %s", reservation.id, exc)
        with self._lock:
            account = self._customers.setdefault(reservation.customer_id, _Customer())
            account.reserved.pop(reservation.id, None)
            if reservation.capped and event.event_id not in account.counted:
                account.pending[event.event_id] = (actual, time.monotonic())
        decision.reservation = None

    def release(self, decision: GuardDecision) -> None:
        """The call did not happen: free its reservation."""
        reservation = decision.reservation
        if reservation is None:
            return
        if reservation.in_ledger and self.ledger is not None:
            try:
                self.ledger.release(reservation.customer_id, reservation.period, reservation.id)
            except LedgerUnavailable as exc:
                log.warning("could not release call %s in the ledger: %s", reservation.id, exc)
        with self._lock:
            account = self._customers.get(reservation.customer_id)
            if account is not None:
                account.reserved.pop(reservation.id, None)
        decision.reservation = None

    # -- internals ----------------------------------------------------------------------------------

    def _state_for(self, customer_id: str, period: str, now: datetime) -> EnforcementState | None:
        """The customer's state for this period; a customer without one gets the ``default`` budget's."""
        state = self.view.states.get(customer_id)
        if state is not None and state.period == period:
            return state
        default = self.view.states.get(DEFAULT_BUDGET_KEY)
        base = state if state is not None else default
        if base is None:
            return None
        if base.cap_credits is None:
            return base
        # A new period (or a customer first seen now): nothing counted yet this period.
        return base.model_copy(update={
            "key": customer_id, "customer_id": customer_id, "period": period, "spent_credits": ZERO,
            "remaining_credits": base.cap_credits, "decision": Decision.OK, "counted_ids": (),
            "reason": "0.0% of the monthly budget used",
        })  # fmt: skip

    def _ledger_reserve(
        self, customer_id: str, period: str, estimate: Decimal, cap: Decimal, hold: float
    ) -> tuple[str, object | None]:
        assert self.ledger is not None
        try:
            return self.ledger.reserve(customer_id, period, estimate, cap, ttl=hold)
        except LedgerUnavailable:
            return "", None

    def _try_reserve(
        self, state: EnforcementState, customer_id: str, period: str, estimate: Decimal, hold: float
    ) -> tuple[bool | None, Decimal, bool, str]:
        """(fits, available, held in the ledger, call id); fits None: ledger down and the budget fails closed."""
        assert state.cap_credits is not None and state.remaining_credits is not None
        if self.ledger is not None:
            try:
                call_id, reserved = self.ledger.reserve(customer_id, period, estimate, state.cap_credits, ttl=hold)
                return reserved.ok, reserved.available, True, call_id
            except LedgerUnavailable as exc:
                if state.fail_closed:
                    return None, ZERO, False, ""
                log.warning("reservation ledger unreachable (%s); deciding %s within this process", exc, customer_id)
        with self._lock:
            # The state again, under the lock the view stores states under (see EnforcementView).
            state = self._state_for(customer_id, period, self._now()) or state
            assert state.remaining_credits is not None
            account = self._customers.setdefault(customer_id, _Customer())
            self._expire(account)
            available = state.remaining_credits - account.in_flight()
            if estimate > available:
                return False, available, False, ""
            # Reserved under the lock, so two threads cannot both take the last credits.
            call_id = uuid.uuid4().hex
            account.reserved[call_id] = Reservation(call_id, customer_id, period, "", estimate, time.monotonic() + hold)
            return True, available - estimate, False, call_id

    def _held(
        self, decision: Decision, code: Reason, reason: str, customer_id: str, period: str, run_id: str,
        model: str, estimate: Decimal, hold: float, call_id: str, *, in_ledger: bool, capped: bool = True,
    ) -> GuardDecision:  # fmt: skip
        reservation = Reservation(call_id, customer_id, period, run_id, estimate, time.monotonic() + hold, in_ledger,
                                  capped)  # fmt: skip
        with self._lock:
            self._customers.setdefault(customer_id, _Customer()).reserved[call_id] = reservation
        return GuardDecision(decision, model, code, reason, estimate, reservation)

    def _on_state(self, state: EnforcementState) -> None:
        """A new state arrived (called by the view with ``self._lock`` held): release what it counts."""
        if state.run_id or not state.counted_ids:
            return
        account = self._customers.get(state.customer_id)
        if account is None:  # this guard has not checked a call of the customer
            return
        for event_id in state.counted_ids:
            account.pending.pop(event_id, None)
            account.counted[event_id] = None
        while len(account.counted) > 20_000:
            account.counted.popitem(last=False)

    def _expire(self, account: _Customer) -> None:
        now = time.monotonic()
        for rid in [rid for rid, r in account.reserved.items() if r.expires < now]:
            del account.reserved[rid]
        cutoff = now - self.settled_ttl
        for event_id in [e for e, (_, at) in account.pending.items() if at < cutoff]:
            del account.pending[event_id]
