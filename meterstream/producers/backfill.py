"""Backfills: historical events from a file, through the same topics as live usage.

``meterstream import FILE`` reads JSON Lines, CSV or Parquet in the wire format
(:mod:`meterstream.schemas.events`), and works in passes over the file so that
memory does not grow with the file's events:

1. **scan** validates every record exactly as the worker will (the same pydantic
   models; JSON Lines with ``model_validate_json``, the worker's own call) and
   notes each bad record as ``file:line: reason``, the periods and customers the
   file touches, and records repeating an earlier ``(customer_id, event_id)`` of
   the file (a 64-bit hash per event is what it keeps).
2. **stored ids**: the event ids already stored for those customers and periods
   (saved query ``sql/queries/stored_event_ids.sql``, so it works through the
   worker that owns an embedded store and against a ClickHouse server alike).
3. **send** (or, with ``--dry-run``, **price**): read the file again and produce
   every valid, new event, keyed by customer, to ``usage.events`` or
   ``outcome.events`` with the SDK's delivery guarantees; or rate them with the
   pure pricing engine (:meth:`meterstream.pricing.plans.Catalog.rate`, what
   ``meterstream rate`` and the worker call) and send nothing.

Nothing here decides billing: the worker rates the events like any other. An
event of a period whose invoice is closed (``late_grace_seconds`` after its end)
is stored in its own period and billed on the open invoice as a flagged
``late_adjustment`` (the worker's late-usage rule); :func:`period_closed` only
says so in the report.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import tempfile
import time
import weakref
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import orjson
from confluent_kafka import KafkaError, Message, Producer
from pydantic import ValidationError

from meterstream.config import PRODUCER_GUARANTEES, KafkaSettings
from meterstream.periods import period_of
from meterstream.pricing.plans import Catalog, PlanError, period_bounds
from meterstream.pricing.rating import RatingError
from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.schemas.validation import MAX_EVENT_BYTES, describe_validation_error
from meterstream.topics import Topics

Format = Literal["jsonl", "csv", "parquet"]
Kind = Literal["usage", "outcome"]
ZERO = Decimal(0)

#: File suffixes and the format they mean (``--format`` overrides).
SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
                               ".parquet": "parquet", ".pq": "parquet"}  # fmt: skip
#: Columns of a CSV file or Parquet table holding whole numbers (token counts).
_INT_COLUMNS = frozenset({"input_tokens", "output_tokens", "cached_input_tokens", "schema_version"})
#: Up to this many customers of a period the stored ids are read per customer; beyond, per period.
_PER_CUSTOMER_LOOKUPS = 20


class BackfillError(ValueError):
    """The file cannot be imported at all (unreadable, unknown format)."""


@dataclass(frozen=True)
class BadRecord:
    line: int
    reason: str


def detect_format(path: Path, given: str | None = None) -> Format:
    if given:
        if given not in ("jsonl", "csv", "parquet"):
            raise BackfillError(f"--format must be jsonl, csv or parquet, not {given!r}")
        return given  # type: ignore[return-value]
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BackfillError(f"cannot tell the format of {path.name} from its suffix; pass --format jsonl|csv|parquet")
    return fmt


def period_closed(period: str, now: datetime, late_grace: timedelta) -> bool:
    """Whether ``period``'s invoice is closed at ``now``: the worker's late-usage rule, for the report."""
    return now >= period_bounds(period)[1] + late_grace


# -- reading ----------------------------------------------------------------------------------


def _validate_json(raw: bytes) -> UsageEvent | OutcomeEvent:
    """One JSON line as the worker validates it; ``"type": "outcome"`` marks an outcome."""
    if len(raw) > MAX_EVENT_BYTES:
        raise ValueError(f"the event is {len(raw)} bytes; the limit is {MAX_EVENT_BYTES}")
    if b'"outcome"' in raw and b'"type"' in raw:
        try:
            return OutcomeEvent.model_validate_json(raw)
        except ValidationError:
            pass  # the marker was in a string elsewhere: as usage it may be valid
    return UsageEvent.model_validate_json(raw)


def _from_row(row: dict[str, Any]) -> UsageEvent | OutcomeEvent:
    """A CSV or Parquet row (column = wire field) as an event; empty cells are absent fields."""
    fields: dict[str, Any] = {}
    for name, value in row.items():
        if value is None or value == "":
            continue
        if isinstance(value, str):
            if name in _INT_COLUMNS and value.isdigit():
                value = int(value)  # CSV has no numbers; a non-digit stays a string and is rejected
            elif name == "attributes":
                try:
                    value = orjson.loads(value)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"attributes: not a JSON object: {exc}") from None
        fields[name] = value
    model = OutcomeEvent if fields.get("type") == "outcome" else UsageEvent
    return model.model_validate(fields)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return describe_validation_error(exc)
    return str(exc)


def iter_events(path: Path, fmt: Format) -> Iterator[tuple[int, UsageEvent | OutcomeEvent | BadRecord]]:
    """``(line, event or bad record)`` for every record of the file; never raises on a bad record.

    ``line`` is the file line for JSON Lines and CSV (the header is line 1) and the
    1-based row for Parquet.
    """
    if fmt == "jsonl":
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    yield number, _validate_json(raw)
                except (ValidationError, ValueError) as exc:
                    yield number, BadRecord(number, _reason(exc))
    elif fmt == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            start = 2
            for row in reader:
                number, start = start, reader.line_num + 1
                if None in row:
                    yield number, BadRecord(number, f"{len(row[None])} more cells than the header has columns")
                    continue
                try:
                    yield number, _from_row(row)
                except (ValidationError, ValueError) as exc:
                    yield number, BadRecord(number, _reason(exc))
    else:
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            for row in batch.to_pylist():
                number += 1
                if isinstance(row.get("attributes"), list):  # a Parquet map reads as [(key, value), ...]
                    row["attributes"] = dict(row["attributes"])
                try:
                    yield number, _from_row(row)
                except (ValidationError, ValueError) as exc:
                    yield number, BadRecord(number, _reason(exc))


# -- pass 1: scan -----------------------------------------------------------------------------


@dataclass
class Scan:
    path: Path
    fmt: Format
    records: int = 0
    valid: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    #: Lines repeating an earlier (customer_id, event_id) of the file: sent once.
    repeated_lines: set[int] = field(default_factory=set)
    #: period -> customers with events in it
    customers_by_period: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    first_at: datetime | None = None
    last_at: datetime | None = None
    #: CSV and Parquet: the wire bytes of every valid, first-seen event, one JSON line each, in
    #: file order (written by the scan, so the send validates nothing twice); None for JSON Lines.
    spool: Path | None = None

    def discard_spool(self) -> None:
        """Delete the spool now (it is deleted anyway when the scan is collected or at exit)."""
        if self.spool is not None:
            self.spool.unlink(missing_ok=True)
            self.spool = None

    @property
    def bad_lines(self) -> set[int]:
        return {b.line for b in self.bad}

    @property
    def periods(self) -> list[str]:
        return sorted(self.customers_by_period)


Progress = Callable[[int], None]  # called with how many records were handled since the last call


def scan(path: Path, fmt: Format, progress: Progress | None = None, *, workers: int | None = None) -> Scan:
    """Validate every record; collect bad lines, repeats, and the periods and customers touched.

    A JSON Lines file larger than a few chunks is validated by ``workers`` processes
    (default: one per core, at most 4), each taking whole lines of a byte range;
    the results are merged in file order, so they are what one process finds.
    """
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    if fmt == "jsonl" and workers > 1 and path.stat().st_size > 2 * _CHUNK_BYTES:
        return _scan_parallel(path, workers, progress)
    result = Scan(path, fmt)
    spool = None
    if fmt != "jsonl":
        handle, name = tempfile.mkstemp(prefix="meterstream-import-", suffix=".jsonl")
        spool = os.fdopen(handle, "wb", buffering=1 << 20)
        result.spool = Path(name)
        weakref.finalize(result, result.spool.unlink, missing_ok=True)
    try:
        _scan_into(result, path, fmt, progress, spool)
    except BaseException:
        result.discard_spool()
        raise
    finally:
        if spool is not None:
            spool.close()
    return result


def _scan_into(result: Scan, path: Path, fmt: Format, progress: Progress | None, spool: Any) -> None:
    seen: set[int] = set()
    step = 0
    write = spool.write if spool is not None else None
    for number, item in iter_events(path, fmt):
        result.records += 1
        step += 1
        if progress is not None and step == 10_000:
            progress(step)
            step = 0
        if isinstance(item, BadRecord):
            result.bad.append(item)
            continue
        key = hash((item.customer_id, item.event_id))
        if key in seen:
            result.repeated_lines.add(number)
            continue
        seen.add(key)
        result.valid += 1
        if write is not None:
            write(item.wire_bytes() + b"\n")
        result.customers_by_period[item.period].add(item.customer_id)
        at = item.occurred_at
        if result.first_at is None or at < result.first_at:
            result.first_at = at
        if result.last_at is None or at > result.last_at:
            result.last_at = at
    if progress is not None and step:
        progress(step)


#: Bytes of JSON Lines one scan task validates.
_CHUNK_BYTES = 4 * 1024 * 1024


def _chunks(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of ``path`` that start at line starts."""
    size = path.stat().st_size
    bounds = [0]
    with path.open("rb") as handle:
        while bounds[-1] + _CHUNK_BYTES < size:
            handle.seek(bounds[-1] + _CHUNK_BYTES)
            handle.readline()  # to the start of the next line
            if handle.tell() >= size:
                break
            bounds.append(handle.tell())
    bounds.append(size)
    return list(zip(bounds, bounds[1:], strict=False))


def _scan_chunk(task: tuple[Path, int, int]) -> dict[str, Any]:
    """Validate the lines of one byte range (in a worker process); line numbers are local, from 1."""
    path, start, end = task
    with path.open("rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    bad: list[tuple[int, str]] = []
    keys, lines = array("q"), array("q")
    # The hot loop of a scan, kept lean: months as integers (year * 12 + month) until the end,
    # the usage model called directly unless the line may be an outcome (as _validate_json does).
    customers_by_month: dict[int, set[str]] = defaultdict(set)
    first: datetime | None = None
    last: datetime | None = None
    records = 0
    validate_usage, limit = UsageEvent.model_validate_json, MAX_EVENT_BYTES
    add_key, add_line = keys.append, lines.append
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.strip()
        if not raw:
            continue
        records += 1
        try:
            if len(raw) > limit or b'"type"' in raw:
                event = _validate_json(raw)
            else:
                event = validate_usage(raw)
        except (ValidationError, ValueError) as exc:
            bad.append((number, _reason(exc)))
            continue
        customer, at = event.customer_id, event.occurred_at
        add_key(hash((customer, event.event_id)))
        add_line(number)
        customers_by_month[at.year * 12 + at.month].add(customer)
        if first is None or last is None:
            first = last = at
        elif at < first:
            first = at
        elif at > last:
            last = at
    customers_by_period = {f"{(m - 1) // 12:04d}-{(m - 1) % 12 + 1:02d}": c for m, c in customers_by_month.items()}
    return {"newlines": data.count(b"\n"), "records": records, "bad": bad, "keys": keys, "lines": lines,
            "customers_by_period": customers_by_period, "first": first, "last": last}  # fmt: skip


def _scan_parallel(path: Path, workers: int, progress: Progress | None) -> Scan:
    result = Scan(path, "jsonl")
    seen: set[int] = set()
    offset = 0  # lines before the chunk
    # fork: the children share this process's str hash seed, so their keys hash as ours do
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for chunk in pool.imap(_scan_chunk, [(path, a, b) for a, b in _chunks(path)]):
            result.records += chunk["records"]
            result.bad.extend(BadRecord(offset + n, reason) for n, reason in chunk["bad"])
            keys = chunk["keys"]
            distinct = set(keys)
            if len(distinct) == len(keys) and seen.isdisjoint(distinct):
                seen |= distinct  # the usual case: no repeats, merged in C
            else:
                for key, number in zip(keys, chunk["lines"], strict=True):
                    if key in seen:
                        result.repeated_lines.add(offset + number)
                    else:
                        seen.add(key)
            result.valid = len(seen)
            for period, customers in chunk["customers_by_period"].items():
                result.customers_by_period[period] |= customers
            if chunk["first"] is not None and (result.first_at is None or chunk["first"] < result.first_at):
                result.first_at = chunk["first"]
            if chunk["last"] is not None and (result.last_at is None or chunk["last"] > result.last_at):
                result.last_at = chunk["last"]
            offset += chunk["newlines"]
            if progress is not None:
                progress(chunk["records"])
    return result


# -- pass 2: what is stored already -----------------------------------------------------------

QueryRunner = Callable[..., Any]  # (name, **params) -> QueryResult


def stored_keys(run_query: QueryRunner, scanned: Scan) -> set[tuple[str, str]]:
    """``(customer_id, event_id)`` of the file's customers already stored in the file's periods.

    The store is keyed by ``(customer_id, event_id)`` within a period, so this is
    what an event of the file would collapse with (``FINAL``); skipping it keeps
    the stored row as it is and the real-time counters right.
    """
    keys: set[tuple[str, str]] = set()
    for period, customers in sorted(scanned.customers_by_period.items()):
        wanted = sorted(customers) if len(customers) <= _PER_CUSTOMER_LOOKUPS else [""]
        for customer in wanted:
            for row in run_query("stored_event_ids", period=period, customer=customer).dicts():
                if customer or row["customer_id"] in customers:
                    keys.add((row["customer_id"], row["event_id"]))
    return keys


# -- pass 3a: price (dry run) -----------------------------------------------------------------


@dataclass
class PricedGroup:
    customer_id: str
    period: str
    billed_in: str
    events: int = 0
    #: usage credits (usage events) and outcome credits (outcomes), as ``meterstream usage`` shows them
    usage_credits: Decimal = ZERO
    outcome_credits: Decimal = ZERO
    cost_to_serve: Decimal = ZERO

    def to_json(self) -> dict[str, Any]:
        return {"customer_id": self.customer_id, "period": self.period, "billed_in": self.billed_in,
                "late": self.billed_in != self.period, "events": self.events,
                "usage_credits": str(self.usage_credits), "outcome_credits": str(self.outcome_credits),
                "cost_to_serve": str(self.cost_to_serve)}  # fmt: skip


@dataclass
class Priced:
    groups: list[PricedGroup]
    #: ``file:line: reason`` of valid events the catalog cannot price (the worker dead-letters them)
    unpriced: list[BadRecord]
    already_stored: int

    @property
    def usage_credits(self) -> Decimal:
        return sum((g.usage_credits for g in self.groups), ZERO)

    @property
    def outcome_credits(self) -> Decimal:
        return sum((g.outcome_credits for g in self.groups), ZERO)

    @property
    def cost_to_serve(self) -> Decimal:
        return sum((g.cost_to_serve for g in self.groups), ZERO)

    @property
    def events(self) -> int:
        return sum(g.events for g in self.groups)


def price(
    scanned: Scan,
    stored: set[tuple[str, str]],
    catalog: Catalog,
    *,
    now: datetime,
    late_grace: timedelta,
    progress: Progress | None = None,
) -> Priced:
    """Rate what an import would send, per customer and period, with the worker's engine; send nothing.

    ``billed_in`` is the period whose invoice carries the usage: its own, or, for a
    closed period, the open one at ``now`` (as a late adjustment).
    """
    skip = scanned.bad_lines | scanned.repeated_lines
    groups: dict[tuple[str, str], PricedGroup] = {}
    unpriced: list[BadRecord] = []
    already = 0
    open_period = period_of(now)
    step = 0
    for number, event in iter_events(scanned.path, scanned.fmt):
        step += 1
        if progress is not None and step == 10_000:
            progress(step)
            step = 0
        if number in skip or isinstance(event, BadRecord):
            continue
        if (event.customer_id, event.event_id) in stored:
            already += 1
            continue
        try:
            rated = catalog.rate(event)
        except (RatingError, PlanError) as exc:
            unpriced.append(BadRecord(number, str(exc)))
            continue
        group = groups.get((rated.customer_id, rated.period))
        if group is None:
            billed_in = open_period if period_closed(rated.period, now, late_grace) else rated.period
            group = groups[(rated.customer_id, rated.period)] = PricedGroup(rated.customer_id, rated.period, billed_in)
        group.events += 1
        if rated.kind == "outcome":
            group.outcome_credits += rated.credits
        else:
            group.usage_credits += rated.credits
        group.cost_to_serve += rated.cost_to_serve
    if progress is not None and step:
        progress(step)
    return Priced(sorted(groups.values(), key=lambda g: (g.customer_id, g.period)), unpriced, already)


# -- pass 3b: send ----------------------------------------------------------------------------


@dataclass
class Sent:
    sent: int = 0
    already_stored: int = 0
    delivered: int = 0
    #: ``(event_id, error)`` of events the broker did not confirm
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _producer_config(kafka: KafkaSettings) -> dict[str, Any]:
    # The SDK's guarantees (idempotence, acks=all, murmur2 by customer); batches sized for bulk.
    return {
        **kafka.confluent_config(),
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "message.timeout.ms": 120_000,
        **PRODUCER_GUARANTEES,
    }


def send(
    scanned: Scan,
    stored: set[tuple[str, str]],
    kafka: KafkaSettings,
    *,
    progress: Progress | None = None,
    flush_timeout: float = 120.0,
    producer_config: dict[str, Any] | None = None,
) -> Sent:
    """Produce every valid, new event of the file; wait until the broker confirmed each one.

    Every produce has the delivery callback, which librdkafka calls for failures only
    (``delivery.report.only.error``): a Python call per confirmed message would cost
    more than the produce. After ``flush`` returns with nothing outstanding, every
    event sent and not reported failed was confirmed.
    """
    result = Sent()
    topics = Topics.from_settings(kafka)
    usage_topic, outcome_topic = topics.usage.name, topics.outcomes.name
    config = {**_producer_config(kafka), **(producer_config or {}), "delivery.report.only.error": True}
    producer = Producer({**config, **PRODUCER_GUARANTEES})
    skip = scanned.bad_lines | scanned.repeated_lines
    failed = result.failed

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failed.append((_event_id_of(msg.value()), err.str()))

    produce, poll = producer.produce, producer.poll

    def produce_when_room(topic: str, value: bytes, key: bytes) -> None:
        deadline = time.monotonic() + 60
        while True:
            poll(0.05)
            try:
                produce(topic, value, key, -1, on_delivery)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise

    started = time.perf_counter()
    sent = already = 0
    if scanned.fmt == "jsonl" or scanned.spool is not None:
        # The hot loop of a backfill, inlined: the lines as written (the worker validates them
        # again, as for any producer), routed by the two fields read back with orjson. CSV and
        # Parquet send the wire bytes their scan spooled (valid and first-seen events only).
        loads = orjson.loads
        source = scanned.spool if scanned.spool is not None else scanned.path
        if scanned.spool is not None:
            skip = set()
        number = 0
        with source.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not number & 0x3FFF:
                    poll(0)
                    if progress is not None:
                        progress(0x4000)
                if number in skip:
                    continue
                raw = raw.strip()
                if not raw:
                    continue
                obj = loads(raw)
                customer = obj["customer_id"]
                if stored and (customer, obj["event_id"]) in stored:
                    already += 1
                    continue
                topic = outcome_topic if obj.get("type") == "outcome" else usage_topic
                key = customer.encode()
                try:
                    produce(topic, raw, key, -1, on_delivery)
                except BufferError:
                    produce_when_room(topic, raw, key)
                sent += 1
        if progress is not None:
            progress(number & 0x3FFF)
    else:
        step = 0
        for number, item in iter_events(scanned.path, scanned.fmt):
            step += 1
            if step == 10_000:
                poll(0)
                if progress is not None:
                    progress(step)
                step = 0
            if number in skip or isinstance(item, BadRecord):
                continue
            if stored and (item.customer_id, item.event_id) in stored:
                already += 1
                continue
            topic = outcome_topic if item.type == "outcome" else usage_topic
            value, key = item.wire_bytes(), item.customer_id.encode()
            try:
                produce(topic, value, key, -1, on_delivery)
            except BufferError:
                produce_when_room(topic, value, key)
            sent += 1
        if progress is not None and step:
            progress(step)
    remaining = producer.flush(flush_timeout)
    result.seconds = time.perf_counter() - started
    result.sent, result.already_stored = sent, already
    result.delivered = sent - remaining - len(failed)  # failed: the callback's reports only, so far
    if remaining:
        failed.append(("?", f"{remaining} deliveries unconfirmed after {flush_timeout:.0f} s"))
    return result


def _event_id_of(value: bytes | None) -> str:
    try:
        return str(orjson.loads(value or b"")["event_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "?"
