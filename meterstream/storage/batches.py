"""A write cut by a crash, made whole: batch ids, deduplication tokens, recovery at assignment.

A batch's write is three inserts (events_raw, usage_rated, budget_alerts), and the insert into
usage_rated pushes its block to the views one target at a time (usage_hourly, usage_daily,
usage_recent, then usage_day_counts from usage_recent). A SIGKILL of the worker, or of the
ClickHouse server, can cut that anywhere: after a table's part but before a view's, after
usage_rated but before budget_alerts, between two partitions of one insert.

- Every batch has an id, :func:`batch_id`: a digest of what it writes (each row's place on the
  event topics, its key, the alerts), so the same in-memory batch retried after a store error
  has the same id. Each insert carries ``insert_deduplication_token = '<id>:<table>'`` with
  ``deduplicate_blocks_in_dependent_materialized_views = 1`` (:func:`insert_settings`); with
  the dedup window of sql/010 on every table and view target, an insert repeated with the same
  token is skipped by every table that has the block and written to every one that lacks it.
- usage_rated rows keep their batch id and their source position. A worker taking partitions
  finds the batches stored past the group's committed offsets (written, never committed, so a
  crash may have cut them) and writes each again from its own stored rows, in the order and
  with the column types of the first write, under the first write's token
  (:func:`recover_batches`): usage_rated skips it and each view target that lacks it gets it.
  No dedupe decision is taken again (the rows are the ones stored), so nothing can differ.
- The engine's token is per partition, but a view's block is cut into parts by the target's
  partition key in the order of the rows, so the rows go in one canonical order
  (:data:`ORDER`), the same at the first write and at the recovery, and a recovery sends one
  Arrow record batch (each is a block): measured on the 26.9 server, a recovery in another
  order, in two record batches, or as ``INSERT ... SELECT`` was not recognised and doubled
  tables that had the block (docs/storage.md).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyarrow as pa
from clickhouse_connect.driver.client import Client

from meterstream.pricing.engine import RatedBatch
from meterstream.schemas.records import RawBatch
from meterstream.storage.columns import rated_table

log = logging.getLogger(__name__)

#: The order rated rows are inserted in, first and at a recovery (unique per row of a batch).
ORDER = ("source_topic", "source_partition", "source_offset", "customer_id", "event_id")


def batch_id(raw: RawBatch, rated: RatedBatch, alert_ids: Sequence[str]) -> str:
    """A digest of what a batch writes: the same rows give the same id (and tokens)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update("".join([
        f"r|{t}|{p}|{o}|{c}|{e}\n"
        for t, p, o, c, e in zip(raw.source_topic, raw.source_partition, raw.source_offset, raw.customer_id,
                                 raw.event_id, strict=True)
    ]).encode())  # fmt: skip
    digest.update("".join([
        f"u|{e.customer_id}|{e.event_id}|{period}|{credits}\n"
        for e, period, credits in zip(rated.events, rated.period, rated.credits, strict=True)
    ]).encode())  # fmt: skip
    for a in alert_ids:
        digest.update(f"a|{a}\n".encode())
    return digest.hexdigest()


def insert_settings(batch: str, table: str) -> dict[str, object]:
    """The settings of one table's insert of a batch (the token is per table)."""
    return {
        "insert_deduplication_token": f"{batch}:{table}",
        "deduplicate_blocks_in_dependent_materialized_views": 1,
        # The view into usage_recent writes one partition per day: a backlog may span more than 100.
        "max_partitions_per_insert_block": 0,
    }


def sources_of(raw: RawBatch, rated: RatedBatch) -> list[tuple[str, int, int]]:
    """Each rated row's place on the event topics (the processor emits raw and rated rows in pairs)."""
    if len(raw) == len(rated) and raw.event_id == [e.event_id for e in rated.events]:
        return list(zip(raw.source_topic, raw.source_partition, raw.source_offset, strict=True))
    return [("", 0, 0)] * len(rated)


def ordered_rated_table(
    rated: RatedBatch, sources: Sequence[tuple[str, int, int]], rated_at: datetime, batch: str
) -> pa.Table:
    """usage_rated's insert of a batch, its rows in :data:`ORDER` (sorted by Arrow: UTF-8 bytes sort as code points)."""
    table = rated_table(rated, rated_at, batch, sources)
    return table.sort_by([(name, "ascending") for name in ORDER])


@dataclass
class Recovery:
    """What a recovery at assignment did."""

    batches: int = 0
    rows: int = 0
    seconds: float = 0.0


#: With no committed offset for a partition (a new consumer group, or its offsets expired after
#: the broker's offsets.retention.minutes), only its batches stored within this span before its
#: newest one are written again: a cut batch is among the last ones written, and a batch older
#: than the dedup window (10,000 blocks per table) would be doubled in the views, not skipped.
UNCOMMITTED_HORIZON = timedelta(minutes=10)

_NEWEST = """
SELECT source_topic, source_partition, max(rated_at) AS newest
FROM usage_rated
WHERE batch_id != '' AND ({positions})
GROUP BY source_topic, source_partition
"""

_UNCOMMITTED = """
SELECT batch_id, any(rated_at) AS batch_rated_at
FROM usage_rated
WHERE batch_id != '' AND ({positions})
GROUP BY batch_id
"""


def recover_batches(client: Client, committed: Mapping[tuple[str, int], int | None]) -> Recovery:
    """Write again, from usage_rated's own rows, every batch stored past ``committed``.

    ``committed``: the group's committed offset of each partition the worker was assigned
    (None: nothing committed, so its batches stored within :data:`UNCOMMITTED_HORIZON` before its
    newest one count). Cheap when nothing was cut: one query, which the minmax index on
    source_offset narrows to the newest granules.
    """
    started = time.monotonic()
    result = Recovery()
    if not committed:
        return result
    clauses: list[str] = []
    parameters: dict[str, object] = {}
    unknown = sorted(place for place, offset in committed.items() if offset is None)
    if unknown:
        where = " OR ".join(f"(source_topic = {{t{i}:String}} AND source_partition = {{p{i}:UInt32}})"
                            for i in range(len(unknown)))  # fmt: skip
        newest = client.query(
            _NEWEST.format(positions=where),
            parameters={k: v for i, (t, p) in enumerate(unknown) for k, v in ((f"t{i}", t), (f"p{i}", p))},
        ).result_rows
        for i, (topic, partition, at) in enumerate(newest):
            clauses.append(f"(source_topic = {{nt{i}:String}} AND source_partition = {{np{i}:UInt32}}"
                           f" AND rated_at >= {{ns{i}:DateTime64(3, 'UTC')}})")  # fmt: skip
            parameters.update({f"nt{i}": topic, f"np{i}": partition, f"ns{i}": at - UNCOMMITTED_HORIZON})
    for i, ((topic, partition), offset) in enumerate(sorted(committed.items())):
        if offset is None:
            continue
        clauses.append(f"(source_topic = {{t{i}:String}} AND source_partition = {{p{i}:UInt32}}"
                       f" AND source_offset >= {{o{i}:UInt64}})")  # fmt: skip
        parameters.update({f"t{i}": topic, f"p{i}": partition, f"o{i}": max(offset, 0)})
    if not clauses:
        return result
    found = client.query(_UNCOMMITTED.format(positions=" OR ".join(clauses)), parameters=parameters).result_rows
    schema = rated_table([], datetime.now(timezone.utc)).schema
    for batch, rated_at in found:
        # All of a batch's rows share its rated_at, which the minmax index on rated_at narrows to.
        rows = client.query_arrow(
            f"SELECT {', '.join(schema.names)} FROM usage_rated "
            "WHERE rated_at = {at:DateTime64(3, 'UTC')} AND batch_id = {batch:String} "
            f"ORDER BY {', '.join(ORDER)}",
            parameters={"at": rated_at, "batch": batch},
        )
        # One record batch, as the first write sent: the rows of several parts come back as several,
        # and each record batch is its own block to the engine (a block boundary the first write
        # did not have would not be recognised).
        table = pa.Table.from_arrays(
            [rows.column(name).cast(field.type) for name, field in zip(schema.names, schema, strict=True)],
            schema=schema,
        ).combine_chunks()
        client.insert_arrow("usage_rated", table, settings=insert_settings(batch, "usage_rated"))
        result.batches += 1
        result.rows += table.num_rows
    result.seconds = time.monotonic() - started
    if result.batches:
        log.warning("wrote again %d batches (%d rated rows) stored past the committed offsets, in %.2f s",
                    result.batches, result.rows, result.seconds)  # fmt: skip
    return result
