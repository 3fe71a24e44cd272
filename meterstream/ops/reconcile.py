"""Reconcile one billing period: what Kafka holds, what ClickHouse stored, what the invoices total.

- **Kafka**: the usage and outcome topics are read to their high watermarks and each
  message decoded with :func:`~meterstream.stream_processors.decode.decode_event`. Valid
  events whose period is the one asked form the expected set, distinct by
  ``(customer_id, event_id)`` (first occurrence wins, as in the worker); each is rated
  offline with the catalog. Invalid messages and events the catalog cannot price are
  counted (the worker dead-letters them); the dead-letter topic is counted separately.
- **Store**: ``events_raw FINAL`` and ``usage_rated FINAL`` rows of the period
  (saved query ``reconcile_rows``).
- **Invoices**: the sum of :func:`~meterstream.billing.invoice_from_store` totals of every
  customer with rated usage in the period (reported, not compared).

Differences: events priced offline but missing raw or rated in the store, events in the
store that Kafka does not hold, and per-customer credits that differ between the stored
rated rows and the offline rating. A low watermark above 0 means retention dropped old
messages; store rows of such events then show up as "extra" and the report says so.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from meterstream.clock import utc_now
from meterstream.config import Settings
from meterstream.ops.dlq import read_dead_letters
from meterstream.ops.kafka_read import TopicRead, read_topic
from meterstream.pricing.plans import Catalog, PlanError
from meterstream.pricing.rating import RatingError
from meterstream.stream_processors.decode import Rejection, decode_event, received_at
from meterstream.topics import Topics

log = logging.getLogger(__name__)

ZERO = Decimal(0)
#: Stored credits are Decimal(38, 18); offline figures are compared at that scale.
SCALE = Decimal(1).scaleb(-18)
Key = tuple[str, str]


@dataclass
class KafkaSide:
    events: dict[Key, Decimal] = field(default_factory=dict)  # priced events of the period -> credits
    unpriced: dict[Key, str] = field(default_factory=dict)  # valid events of the period the catalog cannot price
    messages: int = 0
    duplicates: int = 0  # messages repeating an event already seen (same customer and event id)
    invalid: int = 0  # messages decode_event rejects (the worker dead-letters them)
    other_periods: int = 0
    dead_letters: int = 0
    retention: list[str] = field(default_factory=list)  # topics whose low watermark is above 0
    lag: dict[str, int] = field(default_factory=dict)  # topic -> messages the worker's group has not committed
    #: (topic, partition) -> the group's committed offset (the low watermark where none).
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    #: (topic, partition) -> the commit time (ms) the worker recorded in the commit's metadata.
    committed_at: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Every message below the committed offsets, accounted for (see account()).
    accounting: dict[str, int] = field(default_factory=dict)
    unaccounted: list[str] = field(default_factory=list)  # "topic:partition@offset (why)"
    stuck: list[str] = field(default_factory=list)  # partitions whose group has not advanced in time


@dataclass
class StoreSide:
    raw: set[Key] = field(default_factory=set)
    rated: dict[Key, Decimal] = field(default_factory=dict)
    invoice_totals: dict[str, Decimal] = field(default_factory=dict)
    invoice_errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    period: str
    kafka: KafkaSide
    store: StoreSide
    missing_raw: list[Key]
    missing_rated: list[Key]
    extra: list[Key]  # in the store (raw or rated) but not on the topics
    raw_not_rated: list[Key]
    credit_mismatches: list[dict[str, Any]]

    @property
    def reconciled(self) -> bool:
        return not (
            self.missing_raw or self.missing_rated or self.extra or self.raw_not_rated or self.credit_mismatches
            or self.kafka.unaccounted or self.kafka.stuck
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        def keys(items: list[Key]) -> list[dict[str, str]]:
            return [{"customer_id": c, "event_id": e} for c, e in items]

        k, s = self.kafka, self.store
        return {
            "period": self.period,
            "reconciled": self.reconciled,
            "kafka": {
                "messages": k.messages, "events": len(k.events), "unpriced": len(k.unpriced),
                "duplicates": k.duplicates, "invalid": k.invalid, "other_periods": k.other_periods,
                "dead_letters": k.dead_letters, "usage_and_outcome_credits": _d(sum(k.events.values(), ZERO)),
                "retention_dropped": k.retention, "worker_lag": k.lag,
                "committed_accounting": k.accounting, "unaccounted": k.unaccounted, "stuck": k.stuck,
            },
            "store": {
                "raw_events": len(s.raw), "rated_rows": len(s.rated), "usage_and_outcome_credits": _d(sum(s.rated.values(), ZERO)),
                "customers": len({c for c, _ in s.rated}),
                "invoice_total": _d(sum(s.invoice_totals.values(), ZERO)),
                "invoice_totals": {c: str(v) for c, v in sorted(s.invoice_totals.items())},
                "invoice_errors": s.invoice_errors,
            },
            "missing_in_store": keys(sorted(set(self.missing_raw) | set(self.missing_rated))),
            "missing_raw": keys(self.missing_raw),
            "missing_rated": keys(self.missing_rated),
            "extra_in_store": keys(self.extra),
            "raw_not_rated": keys(self.raw_not_rated),
            "credit_mismatches": [
                {**m, "stored": _d(m["stored"]), "kafka": _d(m["kafka"]), "difference": _d(m["difference"])}
                for m in self.credit_mismatches
            ],
        }  # fmt: skip


def _d(value: Decimal) -> str:
    """Exact, without the store's trailing zeros: 90.990160000000000000 -> 90.99016."""
    return f"{value.normalize():f}"


def kafka_side(
    settings: Settings,
    catalog: Catalog,
    period: str,
    timeout: float = 60.0,
    *,
    stored_keys: set[Key] | None = None,
    now: datetime | None = None,
    stuck_after: timedelta = timedelta(minutes=5),
) -> KafkaSide:
    topics = Topics.from_settings(settings.kafka)
    side = KafkaSide()
    reads: list[tuple[str, TopicRead]] = [
        ("usage", read_topic(settings.kafka, topics.usage.name, timeout)),
        ("outcome", read_topic(settings.kafka, topics.outcomes.name, timeout)),
    ]
    for kind, read in reads:
        if read.retention_dropped:
            side.retention.append(read.topic)
        for message in sorted(read.messages, key=lambda m: (m.timestamp_ms or 0, m.partition, m.offset)):
            side.messages += 1
            # The future-time rule against the message's own broker timestamp, as the worker applied it.
            decoded = decode_event(message.value, kind, received_at(message.timestamp_ms))  # type: ignore[arg-type]
            if isinstance(decoded, Rejection):
                side.invalid += 1
                continue
            if decoded.period != period:
                side.other_periods += 1
                continue
            key = (decoded.customer_id, decoded.event_id)
            if key in side.events or key in side.unpriced:
                side.duplicates += 1
                continue
            try:
                side.events[key] = catalog.rate(decoded).credits
            except (RatingError, PlanError) as exc:
                side.unpriced[key] = str(exc)
    letters = read_dead_letters(settings.kafka, timeout)
    side.dead_letters = len(letters)
    side.lag = worker_lag(settings, reads, timeout, side)
    if stored_keys is not None:
        places = {
            (e.letter.source_topic, e.letter.source_partition, e.letter.source_offset)
            for e in letters
            if e.letter is not None and e.letter.reason.strip()
        }
        account(side, reads, places, stored_keys)
        stuck_partitions(side, reads, now or utc_now(), stuck_after)
    return side


def account(
    side: KafkaSide, reads: list[tuple[str, TopicRead]], dead_letter_places: set[tuple[Any, Any, Any]], stored: set[Key]
) -> None:
    """Every message below the group's committed offsets is stored, a duplicate of a stored event,
    or a dead letter with a reason (looked up by its topic, partition and offset); the three counts
    add up to the committed offsets, and anything else is listed as unaccounted."""
    counts = {"committed": 0, "stored": 0, "duplicates": 0, "dead_lettered": 0, "unaccounted": 0, "uncommitted": 0}
    for tp, committed in side.committed.items():
        low = next((r.watermarks[tp[1]][0] for _, r in reads if r.topic == tp[0] and tp[1] in r.watermarks), 0)
        counts["committed"] += max(committed - low, 0)
    seen: set[Key] = set()
    for kind, read in reads:
        for message in sorted(read.messages, key=lambda m: (m.partition, m.offset)):
            committed = side.committed.get((read.topic, message.partition), 0)
            if message.offset >= committed:
                counts["uncommitted"] += 1
                continue
            if (read.topic, message.partition, message.offset) in dead_letter_places:
                counts["dead_lettered"] += 1
                continue
            decoded = decode_event(message.value, kind, received_at(message.timestamp_ms))  # type: ignore[arg-type]
            where = f"{read.topic}:{message.partition}@{message.offset}"
            if isinstance(decoded, Rejection):
                counts["unaccounted"] += 1
                side.unaccounted.append(f"{where} (rejected, no dead letter: {decoded.reason[:120]})")
                continue
            key = (decoded.customer_id, decoded.event_id)
            if key not in stored:
                counts["unaccounted"] += 1
                side.unaccounted.append(f"{where} (event {key[0]}/{key[1]} neither stored nor dead-lettered)")
            elif key in seen:
                counts["duplicates"] += 1
            else:
                seen.add(key)
                counts["stored"] += 1
    side.accounting = counts


def stuck_partitions(side: KafkaSide, reads: list[tuple[str, TopicRead]], now: datetime, stuck_after: timedelta) -> None:
    """Partitions with lag whose first uncommitted message has waited longer than ``stuck_after``
    and whose group has not committed for as long (a worker catching up a backlog commits)."""
    limit_ms = int((now - stuck_after).timestamp() * 1000)
    for _, read in reads:
        first: dict[int, int] = {}
        for message in read.messages:
            committed = side.committed.get((read.topic, message.partition), 0)
            if message.offset >= committed and message.partition not in first:
                first[message.partition] = message.timestamp_ms or 0
            elif message.offset >= committed:
                first[message.partition] = min(first[message.partition], message.timestamp_ms or 0)
        for partition, waiting_since in sorted(first.items()):
            last_commit = side.committed_at.get((read.topic, partition))
            if waiting_since < limit_ms and (last_commit is None or last_commit < limit_ms):
                offset = side.committed.get((read.topic, partition), 0)
                side.stuck.append(
                    f"{read.topic}:{partition} stopped at offset {offset} with "
                    f"{read.watermarks[partition][1] - offset} messages behind for more than {stuck_after}"
                )


def worker_lag(
    settings: Settings, reads: list[tuple[str, TopicRead]], timeout: float, side: KafkaSide | None = None
) -> dict[str, int]:
    """Messages below the high watermarks that the worker's consumer group has not committed yet."""
    consumer = Consumer({**settings.kafka.confluent_config(), "group.id": settings.worker.app_id})
    lag: dict[str, int] = {}
    try:
        for _, read in reads:
            if not read.watermarks:
                continue
            committed = consumer.committed([TopicPartition(read.topic, p) for p in read.watermarks], timeout=timeout)
            behind = 0
            for tp in committed:
                low, high = read.watermarks[tp.partition]
                if side is not None:
                    side.committed[(read.topic, tp.partition)] = max(tp.offset, low) if tp.offset >= 0 else low
                    stamp = getattr(tp, "metadata", None)
                    if stamp and str(stamp).isdigit():
                        side.committed_at[(read.topic, tp.partition)] = int(stamp)
                behind += high - max(tp.offset, low) if tp.offset >= 0 else high - low
            if behind:
                lag[read.topic] = behind
    except KafkaException as exc:  # diagnostic only: the comparison stands without it
        log.warning("could not read the worker's committed offsets: %s", exc)
    finally:
        consumer.close()
    return lag


def store_side(run_query: Callable[..., Any], catalog: Catalog, period: str) -> StoreSide:
    from meterstream.billing import invoice_from_store
    from meterstream.pricing.invoice import InvoiceError

    side = StoreSide()
    for row in run_query("reconcile_rows", period=period).dicts():
        key = (row["customer_id"], row["event_id"])
        if row["source"] == "raw":
            side.raw.add(key)
        else:
            side.rated[key] = row["credits"]
    for customer in sorted({c for c, _ in side.rated}):
        try:
            side.invoice_totals[customer] = invoice_from_store(run_query, catalog, customer, period).total
        except (InvoiceError, PlanError) as exc:
            side.invoice_errors[customer] = str(exc)
    return side


def compare(period: str, kafka: KafkaSide, store: StoreSide) -> Report:
    expected = set(kafka.events)
    on_topics = expected | set(kafka.unpriced)
    stored = store.raw | set(store.rated)
    kafka_credits: dict[str, Decimal] = defaultdict(Decimal)
    stored_credits: dict[str, Decimal] = defaultdict(Decimal)
    for (customer, _), credits in kafka.events.items():
        kafka_credits[customer] += credits
    for (customer, _), credits in store.rated.items():
        stored_credits[customer] += credits
    mismatches = []
    for customer in sorted(set(kafka_credits) | set(stored_credits)):
        want = kafka_credits.get(customer, ZERO).quantize(SCALE)
        have = stored_credits.get(customer, ZERO).quantize(SCALE)
        if want != have:
            mismatches.append({"customer_id": customer, "stored": have, "kafka": want, "difference": have - want})
    return Report(
        period=period,
        kafka=kafka,
        store=store,
        missing_raw=sorted(expected - store.raw),
        missing_rated=sorted(expected - set(store.rated)),
        extra=sorted(stored - on_topics),
        raw_not_rated=sorted((store.raw - set(store.rated)) | (set(store.rated) - store.raw)),
        credit_mismatches=mismatches,
    )


def reconcile(
    settings: Settings,
    run_query: Callable[..., Any],
    catalog: Catalog,
    period: str,
    timeout: float = 60.0,
    *,
    now: datetime | None = None,
    stuck_after: timedelta = timedelta(minutes=5),
) -> Report:
    stored = {(row["customer_id"], row["event_id"]) for row in run_query("stored_event_keys").dicts()}
    kafka = kafka_side(settings, catalog, period, timeout, stored_keys=stored, now=now, stuck_after=stuck_after)
    return compare(period, kafka, store_side(run_query, catalog, period))
