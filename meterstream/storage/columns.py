"""A batch of rows as Arrow columns: how the worker inserts raw events and rated rows.

clickhouse-connect's row inserts serialize every value in Python (per row, per
column); an Arrow table is built column by column in C and sent as one Arrow
stream, which both chDB and a server read natively. Types match the DDL
(sql/001, sql/002, sql/006): strings for String and LowCardinality(String),
UInt columns, ``timestamp[ms, UTC]`` for DateTime64(3, 'UTC') and
``decimal128`` for the Decimal columns.

Money never passes through a float: Decimal values go to ``decimal128`` as
they are. A value with more fractional digits than the column holds is cut
toward zero at the column's scale, as clickhouse-connect's row insert did
(``int(value * 10**scale)``), so the stored figure does not depend on the
insert path.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import ROUND_DOWN, Decimal

import pyarrow as pa

from meterstream.schemas.records import RatedUsage, RawEvent

_TIMESTAMP = pa.timestamp("ms", tz="UTC")
_MONEY = pa.decimal128(38, 18)
_QUANTITY = pa.decimal128(38, 9)
_MONEY_STEP = Decimal(1).scaleb(-18)
_QUANTITY_STEP = Decimal(1).scaleb(-9)


def _exponent(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    if isinstance(exponent, str):  # NaN and infinities: no column takes them
        raise ValueError(f"{value} is not a finite decimal")
    return exponent


def _decimals(values: list[Decimal], step: Decimal, scale: int, type_: pa.DataType) -> pa.Array:
    # Exact when every value fits the scale (the usual case); otherwise cut each to it first.
    fitted = [v if _exponent(v) >= -scale else v.quantize(step, rounding=ROUND_DOWN) for v in values]
    return pa.array(fitted, type_)


def _strings(values: list[str]) -> pa.Array:
    return pa.array(values, pa.string())


def raw_table(rows: Sequence[RawEvent], ingested_at: datetime) -> pa.Table:
    """``events_raw``: the accepted events as they arrived (payload bytes unchanged)."""
    return pa.table(
        {
            "event_id": _strings([r.event_id for r in rows]),
            "customer_id": _strings([r.customer_id for r in rows]),
            "kind": _strings([r.kind for r in rows]),
            "occurred_at": pa.array([r.occurred_at for r in rows], _TIMESTAMP),
            "period": _strings([r.period for r in rows]),
            "payload": pa.array([r.payload for r in rows], pa.binary()),
            "source_topic": _strings([r.source_topic for r in rows]),
            "source_partition": pa.array([r.source_partition for r in rows], pa.uint32()),
            "source_offset": pa.array([r.source_offset for r in rows], pa.uint64()),
            "ingested_at": pa.array([ingested_at] * len(rows), _TIMESTAMP),
        }
    )


def rated_table(
    rows: Sequence[RatedUsage],
    rated_at: datetime,
    batch_id: str = "",
    sources: Sequence[tuple[str, int, int]] | None = None,
) -> pa.Table:
    """``usage_rated``: one priced row per event, every column of sql/002, sql/006 and sql/010.

    ``sources`` gives each row's place on the event topics (topic, partition, offset), in the
    order of ``rows``; ``batch_id`` the batch that writes them (meterstream/storage/batches.py).
    """
    places = sources if sources is not None else [("", 0, 0)] * len(rows)
    return pa.table(
        {
            "event_id": _strings([r.event_id for r in rows]),
            "kind": _strings([r.kind for r in rows]),
            "customer_id": _strings([r.customer_id for r in rows]),
            "occurred_at": pa.array([r.occurred_at for r in rows], _TIMESTAMP),
            "period": _strings([r.period for r in rows]),
            "meter": _strings([r.meter for r in rows]),
            "model": _strings([r.model for r in rows]),
            "provider": _strings([r.provider for r in rows]),
            "workflow_id": _strings([r.workflow_id for r in rows]),
            "run_id": _strings([r.run_id for r in rows]),
            "input_tokens": pa.array([r.input_tokens for r in rows], pa.uint64()),
            "cached_input_tokens": pa.array([r.cached_input_tokens for r in rows], pa.uint64()),
            "output_tokens": pa.array([r.output_tokens for r in rows], pa.uint64()),
            "quantity": _decimals([r.quantity for r in rows], _QUANTITY_STEP, 9, _QUANTITY),
            "unit": _strings([r.unit for r in rows]),
            "outcome_type": _strings([r.outcome_type for r in rows]),
            "attribution": _strings([r.attribution for r in rows]),
            "credits": _decimals([r.credits for r in rows], _MONEY_STEP, 18, _MONEY),
            "cost_to_serve": _decimals([r.cost_to_serve for r in rows], _MONEY_STEP, 18, _MONEY),
            "currency": _strings([r.currency for r in rows]),
            "price_book_version": _strings([r.price_book_version for r in rows]),
            "rule": _strings([r.rule for r in rows]),
            "billed_in": _strings([r.billed_in for r in rows]),
            "rated_at": pa.array([rated_at] * len(rows), _TIMESTAMP),
            "batch_id": _strings([batch_id] * len(rows)),
            "source_topic": _strings([p[0] for p in places]),
            "source_partition": pa.array([p[1] for p in places], pa.uint32()),
            "source_offset": pa.array([p[2] for p in places], pa.uint64()),
        }
    )
