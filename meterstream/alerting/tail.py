"""``meterstream alerts tail``: follow the budget-alerts topic and show each alert to a person.

An alert repeated on the topic (the same deterministic ``alert_id``, e.g. from
two workers recovering at once) is shown once per tail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone

from meterstream.alerting.source import AlertMessage, follow_topic
from meterstream.config import KafkaSettings
from meterstream.pricing.money import round_money
from meterstream.schemas.records import BudgetAlert


def format_alert(alert: BudgetAlert) -> str:
    """One line for people: time (UTC), customer, period, threshold, spent / budget credits, action."""
    crossed = alert.crossed_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    spent, budget = round_money(alert.spent_credits), round_money(alert.budget_credits)
    return (
        f"{crossed}  {alert.customer_id}  {alert.period}  {alert.threshold_percent:>3}%  "
        f"{spent:,} / {budget:,} credits  {alert.action.value}"
    )


@dataclass(frozen=True)
class TailResult:
    shown: int
    #: The timeout ended the tail (not --max, not a stop request).
    timed_out: bool


def tail_alerts(
    kafka: KafkaSettings,
    topic: str,
    *,
    emit: Callable[[BudgetAlert], None],
    from_beginning: bool = False,
    customer: str | None = None,
    max_alerts: int | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    on_unreadable: Callable[[AlertMessage], None] | None = None,
) -> TailResult:
    """Call ``emit`` for each new alert (of ``customer``) until ``max_alerts``, ``timeout`` seconds or ``stop``."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout if timeout is not None else None
    seen: set[str] = set()
    shown = 0
    if max_alerts == 0:
        return TailResult(0, False)
    for message in follow_topic(
        kafka, topic, from_beginning=from_beginning, stop=stop, deadline=deadline, on_ready=on_ready
    ):
        alert = message.alert
        if alert is None:
            if on_unreadable is not None:
                on_unreadable(message)
            continue
        if alert.alert_id in seen or (customer is not None and alert.customer_id != customer):
            continue
        seen.add(alert.alert_id)
        emit(alert)
        shown += 1
        if max_alerts is not None and shown >= max_alerts:
            return TailResult(shown, False)
    return TailResult(shown, deadline is not None and not stop.is_set() and time.monotonic() >= deadline)
