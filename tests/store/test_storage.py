"""The DDL and the sink against the real ClickHouse engine (chDB in-process, or a server).

chDB allows one data directory per process, so every in-process test here uses
the session's directory with a fresh database per test (clickhouse-connect's
own test style).
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from meterstream.config import ClickHouseSettings
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import RawEvent
from meterstream.storage.clickhouse import connect, discover_migrations, migrate, open_store
from meterstream.storage.queries import query_parameters, saved_query, saved_query_names

pytestmark = pytest.mark.store


def test_migrations_apply_to_a_fresh_database_once(clickhouse):
    client = connect(clickhouse)
    try:
        applied = migrate(client)
        assert applied == [m.name for m in discover_migrations()]
        assert migrate(client) == []  # idempotent
        tables = {row[0] for row in client.query("SHOW TABLES").result_rows}
        assert {"events_raw", "usage_rated", "budget_alerts", "schema_migrations"} <= tables
        types = dict(client.query("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                                  "AND table = 'usage_rated'").result_rows)  # fmt: skip
        assert types["credits"] == "Decimal(38, 18)" and types["cost_to_serve"] == "Decimal(38, 18)"
    finally:
        client.close()


def test_a_rated_row_reads_back_exactly_and_resends_collapse(clickhouse):
    store = open_store(clickhouse)
    try:
        event = UsageEvent(
            event_id="ev-1", customer_id="acme", occurred_at=datetime(2026, 11, 3, tzinfo=timezone.utc),
            model="gpt-4o-mini", input_tokens=123_457, cached_input_tokens=1_001, output_tokens=9_999,
        )  # fmt: skip
        rated = load_catalog().rate(event)
        raw = RawEvent("ev-1", "acme", "usage", rated.occurred_at, "2026-11", event.model_dump_json().encode(),
                       "usage.events", 0, 42)  # fmt: skip
        for _ in range(3):  # the sink retried, or the event was resent: one row before any merge
            store.insert_batch([raw], [rated])
        rows = store.query(saved_query("month_to_date"), {"period": "2026-11", "customer": ""}).dicts()
        assert len(rows) == 1
        assert rows[0]["events"] == 1
        assert rows[0]["usage_credits"] == rated.credits and rows[0]["outcome_credits"] == 0
        assert rows[0]["cost_to_serve"] == rated.cost_to_serve
        assert isinstance(rows[0]["usage_credits"], Decimal)
        totals = store.query(saved_query("store_totals"), {"period": "2026-11"}).dicts()[0]
        assert (totals["raw_events"], totals["rated_rows"]) == (1, 1)
    finally:
        store.close()


def test_every_saved_query_runs_on_an_empty_store(clickhouse):
    store = open_store(clickhouse)
    try:
        for name in saved_query_names():
            params = {p: "" for p in query_parameters(name)}
            params["period"] = "2026-11"
            result = store.query(saved_query(name), params)
            if name == "store_totals":
                assert result.dicts()[0]["rated_rows"] == 0
            else:
                assert result.rows == [], name
    finally:
        store.close()


def test_in_process_chdb_store_serves_a_single_process_tool(tmp_path):
    """chdb:// is kept for single-process tools (bench/invoice.py): the DDL, a batch and a saved query."""
    from meterstream.schemas.records import RatedUsage, RawEvent

    settings = ClickHouseSettings(dsn=f"chdb://{tmp_path / 'store'}")
    store = open_store(settings)
    try:
        at = datetime(2026, 11, 3, 10, 0, tzinfo=timezone.utc)
        store.insert_batch(
            [RawEvent("e1", "acme", "usage", at, "2026-11", b"{}", "usage.events", 0, 0)],
            [RatedUsage(event_id="e1", kind="usage", customer_id="acme", occurred_at=at, period="2026-11",
                        meter="tokens", model="gpt-4o", provider="openai", input_tokens=1000, credits=Decimal("2.5"),
                        cost_to_serve=Decimal("0.0025"), price_book_version="v1", rule="tokens:gpt-4o")],
        )  # fmt: skip
        totals = store.query(saved_query("store_totals"), {"period": "2026-11"}).dicts()[0]
        assert (totals["raw_events"], totals["rated_rows"], totals["credits"]) == (1, 1, Decimal("2.5"))
    finally:
        store.close()


def test_every_column_of_a_batch_reads_back_as_written(clickhouse):
    """The Arrow insert path: strings, counts, microsecond times, negative and long decimals, raw bytes."""
    from meterstream.schemas.records import RatedUsage

    at = datetime(2026, 11, 3, 10, 20, 30, 123_987, tzinfo=timezone.utc)
    rows = [
        RatedUsage(
            event_id="ev-a", kind="usage", customer_id="acme", occurred_at=at, period="2026-11",
            meter="documents", model="", provider="", workflow_id="wf/1", run_id="run:9",
            input_tokens=0, cached_input_tokens=0, output_tokens=0, quantity=Decimal("2.123456789"),
            unit="page", credits=Decimal("0.000000000000000001"), cost_to_serve=Decimal("123456789.123456789012345678"),
            price_book_version="v1", rule="meter:documents",
        ),
        RatedUsage(
            event_id="ev-b", kind="outcome", customer_id="acme", occurred_at=at, period="2026-11",
            meter="outcome", outcome_type="resolved_ticket", attribution="ai_only", quantity=Decimal(1),
            # 20 fractional digits: stored cut toward zero at 18, as the row insert did.
            credits=Decimal("-1.99999999999999999999"), cost_to_serve=Decimal("-0.5"),
            price_book_version="v1", rule="outcome:resolved_ticket:ai_only:reversal", billed_in="2026-12",
        ),
    ]  # fmt: skip
    payload = '{"event_id":"ev-a","note":"café ✓"}'.encode()
    raw = [RawEvent("ev-a", "acme", "usage", at, "2026-11", payload, "usage.events", 7, 2**40)]
    store = open_store(clickhouse)
    try:
        store.insert_batch(raw, rows)
        got = store.query(
            "SELECT * EXCEPT rated_at FROM usage_rated ORDER BY event_id", {}
        ).dicts()
        assert got[0]["quantity"] == Decimal("2.123456789")
        assert got[0]["credits"] == Decimal("0.000000000000000001")
        assert got[0]["cost_to_serve"] == Decimal("123456789.123456789012345678")
        # DateTime64(3): milliseconds, cut (not rounded), as the row insert did.
        assert got[0]["occurred_at"].replace(tzinfo=timezone.utc) == at.replace(microsecond=123_000)
        assert (got[0]["workflow_id"], got[0]["run_id"], got[0]["unit"]) == ("wf/1", "run:9", "page")
        assert got[1]["credits"] == Decimal("-1.999999999999999999")
        assert got[1]["cost_to_serve"] == Decimal("-0.5")
        assert (got[1]["outcome_type"], got[1]["attribution"], got[1]["billed_in"]) == ("resolved_ticket", "ai_only", "2026-12")
        [stored] = store.query("SELECT payload, source_partition, source_offset FROM events_raw", {}).rows
        assert stored[0].encode() == payload if isinstance(stored[0], str) else stored[0] == payload
        assert stored[1:] == [7, 2**40]
    finally:
        store.close()
