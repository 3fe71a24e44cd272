"""Backfills: historical events from a file, through the same topics as live usage.

``meterstream import FILE`` reads JSON Lines, CSV or Parquet in the wire format
(:mod:`meterstream.schemas.events`), and works in passes over the file so that
memory does not grow with the file's events:

1. **scan** validates every record exactly as the worker will: as columns first
   (:func:`meterstream.schemas.columnar.accept` accepts, with whole-column checks,
   the rows it can prove the models accept), and every other record alone with the
   pydantic models (JSON Lines with ``model_validate_json``, the worker's own
   call), so each verdict and reason is the model's. It notes each bad record as
   ``file:line: reason``, the periods and customers the file touches, and records
   repeating an earlier ``(customer_id, event_id)`` of the file (a 64-bit hash per
   event is what it keeps), and spools what the send will produce (customer id,
   event id, kind, bytes) to temporary files, so the send parses nothing.
2. **stored ids**: the event ids already stored for those customers and periods
   (saved query ``sql/queries/stored_event_ids.sql``, on the command's own connection
   to the ClickHouse server).
3. **send** (or, with ``--dry-run``, **price**): stream the spool and produce
   every valid, new event, keyed by customer, to ``usage.events`` or
   ``outcome.events`` with the SDK's delivery guarantees; or read the file again and rate them with the
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
import functools
import gc
import io
import multiprocessing
import os
import shutil
import tempfile
import time
import weakref
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson
from confluent_kafka import KafkaError, Message, Producer
from pydantic import ValidationError

from meterstream.clock import Clock, utc_now
from meterstream.config import PRODUCER_GUARANTEES, KafkaSettings
from meterstream.periods import period_of
from meterstream.pricing.plans import Catalog, PlanError, period_bounds
from meterstream.pricing.rating import RatingError
from meterstream.schemas import columnar
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
                try:
                    yield number, _from_parquet_row(row)
                except (ValidationError, ValueError) as exc:
                    yield number, BadRecord(number, _reason(exc))


def _from_parquet_row(row: dict[str, Any]) -> UsageEvent | OutcomeEvent:
    if isinstance(row.get("attributes"), list):  # a Parquet map reads as [(key, value), ...]
        row["attributes"] = dict(row["attributes"])
    return _from_row(row)


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
    #: What the send produces, in file order, written by the scan (so the send validates and parses
    #: nothing): every valid, first-seen event as one record ``customer_id TAB event_id TAB kind TAB
    #: value LF`` (kind ``u`` or ``o``; value: the JSON line as written for JSON Lines, the model's
    #: wire bytes for CSV and Parquet). Empty when the per-event JSON Lines scan sends from the file.
    spools: list[Path] = field(default_factory=list)
    _spool_dir: Path | None = None

    def discard_spool(self) -> None:
        """Delete the spool now (it is deleted anyway when the scan is collected or at exit)."""
        for spool in self.spools:
            spool.unlink(missing_ok=True)
        self.spools = []
        if self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)
            self._spool_dir = None

    def spooled(self) -> Iterator[tuple[bytes, bytes, bytes, bytes]]:
        """``(customer_id, event_id, kind, value)`` of every spooled record, in order."""
        for records in self.spooled_blocks():
            for record in records:
                customer, event_id, kind, value = record.split(b"\t", 3)
                yield customer, event_id, kind, value

    def spooled_blocks(self) -> Iterator[list[bytes]]:
        """The spooled records (without their LF), a few MB at a time, in order."""
        for spool in self.spools:
            with spool.open("rb") as handle:
                while block := handle.read(1 << 22):
                    block += handle.readline()  # to the end of the record
                    yield block[:-1].split(b"\n")

    @property
    def bad_lines(self) -> set[int]:
        return {b.line for b in self.bad}

    @property
    def periods(self) -> list[str]:
        return sorted(self.customers_by_period)


Progress = Callable[[int], None]  # called with how many records were handled since the last call


def scan(
    path: Path,
    fmt: Format,
    progress: Progress | None = None,
    *,
    workers: int | None = None,
    clock: Clock = utc_now,
    columns: bool = True,
) -> Scan:
    """Validate every record; collect bad lines, repeats, and the periods and customers touched.

    Records are validated as columns (:func:`meterstream.schemas.columnar.accept`: fast
    accept of the rows it can prove valid, with their wire bytes built column-wise); every
    other record goes through the event model alone, as before, so the verdicts and reasons
    are the model's. ``columns=False`` validates every record with the model (the per-event
    path the tests compare with). The fast path's future-time limit is against ``clock()``,
    read once before the scan; it must be the clock the models read (:func:`utc_now`, the
    default: tests stop it with time-machine) or one behind it, so that what the fast path
    accepts the model accepts too (the model reads the same clock later).

    A file of more than one chunk (1–4 MB of JSON Lines or CSV, see :func:`_chunks`; a
    Parquet row group or a piece of one, see :func:`_table_tasks`) is validated by
    ``workers`` processes (default: one per core, at most 4), each taking whole lines of
    a byte range (a Parquet range of rows); the results are merged in file order, so
    they are what one process finds. A CSV file whose quoted value spans a chunk
    boundary is scanned again in one process.
    """
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    now = clock()
    result = Scan(path, fmt)
    if fmt == "jsonl" and not columns:
        with _gc_paused():
            _scan_into(result, path, fmt, progress, None)
        return result
    result._spool_dir = Path(tempfile.mkdtemp(prefix="meterstream-import-"))
    weakref.finalize(result, shutil.rmtree, result._spool_dir, ignore_errors=True)
    try:
        with _gc_paused():
            if fmt == "jsonl":
                _scan_chunks(result, workers, progress, now)
                return result
            once = _ProgressOnce(progress) if progress is not None else None
            if columns and workers > 1 and _scan_table_chunks(result, workers, once, now):
                return result
            result.spools = [result._spool_dir / "events.spool"]
            with result.spools[0].open("wb", buffering=1 << 20) as spool:
                if not columns or not _scan_table_into(result, path, fmt, once, spool, now):
                    _scan_into(result, path, fmt, once, spool)
    except BaseException:
        result.discard_spool()
        raise
    return result


def _scan_table_chunks(result: Scan, workers: int, progress: _ProgressOnce | None, now: datetime) -> bool:
    """A CSV or Parquet file scanned by ``workers`` processes, chunk by chunk (False, nothing done: scan it
    in one process — a file of one chunk, columns that cannot be read as columns, or a CSV value
    with a line break across a chunk boundary)."""
    try:
        if result.fmt == "csv":
            with result.path.open(newline="", encoding="utf-8") as handle:
                if _csv_header(csv.reader(handle)) is None:
                    return False
        else:
            import pyarrow.parquet as pq

            _parquet_names(pq.ParquetFile(result.path))
    except (LookupError, UnicodeDecodeError):
        return False
    assert result._spool_dir is not None
    tasks = _table_tasks(result.path, result.fmt, now, result._spool_dir, workers)
    if len(tasks) < 2:
        return False
    try:
        _scan_chunks(result, workers, progress, now, tasks)
        return True
    except _Unaligned:
        pass
    # start again in one process (the progress it reports again is not counted twice)
    for spool in result.spools:
        spool.unlink(missing_ok=True)
    fresh = Scan(result.path, result.fmt)
    for name in ("records", "valid", "bad", "repeated_lines", "customers_by_period", "first_at", "last_at", "spools"):
        setattr(result, name, getattr(fresh, name))
    if progress is not None:
        progress.start_again()
    return False


class _ProgressOnce:
    """A progress callback that reports each record once when a scan starts again from the top."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.reported = 0
        self.again = 0

    def __call__(self, n: int) -> None:
        skip = min(self.again, n)
        self.again -= skip
        if n - skip:
            self.reported += n - skip
            self.progress(n - skip)

    def start_again(self) -> None:
        self.again = self.reported


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a pass builds and drops millions of small objects
    (nothing it makes is cyclic; with collection on, the passes spend ~40% of their time in it)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _spool_record(customer: str, event_id: str, outcome: bool, value: bytes) -> bytes:
    return f"{customer}\t{event_id}\t{'o' if outcome else 'u'}\t".encode() + value + b"\n"


def _scan_into(result: Scan, path: Path, fmt: Format, progress: Progress | None, spool: Any) -> None:
    """The per-event scan: every record through the model (the oracle of the column-wise one)."""
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
            write(_spool_record(item.customer_id, item.event_id, item.type == "outcome", item.wire_bytes()))
        result.customers_by_period[item.period].add(item.customer_id)
        at = item.occurred_at
        if result.first_at is None or at < result.first_at:
            result.first_at = at
        if result.last_at is None or at > result.last_at:
            result.last_at = at
    if progress is not None and step:
        progress(step)


# -- column-wise validation -------------------------------------------------------------------

#: Lines of one key layout below this many are validated by the model alone (not worth a column pass).
_MIN_GROUP = 16
#: Rows of a CSV or Parquet file validated as one batch of columns.
_TABLE_BATCH = 50_000
#: A cell the fast path must not accept (unreadable attributes): the model gives the reason.
_UNREADABLE = object()


def _loads_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _validate_lines(lines: list[bytes], now: datetime) -> tuple[list[int], list[str], list[str], list[datetime],
                                                                  list[bool], list[tuple[int, str]]]:  # fmt: skip
    """JSON lines (stripped, non-empty) validated as the worker does: ``(positions, customer ids, event ids,
    occurred_at, is outcome)`` of the valid ones in line order, and ``(position, reason)`` of the invalid ones.

    Lines are read with orjson and grouped by their keys (in order); each group of at least
    :data:`_MIN_GROUP` lines goes through :func:`columnar.accept`. Every line it does not
    accept (and every line orjson cannot read, or that is not an object, or too big) is
    validated by :func:`_validate_json`, the per-event call. orjson and pydantic's JSON
    reader agree on what they both read (a repeated key: the last one wins in both).
    """
    try:
        objs = list(map(orjson.loads, lines))
    except orjson.JSONDecodeError:
        objs = [_loads_or_none(raw) for raw in lines]
    groups: dict[tuple[str, ...], list[int]] = {}
    slow: list[int] = []
    layouts = list(map(tuple, objs)) if set(map(type, objs)) == {dict} else None
    if layouts is not None and len(set(layouts)) == 1 and max(map(len, lines)) <= MAX_EVENT_BYTES:
        groups[layouts[0]] = list(range(len(objs)))  # the usual file: one layout, every line an object
    else:
        grouped: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, obj in enumerate(objs):
            if type(obj) is dict and len(lines[i]) <= MAX_EVENT_BYTES:
                grouped[tuple(obj)].append(i)
            else:
                slow.append(i)
        groups = grouped
    positions: list[int] = []
    customers: list[str] = []
    event_ids: list[str] = []
    instants: list[datetime] = []
    outcomes: list[bool] = []
    for keys, members in groups.items():
        if len(members) < _MIN_GROUP:
            slow.extend(members)
            continue
        rows = objs if len(members) == len(objs) else [objs[i] for i in members]
        columns = columnar.transpose(keys, rows)
        got = columnar.accept(columns, len(rows), none_is_absent=False, now=now)
        positions.extend(members[r] for r in got.rows)
        customers.extend(got.customer_id)
        event_ids.extend(got.event_id)
        instants.extend(got.occurred_at)
        outcomes.extend(got.outcome)
        if len(got.rows) != len(members):
            accepted = set(got.rows)
            slow.extend(m for r, m in enumerate(members) if r not in accepted)
    bad: list[tuple[int, str]] = []
    for i in slow:
        try:
            event = _validate_json(lines[i])
        except (ValidationError, ValueError) as exc:
            bad.append((i, _reason(exc)))
            continue
        positions.append(i)
        customers.append(event.customer_id)
        event_ids.append(event.event_id)
        instants.append(event.occurred_at)
        outcomes.append(event.type == "outcome")
    if slow or len(groups) > 1:
        order = sorted(range(len(positions)), key=positions.__getitem__)
        positions = [positions[i] for i in order]
        customers = [customers[i] for i in order]
        event_ids = [event_ids[i] for i in order]
        instants = [instants[i] for i in order]
        outcomes = [outcomes[i] for i in order]
        bad.sort()
    return positions, customers, event_ids, instants, outcomes, bad


def _cells(name: str, values: Sequence[Any]) -> list[Any]:
    """A CSV or Parquet column as :func:`_from_row` hands its cells to the model (None: absent).

    Only the conversions that cannot fail are made here; a cell ``_from_row`` would convert
    otherwise (a non-ASCII digit string, attributes that are not JSON) stays as it is or
    becomes :data:`_UNREADABLE`, which the fast path does not accept (the model then says why).
    """
    if name in _INT_COLUMNS:
        if set(map(type, values)) == {str} and all(values) and _ascii_digits("".join(values)):
            return list(map(int, values))  # a CSV column of whole numbers, every cell given
        return [None if v is None or v == "" else int(v) if type(v) is str and v.isascii() and v.isdigit() else v
                for v in values]  # fmt: skip
    if name == "attributes":
        return [_attributes_cell(v) for v in values]
    if set(map(type, values)) == {str}:
        return [v or None for v in values]  # CSV: only "" is false
    return [None if v is None or v == "" else v for v in values]


def _ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _attributes_cell(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return _UNREADABLE
    if isinstance(value, list):  # a Parquet map
        try:
            return dict(value)
        except (TypeError, ValueError):
            return _UNREADABLE
    return value


#: ``(column names, record numbers, rows, columns)``: a batch of a CSV file as rows (``columns`` None),
#: of a Parquet file as columns (``rows`` None: made only for the records the column checks leave).
_Batch = tuple[list[str], list[int], "list[list[Any] | _TooMany] | None", "list[list[Any]] | None"]


class _TooMany:
    """A CSV row with more cells than the header has columns."""

    def __init__(self, extra: int) -> None:
        self.extra = extra


def _table_batches(path: Path, fmt: Format) -> Iterator[_Batch]:
    """``(column names, record numbers, rows)`` in batches; numbers as :func:`iter_events` gives them.

    Raises :class:`LookupError` before the first batch when the columns cannot be read as
    columns (a repeated or empty column name): the caller then scans per event.
    """
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = _csv_header(reader)
            if header is not None:
                yield from _csv_batches(reader, header, 2)
    else:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = _parquet_names(parquet)
        number = 0
        for batch in parquet.iter_batches(batch_size=_TABLE_BATCH):
            yield _parquet_batch(names, number, batch)
            number += batch.num_rows


def _csv_header(reader: Any) -> list[str] | None:
    header: list[str] | None = next(reader, None)
    if header is not None and (len(set(header)) != len(header) or "" in header):
        raise LookupError("CSV header with repeated or empty names")
    return header


def _csv_batches(reader: Any, header: list[str], start: int) -> Iterator[_Batch]:
    """The rows of a ``csv.reader`` after its header, numbered from ``start`` as :func:`iter_events` numbers them."""
    width = len(header)
    numbers: list[int] = []
    rows: list[list[Any] | _TooMany] = []
    # iter_events' numbering: a row is numbered one after the line the previous row ended
    # on (csv.DictReader skips empty rows; tests/unit/test_ingest_fuzz.py checks both agree)
    for row in reader:
        if not row:
            continue
        numbers.append(start)
        start = reader.line_num + 1
        if len(row) != width:
            rows.append(_TooMany(len(row) - width) if len(row) > width else row + [""] * (width - len(row)))
        else:
            rows.append(row)
        if len(rows) == _TABLE_BATCH:
            yield header, numbers, rows, None
            numbers, rows = [], []
    if rows:
        yield header, numbers, rows, None


def _parquet_names(parquet: Any) -> list[str]:
    names: list[str] = parquet.schema_arrow.names
    if len(set(names)) != len(names):
        raise LookupError("Parquet columns with repeated names")
    return names


def _parquet_batch(names: list[str], before: int, batch: Any) -> _Batch:
    """One Arrow record batch as columns, numbered from ``before + 1``."""
    cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
    return names, list(range(before + 1, before + 1 + batch.num_rows)), None, cols


def _scan_table_into(result: Scan, path: Path, fmt: Format, progress: Progress | None, spool: Any,
                     now: datetime) -> bool:  # fmt: skip
    """The column-wise scan of a CSV or Parquet file (False, nothing done: scan it per event)."""
    batches = _table_batches(path, fmt)
    try:
        first = next(batches, None)
    except LookupError:
        return False
    _scan_batches(result, _chain(first, batches), fmt, progress, spool, now)
    return True


def _scan_batches(result: Scan, batches: Iterator[_Batch],
                  fmt: Format, progress: Progress | None, spool: Any, now: datetime,
                  kept: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Validate batches of table rows as columns into ``result`` and spool the valid first-seen ones.

    ``kept`` (a chunk's scan, :func:`_scan_table_chunk`) gets the hash key and number of every
    spooled record in order (``keys``, ``lines``) and, if it has them, their ``customers`` and
    ``instants``.
    """
    seen: set[int] = set()
    from_row = _from_row if fmt == "csv" else _from_parquet_row
    for names, numbers, rows, cols in batches:
        if cols is not None:  # Parquet: every row has every column
            plain: Sequence[int] = range(len(numbers))
            columns = {name: _cells(name, col) for name, col in zip(names, cols, strict=True)} if numbers else {}
        else:
            assert rows is not None
            plain = [i for i, row in enumerate(rows) if not isinstance(row, _TooMany)]
            table = rows if len(plain) == len(rows) else [rows[i] for i in plain]
            columns = {name: _cells(name, col) for name, col in zip(names, zip(*table, strict=True), strict=True)} \
                if table and names else {}  # fmt: skip
        got = columnar.accept(columns, len(plain), none_is_absent=True, now=now, wire=True)
        assert got.wire is not None
        # the valid records as columns: index in the batch, customer, event id, occurred_at, wire bytes, outcome
        valid: list[Any] = [[plain[r] for r in got.rows] if len(plain) != len(got.rows) or cols is None
                            else list(plain), got.customer_id, got.event_id, got.occurred_at, got.wire, got.outcome]  # fmt: skip
        bad: list[BadRecord] = []
        if len(got.rows) != len(numbers):
            if rows is None:
                assert cols is not None
                rows = [list(r) for r in zip(*cols, strict=True)] if cols else [[] for _ in numbers]
            accepted = {plain[r] for r in got.rows}
            more = []
            for i, row in enumerate(rows):
                if i in accepted:
                    continue
                if isinstance(row, _TooMany):
                    bad.append(BadRecord(numbers[i], f"{row.extra} more cells than the header has columns"))
                    continue
                try:
                    event = from_row(dict(zip(names, row, strict=True)))
                except (ValidationError, ValueError) as exc:
                    bad.append(BadRecord(numbers[i], _reason(exc)))
                    continue
                more.append((i, event.customer_id, event.event_id, event.occurred_at, event.wire_bytes(),
                             event.type == "outcome"))  # fmt: skip
            if more:
                merged = sorted([*zip(*valid, strict=True), *more], key=lambda v: v[0])
                valid = [list(column) for column in zip(*merged, strict=True)]
        result.records += len(numbers)
        result.bad.extend(bad)
        positions, customers, event_ids, instants, wires, outcomes = valid if valid[0] else ([],) * 6
        keys = list(map(hash, zip(customers, event_ids, strict=True)))
        distinct = set(keys)
        if len(distinct) != len(keys) or not seen.isdisjoint(distinct):
            first_seen = []
            for i, key in enumerate(keys):
                if key in seen:
                    result.repeated_lines.add(numbers[positions[i]])
                else:
                    seen.add(key)
                    first_seen.append(i)
            keys = [keys[i] for i in first_seen]
            positions, customers, event_ids, instants, wires, outcomes = (
                [column[i] for i in first_seen] for column in (positions, customers, event_ids, instants, wires, outcomes))
        else:
            seen |= distinct
        if keys:
            spool.write(b"".join(map(_spool_record, customers, event_ids, outcomes, wires)))
            _note_instants(result, customers, instants)
            if kept is not None:
                kept["keys"].extend(keys)
                kept["lines"].extend([numbers[i] for i in positions])
                if "customers" in kept:
                    kept["customers"].extend(customers)
                    kept["instants"].extend(instants)
        result.valid += len(keys)
        if progress is not None:
            progress(len(numbers))


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    if first is not None:
        yield first
        yield from rest


def _note_instants(result: Scan, customers: list[str], instants: list[datetime]) -> None:
    """The periods and customers, first and last ``occurred_at`` of valid first-seen events."""
    for month, customer in set(zip([at.year * 12 + at.month for at in instants], customers, strict=True)):
        result.customers_by_period[f"{(month - 1) // 12:04d}-{(month - 1) % 12 + 1:02d}"].add(customer)
    low, high = min(instants), max(instants)
    if result.first_at is None or low < result.first_at:
        result.first_at = low
    if result.last_at is None or high > result.last_at:
        result.last_at = high


#: Bytes of JSON Lines or CSV one scan task validates, at most; at least :data:`_MIN_CHUNK_BYTES`,
#: else a quarter of a process's share of the file (so that the processes finish together).
_CHUNK_BYTES = 4 * 1024 * 1024
_MIN_CHUNK_BYTES = 1024 * 1024


def _chunks(path: Path, workers: int = 1) -> list[tuple[int, int]]:
    """Byte ranges of ``path`` that start at line starts."""
    size = path.stat().st_size
    step = min(_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, size // (4 * workers)))
    bounds = [0]
    with path.open("rb") as handle:
        while bounds[-1] + step < size:
            handle.seek(bounds[-1] + step)
            handle.readline()  # to the start of the next line
            if handle.tell() >= size:
                break
            bounds.append(handle.tell())
    bounds.append(size)
    return list(zip(bounds, bounds[1:], strict=False))


class _Task(NamedTuple):
    """One chunk of a file for one scan process: a byte range (JSON Lines, CSV) or a row range (Parquet)."""

    path: Path
    fmt: Format
    start: int
    end: int
    now: datetime
    spool: Path
    #: The file's last chunk (a CSV chunk that is not the last checks that it ends between records).
    last: bool


class _Unaligned(Exception):
    """A CSV chunk boundary fell inside a quoted field: the file is scanned in one process."""


def _scan_chunk(task: _Task) -> dict[str, Any]:
    """Validate the records of one chunk (in a worker process) and spool the valid ones to ``task.spool``;
    record numbers are local (see :func:`_scan_chunks`)."""
    with _gc_paused():
        if task.fmt == "jsonl":
            return _scan_chunk_unpaused(task)
        return _scan_table_chunk(task)


def _scan_chunk_unpaused(task: _Task, details: bool = False) -> dict[str, Any]:
    path, _, start, end, now, spool, _ = task
    with path.open("rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    lines = list(map(bytes.strip, data.split(b"\n")))
    if lines and not lines[-1]:
        lines.pop()  # the chunk's last newline
    numbers: Sequence[int] = range(1, len(lines) + 1)  # the usual chunk: no blank line
    if not all(lines):
        numbered = [(number, raw) for number, raw in enumerate(lines, 1) if raw]
        numbers, lines = [n for n, _ in numbered], [raw for _, raw in numbered]
    positions, customers, event_ids, instants, outcomes, bad = _validate_lines(lines, now)
    with spool.open("wb") as out:
        out.write(b"".join([_spool_record(c, e, o, lines[p])
                            for p, c, e, o in zip(positions, customers, event_ids, outcomes, strict=True)]))  # fmt: skip
    keys = array("q", map(hash, zip(customers, event_ids, strict=True)))
    valid_lines = array("q", map(numbers.__getitem__, positions))
    chunk: dict[str, Any] = {"newlines": data.count(b"\n"), "records": len(lines), "bad": [(numbers[p], r) for p, r in bad],
           "keys": keys, "lines": valid_lines}  # fmt: skip
    if details:  # customers and instants per valid line (the merge keeps those of first-seen events)
        chunk |= {"customers": customers, "instants": instants}
    else:  # what the chunk adds when none of its events repeats one (a few sets, not an object per line)
        partial = Scan(path, "jsonl")
        if customers:
            _note_instants(partial, customers, instants)
        chunk |= {"customers_by_period": dict(partial.customers_by_period), "first": partial.first_at,
                "last": partial.last_at}  # fmt: skip
    return chunk


def _table_chunk_batches(task: _Task, csv_chunk: _CsvChunk | None = None) -> Iterator[_Batch]:
    """The rows of one chunk of a CSV or Parquet file, numbered locally (see :func:`_scan_chunks`)."""
    if task.fmt == "csv":
        assert csv_chunk is not None
        plain = csv_chunk.plain_rows()
        if task.start == 0:
            header = _csv_header(iter(plain) if plain is not None else csv_chunk)
            if header is None:
                return
        else:
            with task.path.open(newline="", encoding="utf-8") as handle:
                header = _csv_header(csv.reader(handle))
            assert header is not None
        start = 2 if task.start == 0 else 1
        if plain is None:
            yield from _csv_batches(csv_chunk, header, start)
        else:
            yield from csv_chunk.plain_batches(plain[1:] if task.start == 0 else plain, header, start)
        return
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(task.path)
    names = _parquet_names(parquet)
    groups: list[int] = []
    first = row = 0
    for g in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(g).num_rows
        if row < task.end and row + rows > task.start:
            first = first if groups else row
            groups.append(g)
        row += rows
    if not groups:
        return
    # streamed from the start of the first row group the range reaches (one batch in memory)
    number, high = 0, first  # rows yielded; the file row after the batch
    for batch in parquet.iter_batches(batch_size=_TABLE_BATCH, row_groups=groups, use_threads=False):
        low, high = high, high + batch.num_rows
        if high <= task.start:
            continue
        if low >= task.end:
            break
        start = max(task.start, low)
        piece = batch.slice(start - low, min(task.end, high) - start)
        yield _parquet_batch(names, number, piece)
        number += piece.num_rows


def _scan_table_chunk(task: _Task, details: bool = False) -> dict[str, Any]:
    """One chunk of a CSV or Parquet file validated as :func:`_scan_table_into` does, into ``task.spool``."""
    partial = Scan(task.path, task.fmt)
    kept: dict[str, Any] = {"keys": array("q"), "lines": array("q")}
    if details:
        kept |= {"customers": [], "instants": []}
    csv_chunk = None
    if task.fmt == "csv":
        with task.path.open("rb") as handle:
            handle.seek(task.start)
            csv_chunk = _CsvChunk(handle.read(task.end - task.start).decode("utf-8"), task.last)
    with task.spool.open("wb", buffering=1 << 20) as spool:
        _scan_batches(partial, _table_chunk_batches(task, csv_chunk), task.fmt, None, spool, task.now, kept)
    if csv_chunk is not None and not csv_chunk.aligned:
        raise _Unaligned(f"a quoted field spans the CSV chunk boundary at byte {task.end}")
    chunk: dict[str, Any] = {
        "records": partial.records, "bad": [(b.line, b.reason) for b in partial.bad],
        "repeated": sorted(partial.repeated_lines), **kept,
        "newlines": csv_chunk.lines if csv_chunk is not None else task.end - task.start,
        "row_end": csv_chunk.row_end if csv_chunk is not None else 0,
        "customers_by_period": dict(partial.customers_by_period), "first": partial.first_at, "last": partial.last_at,
    }  # fmt: skip
    return chunk


#: A line after a CSV chunk: read as a row of its own only if the chunk ends between records.
_CHUNK_END = "\ufdd0meterstream: end of chunk\ufdd0"


class _CsvChunk:
    """A ``csv.reader`` over one chunk of a CSV file (whole lines, decoded), for :func:`_csv_batches`.

    A chunk that is not the file's last is read with one more line, :data:`_CHUNK_END`: if
    the chunk ends between records that line is a row of its own (dropped, ``aligned``);
    if it ends inside a quoted field (a value with a line break across the boundary) the
    line is read into that field, and the chunk is ``aligned = False``. ``lines`` is how
    many lines the chunk has and ``row_end`` the line its last row ended on, as
    ``csv.reader`` counts them.
    """

    def __init__(self, text: str, last: bool) -> None:
        self.text = text
        self._check = not last
        self._past_end = False
        self.reader = csv.reader(self._lines(io.StringIO(text, newline="")))
        self.aligned = last
        self.lines = 0
        self.row_end = 0

    def plain_rows(self) -> list[list[str]] | None:
        """The chunk's rows (``[]`` for a blank line) when it has no quote character and no CR
        other than in CRLF line ends, else None: then ``csv.reader`` reads each line as its
        cells split at the commas, which ``str.split`` does without a Python step per row
        (tests/unit/test_backfill.py checks the two agree on generated text)."""
        text = self.text
        if '"' in text or text.count("\r") != text.count("\r\n"):
            return None
        lines = text.replace("\r\n", "\n").split("\n")
        if lines[-1] == "":
            lines.pop()  # the last line's end
        if lines and max(map(len, lines)) > csv.field_size_limit():
            return None  # csv.reader refuses the file: the reader says so
        self.lines = len(lines)
        self.aligned = True
        return [line.split(",") if line else [] for line in lines]

    def plain_batches(self, rows: list[list[str]], header: list[str], start: int) -> Iterator[_Batch]:
        """:func:`_csv_batches` of :meth:`plain_rows` (one line a row; the header's dropped)."""
        first_line = self.lines - len(rows) + 1  # the line of rows[0]
        if [] in rows:  # blank lines: numbered as csv.reader numbers the rows around them
            numbers, kept = [], []
            for line, row in enumerate(rows, first_line):
                if row:
                    numbers.append(start)
                    start = line + 1
                    kept.append(row)
            rows, self.row_end = kept, start - 1 if kept else 0
        elif rows:
            numbers = [start, *range(first_line + 1, first_line + len(rows))]
            self.row_end = first_line + len(rows) - 1
        else:
            numbers = []
        width = len(header)
        cells: list[list[Any] | _TooMany] = list(rows) if not rows or set(map(len, rows)) == {width} else [
            row if len(row) == width else _TooMany(len(row) - width) if len(row) > width
            else row + [""] * (width - len(row)) for row in rows]  # fmt: skip
        for at in range(0, len(cells), _TABLE_BATCH):
            yield header, numbers[at:at + _TABLE_BATCH], cells[at:at + _TABLE_BATCH], None

    def _lines(self, lines: Iterator[str]) -> Iterator[str]:
        yield from lines
        if self._check:
            self._past_end = True
            yield _CHUNK_END + "\n"

    @property
    def line_num(self) -> int:
        return int(self.reader.line_num)

    def __iter__(self) -> Iterator[list[str]]:
        reader = self.reader
        for row in reader:
            if self._past_end:
                self.aligned = row == [_CHUNK_END]
                self.lines = reader.line_num - 1
                return
            if row:
                self.row_end = reader.line_num
            yield row
        self.lines = reader.line_num

    def __next__(self) -> list[str]:  # the header
        return next(iter(self))


def _table_tasks(path: Path, fmt: Format, now: datetime, spool_dir: Path, workers: int = 1) -> list[_Task]:
    """The chunks of a file: byte ranges of whole lines (JSON Lines, CSV), row ranges (Parquet)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        ranges: list[tuple[int, int]] = []
        row = 0
        metadata = pq.ParquetFile(path).metadata
        for g in range(metadata.num_row_groups):
            rows = metadata.row_group(g).num_rows
            # each piece decodes its whole row group: a big group is cut in at most 4 pieces
            pieces = max(1, min(4, rows // _TABLE_BATCH))
            cuts = [row + rows * i // pieces for i in range(pieces + 1)]
            ranges.extend(zip(cuts, cuts[1:], strict=False))
            row += rows
    else:
        ranges = _chunks(path, workers)
    return [_Task(path, fmt, a, b, now, spool_dir / f"chunk-{i:06d}.spool", i == len(ranges) - 1)
            for i, (a, b) in enumerate(ranges)]  # fmt: skip


def _number(offset: int, first: int, n: int) -> int:
    """A chunk's local record number ``n`` in the file (``first``: the number of its local 1)."""
    return first if n == 1 else offset + n


def _scan_chunks(result: Scan, workers: int, progress: Progress | None, now: datetime,
                 tasks: list[_Task] | None = None) -> None:
    """A file validated chunk by chunk (by ``workers`` processes when it has more than one), merged in file order.

    A chunk numbers its records locally: JSON Lines by line from 1, Parquet by row from 1,
    CSV by line from 1 (the first chunk: as the whole file, its header on line 1) with a
    chunk's first row numbered one after the line the previous chunk's last row ended on,
    as ``csv.reader`` over the whole file numbers it. Raises :class:`_Unaligned` when a CSV
    chunk boundary falls inside a quoted field.
    """
    assert result._spool_dir is not None
    seen: set[int] = set()
    offset = 0  # lines (rows) before the chunk
    carried = 2  # CSV: the number of a chunk's first row
    if tasks is None:
        tasks = _table_tasks(result.path, result.fmt, now, result._spool_dir, workers)
    result.spools = [task.spool for task in tasks]
    pool = None
    if workers > 1 and len(tasks) > 1:
        # fork: the children share this process's str hash seed, so their keys hash as ours do
        pool = multiprocessing.get_context("fork").Pool(min(workers, len(tasks)))
    try:
        for index, chunk in enumerate(pool.imap(_scan_chunk, tasks) if pool is not None else map(_scan_chunk, tasks)):
            number = functools.partial(_number, offset, carried if result.fmt == "csv" and offset else offset + 1)

            result.records += chunk["records"]
            result.bad.extend(BadRecord(number(n), reason) for n, reason in chunk["bad"])
            result.repeated_lines.update(map(number, chunk.get("repeated", ())))
            keys = chunk["keys"]
            distinct = set(keys)
            if len(distinct) == len(keys) and seen.isdisjoint(distinct):
                seen |= distinct  # the usual case: no repeats, merged in C
                result.valid += len(keys)
                for period, customers_ in chunk["customers_by_period"].items():
                    result.customers_by_period[period] |= customers_
                if chunk["first"] is not None and (result.first_at is None or chunk["first"] < result.first_at):
                    result.first_at = chunk["first"]
                if chunk["last"] is not None and (result.last_at is None or chunk["last"] > result.last_at):
                    result.last_at = chunk["last"]
            else:
                # a repeat: this chunk again here, with its events' customers and instants (rare)
                task = tasks[index]
                detail = _scan_chunk_unpaused(task, details=True) if task.fmt == "jsonl" \
                    else _scan_table_chunk(task, details=True)  # fmt: skip
                customers, instants = detail["customers"], detail["instants"]
                first_seen = []
                for i, (key, n) in enumerate(zip(keys, chunk["lines"], strict=True)):
                    if key in seen:
                        result.repeated_lines.add(number(n))
                    else:
                        seen.add(key)
                        first_seen.append(i)
                customers, instants = [customers[i] for i in first_seen], [instants[i] for i in first_seen]
                records = task.spool.read_bytes().split(b"\n")[:-1]  # one record a line (a value may hold \r)
                task.spool.write_bytes(b"".join([records[i] + b"\n" for i in first_seen]))  # repeats are sent once
                result.valid += len(customers)
                if customers:
                    _note_instants(result, customers, instants)
            if chunk.get("row_end"):
                carried = offset + chunk["row_end"] + 1
            offset += chunk["newlines"]
            if progress is not None:
                progress(chunk["records"])
    except BaseException:  # a chunk that failed, Ctrl-C: the other processes stop now, not after their chunks
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()


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
    if scanned.spools:
        # The hot loop of a backfill, inlined: the records the scan spooled (valid and first-seen
        # events only), routed by the customer id and kind spooled beside them. JSON Lines are
        # sent as written (the worker validates them again, as for any producer).
        spooled = 0
        with _gc_paused():
            for records in scanned.spooled_blocks():  # ~16k records a block
                poll(0)
                for record in records:
                    customer, event_id, kind, value = record.split(b"\t", 3)
                    if stored and (customer.decode(), event_id.decode()) in stored:
                        already += 1
                        continue
                    topic = outcome_topic if kind == b"o" else usage_topic
                    try:
                        produce(topic, value, customer, -1, on_delivery)
                    except BufferError:
                        produce_when_room(topic, value, customer)
                spooled += len(records)
                if progress is not None:
                    progress(len(records))
        sent = spooled - already
    elif scanned.fmt == "jsonl":
        # The per-event scan's JSON Lines: the lines as written, routed by the two fields read back with orjson.
        loads = orjson.loads
        number = 0
        with scanned.path.open("rb") as handle:
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
