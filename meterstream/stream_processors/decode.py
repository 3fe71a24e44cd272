"""Decode a Kafka message into an event or a rejection. Never raises.

A worker that raises on one message would stop the whole batch, so every failure
here becomes data: a :class:`Rejection` with the raw bytes and a reason that
the worker sends to the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from itertools import compress, repeat
from operator import eq
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from meterstream.pricing.engine import EventRow, row_of, rows_of_columns
from meterstream.schemas import columnar
from meterstream.schemas.events import MAX_FUTURE_SKEW, OutcomeEvent, UsageEvent
from meterstream.schemas.validation import MAX_EVENT_BYTES, describe_validation_error

__all__ = ["MAX_EVENT_BYTES", "DecodedBatch", "Rejection", "decode_batch", "decode_event", "describe_validation_error",
           "received_at"]


_MODEL_FOR_TOPIC: dict[str, type[UsageEvent] | type[OutcomeEvent]] = {
    "usage": UsageEvent,
    "outcome": OutcomeEvent,
}


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str


_ZERO = Decimal(0)


def received_at(timestamp_ms: int | None, now: datetime | None = None) -> datetime | None:
    """A message's broker timestamp as the time it was received, never later than ``now``.

    A producer chooses CreateTime timestamps, so one set ahead of the worker's clock counts as now.
    None without a timestamp (the wall clock decides then).
    """
    if timestamp_ms is None or timestamp_ms < 0:
        return None
    try:
        at = datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return min(at, now) if now is not None else at


def decode_event(
    raw: bytes | None, kind: Literal["usage", "outcome"], received: datetime | None = None
) -> UsageEvent | OutcomeEvent | Rejection:
    """Parse and validate one message value from the ``kind`` topic.

    The topic decides the model, so ``type`` may be omitted; a present ``type``
    that does not match the topic is rejected ("type: Input should be 'usage'").
    ``received`` (the message's broker timestamp, see :func:`received_at`) is what the
    future-time limit is checked against; without it, the wall clock.
    """
    if raw is None:
        return Rejection("empty message (null value)")
    if len(raw) > MAX_EVENT_BYTES:
        return Rejection(f"message is {len(raw)} bytes; the limit is {MAX_EVENT_BYTES}")
    try:
        context = {"received_at": received} if received is not None else None
        return _MODEL_FOR_TOPIC[kind].model_validate_json(raw, context=context)
    except ValidationError as exc:
        return Rejection(f"invalid event: {describe_validation_error(exc)}")
    except (ValueError, RecursionError) as exc:  # defensive: pydantic-core reports most as ValidationError
        return Rejection(f"undecodable message: {str(exc)[:500]}")
    except Exception as exc:
        return Rejection(f"undecodable message ({type(exc).__name__}): {str(exc)[:500]}")


@dataclass(slots=True)
class DecodedBatch:
    """A batch of messages decoded: the valid events as the rating engine's rows, and the rest with why."""

    #: Per valid event: its position in the batch, ascending.
    positions: list[int]
    rows: list[EventRow]
    #: ``(position, reason)`` of every message refused, ascending.
    rejections: list[tuple[int, str]]


def decode_batch(
    values: Sequence[bytes | None],
    kinds: Sequence[Literal["usage", "outcome"]],
    timestamps_ms: Sequence[int | None],
    now: datetime,
) -> DecodedBatch:
    """Decode and validate a batch of message values, with the verdicts of :func:`decode_event`.

    The values are read with orjson and grouped by topic and key layout; each group of at
    least :data:`_MIN_GROUP` goes through :func:`meterstream.schemas.columnar.accept`, which
    accepts, column by column, only rows it can prove the model accepts. Every other message
    (refused there, not a JSON object, too big, dated more than the skew past its own broker
    timestamp) is decoded alone by :func:`decode_event`, so every rejection is the model's,
    text and all. ``now`` is the caller's clock, read before the call.
    """
    n = len(values)
    slow: list[int] = []
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    parsed: list[Any] = []
    loads = orjson.loads
    if n and None not in values and max(map(len, values)) <= MAX_EVENT_BYTES:  # type: ignore[arg-type]
        try:
            parsed = list(map(loads, values))  # type: ignore[arg-type]
        except orjson.JSONDecodeError:
            parsed = []
    if parsed and set(map(type, parsed)) == {dict}:  # the usual batch: every value an object
        layouts = list(zip(kinds, map(tuple, parsed), strict=True))
        distinct = set(layouts)
        if len(distinct) <= _FEW_LAYOUTS:  # a pass per layout, in C
            groups = {layout: list(compress(range(n), map(eq, layouts, repeat(layout)))) for layout in distinct}
        else:
            for i, layout in enumerate(layouts):
                groups.setdefault(layout, []).append(i)
    else:
        parsed = [None] * n
        for i, value in enumerate(values):
            if value is None or len(value) > MAX_EVENT_BYTES:
                slow.append(i)
                continue
            try:
                obj = loads(value)
            except orjson.JSONDecodeError:
                slow.append(i)
                continue
            if type(obj) is not dict:
                slow.append(i)
                continue
            parsed[i] = obj
            groups.setdefault((kinds[i], tuple(obj)), []).append(i)
    positions: list[int] = []
    rows: list[EventRow] = []
    for (kind, keys), members in groups.items():
        if len(members) < _MIN_GROUP:
            slow.extend(members)
            continue
        objs = [parsed[i] for i in members]
        columns = columnar.transpose(keys, objs)
        if kind == "outcome" and "type" not in columns:
            columns["type"] = ["outcome"] * len(objs)  # the topic's model: an absent type is its default
        got = columnar.accept(columns, len(objs), none_is_absent=False, now=now)
        outcome = kind == "outcome"
        taken = _rows_of(columns, len(objs), got, outcome)
        late = _after_receipt(got.occurred_at, [timestamps_ms[members[r]] for r in got.rows], now)
        if not late and set(got.outcome) <= {outcome}:  # the usual group: every accepted row is the topic's kind
            positions.extend(map(members.__getitem__, got.rows))
            rows.extend(taken)
            if len(got.rows) != len(members):
                accepted_rows = set(got.rows)
                slow.extend(members[r] for r in range(len(members)) if r not in accepted_rows)
            continue
        accepted: set[int] = set()
        for j, r in enumerate(got.rows):
            accepted.add(r)
            if got.outcome[j] is not outcome or j in late:
                # The other kind's event on this topic, or too far past its broker time: the model says why.
                slow.append(members[r])
                continue
            positions.append(members[r])
            rows.append(taken[j])
        slow.extend(members[r] for r in range(len(members)) if r not in accepted)
    rejections: list[tuple[int, str]] = []
    for i in slow:
        decoded = decode_event(values[i], kinds[i], received_at(timestamps_ms[i], now))
        if isinstance(decoded, Rejection):
            rejections.append((i, decoded.reason))
        else:
            positions.append(i)
            rows.append(row_of(decoded))
    if slow or len(groups) > 1:
        order = sorted(range(len(positions)), key=positions.__getitem__)
        positions = [positions[i] for i in order]
        rows = [rows[i] for i in order]
        rejections.sort()
    return DecodedBatch(positions, rows, rejections)


#: Up to this many topic and key layouts in a batch, its messages are grouped with a C pass per layout.
_FEW_LAYOUTS = 8

#: Messages of one topic and key layout below this many are decoded one by one (not worth a column pass).
_MIN_GROUP = 8


def _after_receipt(instants: list[datetime], timestamps_ms: list[int | None], now: datetime) -> set[int]:
    """The rows dated past the future-time limit of their own message (see :func:`received_at`).

    :func:`columnar.accept` checked them against ``now``; the model checks each against its
    message's broker time. One comparison for the usual batch (all inside the earliest one's).
    """
    if not instants:
        return set()
    if None not in timestamps_ms:
        earliest = received_at(min(timestamps_ms), now)  # type: ignore[type-var]
        if earliest is not None and max(instants) - earliest <= MAX_FUTURE_SKEW:
            return set()
    late = set()
    for j, (at, timestamp) in enumerate(zip(instants, timestamps_ms, strict=True)):
        received = received_at(timestamp, now)
        if received is not None and at - received > MAX_FUTURE_SKEW:
            late.add(j)
    return late


def _rows_of(columns: dict[str, list[Any]], size: int, got: columnar.Accepted, outcome: bool) -> list[EventRow]:
    """The accepted rows of a group of ``size`` as engine rows (absent fields take the models' defaults)."""
    keep = got.rows
    whole = len(keep) == size

    def column(name: str, default: Any) -> list[Any]:
        values = columns.get(name)
        if values is None:
            return [default] * len(keep)
        if whole and None not in values:  # every row accepted, none null: the column as it is
            return values
        return [default if values[i] is None else values[i] for i in keep]

    n = len(keep)
    kind = "outcome" if outcome else "usage"
    if outcome:
        return list(rows_of_columns(zip(
            [kind] * n, got.event_id, got.customer_id, got.occurred_at, column("workflow_id", ""),
            column("run_id", ""), ["outcome"] * n, [""] * n, [""] * n, [0] * n, [0] * n, [0] * n, [_ZERO] * n,
            [""] * n, column("outcome_type", ""), column("attribution", ""), column("reversal_of", ""),
            strict=True,
        )))  # fmt: skip
    # a quantity is an int or a string of digits (the rule); a batch has few distinct ones
    given = column("quantity", 0)
    distinct = {q: Decimal(q) for q in set(given)}
    quantities = list(map(distinct.__getitem__, given))
    return list(rows_of_columns(zip(
        [kind] * n, got.event_id, got.customer_id, got.occurred_at, column("workflow_id", ""),
        column("run_id", ""), column("meter", "tokens"), column("model", ""), column("provider", ""),
        column("input_tokens", 0), column("cached_input_tokens", 0), column("output_tokens", 0), quantities,
        column("unit", ""), [""] * n, [""] * n, [""] * n, strict=True,
    )))  # fmt: skip
