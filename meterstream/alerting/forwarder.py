"""``meterstream alerts forward``: each budget alert POSTed to a webhook, at most once.

For each message of ``budget-alerts``, in partition order, the forwarder:

1. decodes it; a value that is not a :class:`BudgetAlert` goes to the
   dead-letter file (with its bytes) and is skipped;
2. looks the ``alert_id`` up in the ledger (:mod:`meterstream.alerting.ledger`):
   ``delivered`` or ``dead`` means skip. This is what drops a repeat of the
   same alert on the topic and what a restart re-reads;
3. records ``sending`` (durably) and POSTs, retrying per
   :mod:`meterstream.alerting.webhook`;
4. on a 2xx answer, records ``delivered`` at once (one fsynced SQLite update,
   before anything else); on a permanent failure or after the last attempt,
   appends the alert and the reason to the dead-letter file, then records ``dead``;
5. commits the message's offset (synchronously). Offsets only save re-reading:
   the ledger, not the offset, decides what is sent.

**The guarantee.** An alert answered 2xx is recorded before the forwarder does
anything else, so a stop, restart, rebalance or repeat on the topic never POSTs
it again. SIGINT/SIGTERM only set a flag that is checked between alerts and
between retries, never between a POST and its record. The one window left is
a process death (SIGKILL, OOM, power loss) after the receiver accepted a POST
and before the ``delivered`` update reached the disk: the next run finds the
alert still ``sending``, says so in a warning, and POSTs it again with the same
``Idempotency-Key`` — the only case in which a receiver sees an accepted alert
twice, and the key lets it drop the repeat. (A request that timed out after
it was sent is retried the same way; HTTP cannot tell whether it arrived.)

Dead letters: ``<state_dir>/<group>.dead-letters.jsonl``, one JSON object per
line (``reason``, ``status``, ``attempts``, ``alert`` or base64 ``raw``, and
the source topic/partition/offset), appended and fsynced before the ledger
says ``dead``. They are not retried automatically: once the cause is fixed,
``meterstream alerts redeliver`` (:meth:`AlertForwarder.redeliver_dead`) sends
each dead alert again under the same rules, and the file keeps its history.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from faust.app.base import BootStrategy
from pydantic import SecretStr

from meterstream.alerting.ledger import DeliveryLedger, DeliveryState
from meterstream.alerting.source import AlertMessage, AlertSourceError, decode_alert, source_partitions
from meterstream.alerting.webhook import Delivery, Outcome, RetryPolicy, WebhookSender
from meterstream.clock import utc_now
from meterstream.config import AlertForwarderSettings, KafkaSettings
from meterstream.kafka_clients import faust_broker, faust_credentials
from meterstream.schemas.records import BudgetAlert

log = logging.getLogger(__name__)


class ForwarderError(RuntimeError):
    pass


def secret_from_env(name: str) -> SecretStr:
    """The signing secret from the environment variable ``name``; the error names the variable only."""
    value = os.environ.get(name, "")
    if not value:
        raise ForwarderError(f"the signing secret variable {name} is not set or empty")
    return SecretStr(value)


def ledger_path(settings: AlertForwarderSettings, group_id: str) -> Path:
    return settings.state_dir / f"{group_id}.sqlite3"


def dead_letter_path(settings: AlertForwarderSettings, group_id: str) -> Path:
    return settings.state_dir / f"{group_id}.dead-letters.jsonl"


@dataclass
class ForwarderStats:
    messages: int = 0
    delivered: int = 0
    #: Alerts the ledger already had as delivered or dead (repeats on the topic, re-reads).
    skipped: int = 0
    dead_lettered: int = 0
    unreadable: int = 0
    #: Alerts found ``sending`` (a previous run died mid-delivery) and POSTed again.
    resent_after_crash: int = 0
    attempts: int = 0
    stopped_by: str = ""


@dataclass(frozen=True)
class Handled:
    """What happened to one message, for the CLI to print."""

    message: AlertMessage
    action: str  # delivered | skipped | dead-lettered | unreadable | abandoned
    delivery: Delivery | None = None
    detail: str = ""


class DeadLetterFile:
    """Append-only JSON Lines, each line flushed and fsynced before the ledger says ``dead``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, message: AlertMessage, reason: str, *, status: int | None = None, attempts: int = 0) -> None:
        record: dict[str, Any] = {
            "failed_at": utc_now().isoformat(timespec="milliseconds"),
            "reason": reason,
            "status": status,
            "attempts": attempts,
            "alert_id": message.alert.alert_id if message.alert else None,
            "alert": message.alert.model_dump(mode="json") if message.alert else None,
            "raw": None if message.alert else base64.b64encode(message.raw).decode("ascii"),
            "source_topic": message.topic,
            "source_partition": message.partition,
            "source_offset": message.offset,
        }
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class AlertForwarder:
    """Ledger + webhook + dead letters for one consumer group; :meth:`handle` is one message."""

    def __init__(
        self,
        settings: AlertForwarderSettings,
        url: str,
        *,
        group_id: str,
        secret: SecretStr | None,
        stop: threading.Event,
        transport: Any = None,
    ) -> None:
        self.group_id = group_id
        self.stop = stop
        self.ledger = DeliveryLedger(ledger_path(settings, group_id))
        self.dead_letters = DeadLetterFile(dead_letter_path(settings, group_id))
        self.sender = WebhookSender(
            url,
            RetryPolicy(settings.max_attempts, settings.backoff_initial, settings.backoff_max),
            secret=secret,
            request_timeout=settings.request_timeout,
            stop=stop,
            transport=transport,
        )
        self.stats = ForwarderStats()

    def close(self) -> None:
        self.sender.close()
        self.ledger.close()

    def redeliver_dead(self, on_handled: Callable[[Handled], None] | None = None) -> ForwarderStats:
        """Send every alert the ledger has as dead once more (the forwarder must not be running)."""
        latest: dict[str, AlertMessage] = {}
        if self.dead_letters.path.exists():
            for line in self.dead_letters.path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record.get("alert") is not None:
                    latest[record["alert_id"]] = AlertMessage(
                        BudgetAlert.model_validate(record["alert"]), "", b"", record["source_topic"],
                        record["source_partition"], record["source_offset"],
                    )  # fmt: skip
        for entry in self.ledger.in_state(DeliveryState.DEAD):
            if self.stop.is_set():
                break
            message = latest.get(entry.alert_id)
            if message is None:
                log.warning("alert %s is dead in the ledger but not in %s; skipped", entry.alert_id,
                            self.dead_letters.path)  # fmt: skip
                continue
            self.ledger.reopen_dead(entry.alert_id)
            handled = self._deliver(message, message.alert, keep_marker=True)  # type: ignore[arg-type]
            if handled.action == "abandoned":  # stopped between attempts: dead again, for the next redeliver
                self.ledger.mark_dead(entry.alert_id, entry.attempts, entry.status, entry.detail)
            self.stats.messages += 1
            if on_handled is not None:
                on_handled(handled)
        return self.stats

    def handle(self, message: AlertMessage) -> Handled:
        alert = message.alert
        if alert is None:
            self.dead_letters.append(message, message.reason)
            self.stats.unreadable += 1
            return Handled(message, "unreadable", detail=message.reason)
        known = self.ledger.get(alert.alert_id)
        if known is not None and known.state is not DeliveryState.SENDING:
            self.stats.skipped += 1
            return Handled(message, "skipped", detail=f"already {known.state.value}")
        if known is not None:
            self.stats.resent_after_crash += 1
            log.warning(
                "alert %s was being delivered when a previous run stopped and may have arrived; "
                "sending it again with the same Idempotency-Key", alert.alert_id,
            )  # fmt: skip
        else:
            self.ledger.mark_sending(alert)
        return self._deliver(message, alert, keep_marker=known is not None)

    def _deliver(self, message: AlertMessage, alert: BudgetAlert, *, keep_marker: bool) -> Handled:
        """POST an alert already marked ``sending`` and record the outcome.

        If a stop abandons it, the ``sending`` marker is dropped only when no attempt
        can have reached the receiver and ``keep_marker`` is false (the marker is ours).
        """
        delivery = self.sender.deliver(alert)
        if delivery.outcome is Outcome.DELIVERED:
            # First thing after the 2xx: this update is the end of the post-then-crash window.
            self.ledger.mark_delivered(alert.alert_id, delivery.attempts, delivery.status or 0)
        self.stats.attempts += delivery.attempts
        if delivery.outcome is Outcome.DELIVERED:
            self.stats.delivered += 1
            return Handled(message, "delivered", delivery)
        if delivery.outcome is Outcome.FAILED:
            self.dead_letters.append(message, delivery.reason, status=delivery.status, attempts=delivery.attempts)
            self.ledger.mark_dead(alert.alert_id, delivery.attempts, delivery.status, delivery.reason)
            self.stats.dead_lettered += 1
            return Handled(message, "dead-lettered", delivery, delivery.reason)
        if not keep_marker and not delivery.maybe_received:
            self.ledger.forget_sending(alert.alert_id)  # no attempt reached the receiver: nothing to warn about
        return Handled(message, "abandoned", delivery, delivery.reason)


def run_forwarder(
    kafka: KafkaSettings,
    settings: AlertForwarderSettings,
    topic: str,
    *,
    url: str,
    group_id: str,
    secret: SecretStr | None = None,
    max_messages: int | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    on_handled: Callable[[Handled], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    transport: Any = None,
) -> ForwarderStats:
    """Forward alerts until ``stop``, or ``max_messages`` messages handled, or ``timeout`` seconds.

    The consumer group ``group_id`` starts at ``settings.start_at`` when it has
    no committed offsets. A message whose alert was abandoned by a stop is not
    committed, so the next run takes it up again.
    """
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(_forward(
            kafka, settings, topic, url=url, group_id=group_id, secret=secret, max_messages=max_messages,
            timeout=timeout, stop=stop or threading.Event(), on_handled=on_handled, on_ready=on_ready,
            transport=transport,
        ))  # fmt: skip
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def forwarder_app(kafka: KafkaSettings, settings: AlertForwarderSettings, group_id: str) -> faust.App:
    """The forwarder's Faust app: its consumer group is ``group_id``; nothing but the one agent.

    Faust runs the consumer here (group membership, rebalances, offsets committed as
    alerts are acknowledged); the forwarder acknowledges an alert only once the ledger
    has recorded its outcome, so an alert abandoned by a stop is read again.
    """
    app = faust.App(
        group_id,
        broker=faust_broker(kafka),
        broker_credentials=faust_credentials(kafka),
        consumer_auto_offset_reset=settings.start_at,
        broker_session_timeout=settings.session_timeout,
        # On stop, commit what was acknowledged instead of waiting for every message read to be
        # acknowledged (an abandoned alert never is, on purpose).
        stream_wait_empty=False,
        # One agent, no tables: no leader election, no web server.
        topic_disable_leader=True,
        web_enabled=False,
        # Faust creates it at every start (App.on_first_start): beside the ledger, not in the cwd.
        datadir=str(settings.state_dir / f"{group_id}.faust"),
    )
    # The forwarder only reads: no producer.
    app.boot_strategy = BootStrategy(app, enable_kafka_producer=False, enable_web=False)
    return app


async def _forward(
    kafka: KafkaSettings,
    settings: AlertForwarderSettings,
    topic: str,
    *,
    url: str,
    group_id: str,
    secret: SecretStr | None,
    max_messages: int | None,
    timeout: float | None,
    stop: threading.Event,
    on_handled: Callable[[Handled], None] | None,
    on_ready: Callable[[], None] | None,
    transport: Any,
) -> ForwarderStats:
    deadline = time.monotonic() + timeout if timeout is not None else None
    # The ledger (SQLite) and the HTTP client live in one thread: every forwarder call runs there.
    calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alert-forwarder")
    loop = asyncio.get_running_loop()
    forwarder = await loop.run_in_executor(calls, lambda: AlertForwarder(
        settings, url, group_id=group_id, secret=secret, stop=stop, transport=transport))  # fmt: skip
    stats = forwarder.stats
    app: faust.App | None = None
    try:
        try:
            await source_partitions(kafka, topic)
        except AlertSourceError as exc:
            raise ForwarderError(str(exc)) from exc
        app = forwarder_app(kafka, settings, group_id)
        source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        closing = asyncio.Event()
        busy = False
        #: What stopped the agent other than a stop (a ledger error, a closed stdout): raised below.
        failed: list[BaseException] = []

        @app.agent(source)
        async def forward(stream: Any) -> None:
            """One alert at a time, acknowledged (so committed) after its outcome is recorded."""
            nonlocal busy
            async for event in stream.noack().events():
                if closing.is_set() or stop.is_set():
                    continue  # not acknowledged: the next run reads it
                busy = True
                try:
                    m = event.message
                    message = decode_alert(m.value, m.topic, m.partition, m.offset)
                    handled = await loop.run_in_executor(calls, forwarder.handle, message)
                    if on_handled is not None:
                        on_handled(handled)
                    if handled.action == "abandoned":
                        stats.stopped_by = "signal"
                        closing.set()
                        continue
                    event.ack()
                    stats.messages += 1
                    if max_messages is not None and stats.messages >= max_messages:
                        stats.stopped_by = "max"
                        closing.set()
                except Exception as exc:  # not acknowledged: the next run reads it again
                    failed.append(exc)
                    closing.set()
                finally:
                    busy = False

        await app.start()
        if on_ready is not None:
            on_ready()
        while not (closing.is_set() and not busy):
            if app.crash_reason is not None:
                raise ForwarderError(f"reading {topic}: {app.crash_reason}")
            if not closing.is_set():
                if stop.is_set():
                    stats.stopped_by = "signal"
                    closing.set()
                elif deadline is not None and time.monotonic() >= deadline:
                    stats.stopped_by = "timeout"
                    closing.set()
            await asyncio.sleep(0.1)
        if failed:
            raise failed[0]
    finally:
        if app is not None:
            await app.stop()
        await loop.run_in_executor(calls, forwarder.close)
        calls.shutdown(wait=True)
    return stats


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set ``stop`` instead of raising, so no exception lands between a POST and its record."""

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
