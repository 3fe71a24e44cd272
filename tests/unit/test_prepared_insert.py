"""A write of batches prepared one by one (where the worker rates them) sends what a write of the same
batches joined as rows sent: the same id (its deduplication tokens, which a recovery repeats), the same
tables, row for row, in the same order."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.budgets import Budget, BudgetBook
from meterstream.pricing.engine import RatedBatch
from meterstream.pricing.plans import Catalog
from meterstream.schemas.records import RawBatch, ThresholdAction
from meterstream.storage.batches import (
    batch_id,
    group_tables,
    ordered_rated_table,
    prepare_insert,
    sources_of,
)
from meterstream.storage.columns import raw_table
from meterstream.stream_processors.processing import BatchProcessor, InboundMessage, MonthToDate

T0 = datetime(2025, 3, 15, 12, 0, tzinfo=timezone.utc)
NOW = datetime(2025, 3, 15, 13, 0, 0, 123456, tzinfo=timezone.utc)
BUDGETS = BudgetBook(customers={"acme": Budget(monthly_credits=1, thresholds=(50, 100), action=ThresholdAction.ALERT)})


def _message(i: int, customer: str, topic: str, partition: int, tokens: int) -> InboundMessage:
    value = json.dumps({"event_id": f"e{i}", "customer_id": customer, "occurred_at": (T0 + timedelta(seconds=i)).isoformat(),
                        "model": "large-model", "input_tokens": tokens, "output_tokens": 7}).encode()  # fmt: skip
    return InboundMessage("usage", value, topic, partition, 1_000 - i)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    places=st.lists(st.tuples(st.sampled_from(["usage.events", "u2.events"]), st.integers(0, 2)), min_size=48, max_size=48),
    customers=st.lists(st.sampled_from(["acme", "beta", "Zed", "é-co"]), min_size=48, max_size=48),
    stored=st.sets(st.integers(0, 47), max_size=6),
)
def test_batches_prepared_one_by_one_write_what_the_joined_batches_wrote(book, sizes, places, customers, stored):
    processor = BatchProcessor(Catalog.for_price_book(book), BUDGETS)
    messages = [_message(i, customers[i], *places[i], tokens=100 * (i + 1)) for i in range(48)]
    batches, start = [], 0
    for size in sizes:
        result = processor.process(messages[start : start + size], lambda key: MonthToDate(), now=NOW)
        raw_stored = {(m.topic, m.partition, m.offset) for i, m in enumerate(messages[start : start + size], start)
                      if i in stored}  # fmt: skip
        batches.append((result, raw_stored))
        start += size

    prepared = [prepare_insert(r.raw, r.rated, r.alerts, s, NOW - timedelta(seconds=5)) for r, s in batches]
    batch, raw, rated = group_tables(prepared, NOW)

    # The write before: the batches' rows joined, one id over them, the tables built at the write.
    raw_rows = RawBatch.concat([r.raw for r, _ in batches])
    rated_rows = RatedBatch.concat([r.rated for r, _ in batches])
    alerts = [a.alert_id for r, _ in batches for a in r.alerts]
    every_stored = set().union(*(s for _, s in batches))
    expected_id = batch_id(raw_rows, rated_rows, alerts)
    kept = RawBatch.of([r for r in raw_rows if (r.source_topic, r.source_partition, r.source_offset) not in every_stored])
    assert batch == expected_id
    assert raw.equals(raw_table(kept, NOW))
    assert rated.equals(ordered_rated_table(rated_rows, sources_of(raw_rows, rated_rows), NOW, expected_id))
    assert all(column.num_chunks == 1 for column in (*raw.columns, *rated.columns))  # one record batch: one block
