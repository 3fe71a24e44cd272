"""A batch of rows as Arrow columns: how the worker inserts raw events and rated rows.

clickhouse-connect's row inserts serialize every value in Python (per row, per
column); an Arrow table is built column by column in C and sent as one Arrow
stream, which both chDB and a server read natively. Types match the DDL
(sql/001, sql/002, sql/006): strings for String and LowCardinality(String),
UInt columns, ``timestamp[ms, UTC]`` for DateTime64(3, 'UTC') and
``decimal128`` for the Decimal columns.

Money never passes through a float: the rating engine's amounts are integers
of 10**-18 and go to ``decimal128(38, 18)`` as their 16-byte two's complement,
exactly (meterstream/pricing/engine.py); a row model's Decimal is made such an
integer first, cut toward zero at the column's scale as clickhouse-connect's
row insert did (``int(value * 10**scale)``), so the stored figure does not
depend on the insert path. Quantities go the same way, as integers of 10**-9.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

import pyarrow as pa

from meterstream.pricing.engine import RatedBatch
from meterstream.schemas.records import RatedUsage, RawBatch, RawEvent

_TIMESTAMP = pa.timestamp("ms", tz="UTC")
_MONEY = pa.decimal128(38, 18)
_QUANTITY = pa.decimal128(38, 9)
_ONE = Decimal(1)
#: decimal128(38, s) holds integers of 10**-s below 10**38 in magnitude.
_DECIMAL128_LIMIT = 10**38


def _strings(values: Sequence[str]) -> pa.Array:
    n = len(values)
    if n and values.count(values[0]) == n:  # one value (a batch's currency, its id): no conversion per row
        return pa.repeat(pa.scalar(values[0], pa.string()), n)
    return pa.array(values, pa.string())


def _instants(value: datetime, n: int) -> pa.Array:
    """One instant ``n`` times (a batch's ingest or rating time), converted once."""
    return pa.repeat(pa.scalar(value, _TIMESTAMP), n)


def _scaled(value: Decimal, scale: int) -> int:
    """``value`` as an integer of 10**-scale, cut toward zero beyond ``scale`` digits (``int(value * 10**scale)``)."""
    if not value.is_finite():  # NaN and infinities: no column takes them
        raise ValueError(f"{value} is not a finite decimal")
    numerator, denominator = value.as_integer_ratio()
    scaled: int = abs(numerator) * 10**scale // denominator
    return -scaled if numerator < 0 else scaled


def _quantities(values: Sequence[Decimal]) -> pa.Array:
    """decimal128(38, 9), cut toward zero at 9 digits; each distinct quantity converted once (a batch has few)."""
    if not any(values):  # a batch of token events: every quantity 0
        return pa.Array.from_buffers(_QUANTITY, len(values), [None, pa.py_buffer(bytes(16 * len(values)))])
    nanos = {value: _scaled(value, 9) for value in set(values)}  # equal Decimals are one value and cut alike
    return _decimal128(list(map(nanos.__getitem__, values)), _QUANTITY, "a quantity")


def _money(units: list[int]) -> pa.Array:
    """Amounts in 10**-18 (the rating engine's integers) as decimal128(38, 18), without a Decimal per value."""
    return _decimal128(units, _MONEY, "an amount")


def _decimal128(units: list[int], type_: pa.Decimal128Type, what: str) -> pa.Array:
    """Integers of 10**-scale as a decimal128 column: their 16-byte two's complement, exactly."""
    if not units:
        return pa.array([], type_)
    if max(units) >= _DECIMAL128_LIMIT or min(units) <= -_DECIMAL128_LIMIT:
        raise ValueError(f"{what} of {max(map(abs, units))}e-{type_.scale} does not fit Decimal(38, {type_.scale})")
    data = b"".join([u.to_bytes(16, "little", signed=True) for u in units])
    return pa.Array.from_buffers(type_, len(units), [None, pa.py_buffer(data)])


def raw_table(rows: Sequence[RawEvent], ingested_at: datetime) -> pa.Table:
    """``events_raw``: the accepted events as they arrived (payload bytes unchanged)."""
    raw = rows if isinstance(rows, RawBatch) else RawBatch.of(rows)
    n = len(raw)
    return pa.table(
        {
            "event_id": _strings(raw.event_id),
            "customer_id": _strings(raw.customer_id),
            "kind": _strings(raw.kind),
            "occurred_at": pa.array(raw.occurred_at, _TIMESTAMP),
            "period": _strings(raw.period),
            "payload": pa.array(raw.payload, pa.binary()),
            "source_topic": _strings(raw.source_topic),
            "source_partition": pa.array(raw.source_partition, pa.uint32()),
            "source_offset": pa.array(raw.source_offset, pa.uint64()),
            "ingested_at": _instants(ingested_at, n),
        }
    )


def rated_table(
    rows: Sequence[RatedUsage],
    rated_at: datetime,
    batch_id: str = "",
    sources: Sequence[tuple[str, int, int]] | None = None,
) -> pa.Table:
    """``usage_rated``: one priced row per event, every column of sql/002, sql/006 and sql/010.

    ``rows`` as the rating engine's :class:`RatedBatch` (columns as they are) or as row models.
    ``sources`` gives each row's place on the event topics (topic, partition, offset), in the
    order of ``rows``; ``batch_id`` the batch that writes them (meterstream/storage/batches.py).
    """
    rated = rows if isinstance(rows, RatedBatch) else RatedBatch.of(rows)
    n = len(rated)
    places = sources if sources is not None else [("", 0, 0)] * n
    topics, partitions, offsets = zip(*places, strict=True) if n else ((), (), ())
    # The engine's rows as columns in one C-level transpose (EventRow's field order).
    (kind, event_id, customer_id, occurred_at, workflow_id, run_id, meter, model, _, input_tokens, cached_input_tokens,
     output_tokens, quantity, unit, outcome_type, attribution, _) = zip(*rated.events, strict=True) if n else ((),) * 17  # fmt: skip
    if "outcome" in kind:  # an outcome's row counts one
        quantity = tuple(_ONE if k == "outcome" else q for k, q in zip(kind, quantity, strict=True))
    return pa.table(
        {
            "event_id": _strings(event_id),
            "kind": _strings(kind),
            "customer_id": _strings(customer_id),
            "occurred_at": pa.array(occurred_at, _TIMESTAMP),
            "period": _strings(rated.period),
            "meter": _strings(meter),
            "model": _strings(model),
            "provider": _strings(rated.provider),
            "workflow_id": _strings(workflow_id),
            "run_id": _strings(run_id),
            "input_tokens": pa.array(input_tokens, pa.uint64()),
            "cached_input_tokens": pa.array(cached_input_tokens, pa.uint64()),
            "output_tokens": pa.array(output_tokens, pa.uint64()),
            "quantity": _quantities(quantity),
            "unit": _strings(unit),
            "outcome_type": _strings(outcome_type),
            "attribution": _strings(attribution),
            "credits": _money(rated.credits),
            "cost_to_serve": _money(rated.cost),
            "currency": _strings(rated.currency),
            "price_book_version": _strings(rated.price_book_version),
            "rule": _strings(rated.rule),
            "billed_in": _strings(rated.billed_in),
            "rated_at": _instants(rated_at, n),
            "batch_id": _strings([batch_id] * n),
            "source_topic": _strings(topics),
            "source_partition": pa.array(partitions, pa.uint32()),
            "source_offset": pa.array(offsets, pa.uint64()),
        }
    )
