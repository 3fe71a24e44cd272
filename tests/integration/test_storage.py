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
from meterstream.storage.owner import StoreOwnership, current_owner
from meterstream.storage.queries import query_parameters, saved_query, saved_query_names

pytestmark = pytest.mark.integration


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
        assert rows[0]["credits"] == rated.credits
        assert rows[0]["cost_to_serve"] == rated.cost_to_serve
        assert isinstance(rows[0]["credits"], Decimal)
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


def test_only_one_worker_may_own_the_embedded_store(tmp_path):
    settings = ClickHouseSettings(dsn=f"chdb://{tmp_path / 'store'}")
    mine = StoreOwnership(settings, web_port=1234)
    mine.claim()
    assert current_owner(settings).web_port == 1234
    # A record left by a dead process is ignored.
    mine.path.write_text('{"pid": 999999999, "web_port": 1}')
    assert current_owner(settings) is None
    mine.claim()
    mine.release()
    assert current_owner(settings) is None
