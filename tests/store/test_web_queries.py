"""The customer web server's saved queries on the real server: each carries the configured time limit."""

from __future__ import annotations

import asyncio

import pytest

from meterstream.config import ClickHouseSettings
from meterstream.storage.clickhouse import open_store
from meterstream.web.store import CustomerQueries

pytestmark = pytest.mark.store


def test_each_web_query_runs_with_the_configured_time_limit(clickhouse: ClickHouseSettings):
    store = open_store(clickhouse)
    try:
        started = store.client.query("SELECT now64(6)").result_rows[0][0]
        queries = CustomerQueries(clickhouse, timeout=7.5)

        async def run() -> list[dict]:
            try:
                return await queries("customer_budget_alerts", "acme", period="2026-11")
            finally:
                await queries.close()

        assert asyncio.run(run()) == []
        store.client.command("SYSTEM FLUSH LOGS")
        limits = store.client.query(
            "SELECT Settings['max_execution_time'] FROM system.query_log WHERE type = 'QueryFinish' "
            "AND query_kind = 'Select' AND has(databases, {db:String}) AND query LIKE '%budget_alerts%' "
            "AND query_start_time_microseconds >= {started:DateTime64(6)}",
            parameters={"db": clickhouse.database, "started": started},
        ).result_rows
    finally:
        store.close()
    assert limits == [("7.5",)]
