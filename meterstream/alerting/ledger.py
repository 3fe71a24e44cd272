"""The forwarder's durable record of what it has delivered: one small SQLite file.

One row per ``alert_id``, in one of three states:

``sending``
    written (and fsynced) *before* the first POST of an alert. A row still in this
    state when the alert is seen again means a previous run stopped after a POST
    may have reached the receiver but before its answer was recorded; the alert
    is sent again with the same ``Idempotency-Key``.
``delivered``
    written the moment a POST was answered 2xx, before anything else happens. An
    alert in this state is never POSTed again, whatever the topic holds.
``dead``
    a permanent failure, or retries exhausted (see :mod:`meterstream.alerting.webhook`);
    the alert is in the dead-letter file, and only ``meterstream alerts redeliver``
    sends it again (through ``sending``, like a first delivery).

``synchronous=FULL`` with the write-ahead log makes every state change durable
when :meth:`DeliveryLedger` returns. An exclusive lock on ``<ledger>.lock`` keeps
a second forwarder off the same ledger: two processes sharing one ledger could
both POST an alert that neither had recorded yet.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

from meterstream.clock import utc_now
from meterstream.schemas.records import BudgetAlert


class LedgerError(RuntimeError):
    pass


class DeliveryState(StrEnum):
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True)
class LedgerEntry:
    alert_id: str
    state: DeliveryState
    attempts: int
    status: int | None
    detail: str
    updated_at: str


_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    alert_id          TEXT PRIMARY KEY,
    state             TEXT NOT NULL CHECK (state IN ('sending', 'delivered', 'dead')),
    customer_id       TEXT NOT NULL,
    period            TEXT NOT NULL,
    threshold_percent INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    status            INTEGER,
    detail            TEXT NOT NULL DEFAULT '',
    updated_at        TEXT NOT NULL
)
"""


def _now() -> str:
    return utc_now().isoformat(timespec="milliseconds")


class DeliveryLedger:
    """Delivered, dead and in-flight alert ids, durable across crashes; one process at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file: IO[str] | None = open(path.with_name(path.name + ".lock"), "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            self._lock_file = None
            raise LedgerError(f"the delivery ledger {path} is in use by {holder}; one forwarder per ledger") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()}\n")
        self._lock_file.flush()
        # isolation_level=None: every statement commits on its own, so each state change is durable on return.
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def __enter__(self) -> DeliveryLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, alert_id: str) -> LedgerEntry | None:
        row = self._db.execute(
            "SELECT alert_id, state, attempts, status, detail, updated_at FROM deliveries WHERE alert_id = ?",
            (alert_id,),
        ).fetchone()
        if row is None:
            return None
        return LedgerEntry(row[0], DeliveryState(row[1]), row[2], row[3], row[4], row[5])

    def mark_sending(self, alert: BudgetAlert) -> None:
        """Record that a POST of ``alert`` is about to start (never downgrades delivered or dead)."""
        self._db.execute(
            "INSERT INTO deliveries (alert_id, state, customer_id, period, threshold_percent, updated_at) "
            "VALUES (?, 'sending', ?, ?, ?, ?) ON CONFLICT (alert_id) DO NOTHING",
            (alert.alert_id, alert.customer_id, alert.period, alert.threshold_percent, _now()),
        )

    def mark_delivered(self, alert_id: str, attempts: int, status: int) -> None:
        self._set(alert_id, DeliveryState.DELIVERED, attempts, status, "")

    def mark_dead(self, alert_id: str, attempts: int, status: int | None, reason: str) -> None:
        self._set(alert_id, DeliveryState.DEAD, attempts, status, reason)

    def reopen_dead(self, alert_id: str) -> bool:
        """Move a dead alert back to ``sending`` before a redelivery; False if it is not dead."""
        cursor = self._db.execute(
            "UPDATE deliveries SET state = 'sending', updated_at = ? WHERE alert_id = ? AND state = 'dead'",
            (_now(), alert_id),
        )
        return cursor.rowcount == 1

    def forget_sending(self, alert_id: str) -> None:
        """Drop an in-flight marker when no attempt can have reached the receiver (a clean stop)."""
        self._db.execute("DELETE FROM deliveries WHERE alert_id = ? AND state = 'sending'", (alert_id,))

    def in_state(self, state: DeliveryState) -> list[LedgerEntry]:
        rows = self._db.execute(
            "SELECT alert_id, state, attempts, status, detail, updated_at FROM deliveries WHERE state = ? "
            "ORDER BY updated_at, alert_id",
            (state.value,),
        ).fetchall()
        return [LedgerEntry(r[0], DeliveryState(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    def _set(self, alert_id: str, state: DeliveryState, attempts: int, status: int | None, detail: str) -> None:
        cursor = self._db.execute(
            "UPDATE deliveries SET state = ?, attempts = ?, status = ?, detail = ?, updated_at = ? "
            "WHERE alert_id = ?",
            (state.value, attempts, status, detail, _now(), alert_id),
        )
        if cursor.rowcount != 1:
            raise LedgerError(f"{alert_id} was not marked as sending before its outcome was recorded")
