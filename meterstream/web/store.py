"""How the web server reads the store: saved queries only, always bound to one customer.

The web process holds one connection of its own to the ClickHouse server, as a
reader (point METERSTREAM_CLICKHOUSE__DSN at a read-only user in production).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from meterstream.config import ClickHouseSettings
from meterstream.storage.clickhouse import ClickHouseStore, StoreError, open_store
from meterstream.storage.queries import query_parameters, saved_query


class Rows(Protocol):
    async def __call__(self, name: str, customer: str, **params: str) -> list[dict[str, Any]]: ...


class CustomerQueries:
    """Run a saved query for one customer; refuses queries that do not bind ``customer``.

    Each query runs with the server's ``max_execution_time`` set to ``timeout`` seconds, so a
    slow one ends there (a StoreError: the API answers 503) instead of holding the one
    connection, and every other customer's request behind it.
    """

    def __init__(self, settings: ClickHouseSettings, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self._store: ClickHouseStore | None = None
        self._lock = asyncio.Lock()  # one query at a time on the server connection

    async def __call__(self, name: str, customer: str, **params: str) -> list[dict[str, Any]]:
        expected = query_parameters(name)
        if "customer" not in expected:
            raise ValueError(f"saved query {name} does not bind a customer; the web server cannot run it")
        if not customer:
            raise ValueError("a customer is required")
        bound = {**params, "customer": customer}
        if set(bound) != expected:
            raise ValueError(f"saved query {name} takes {sorted(expected)}, got {sorted(bound)}")
        async with self._lock:
            if self._store is None:
                # The worker applies migrations; a reader that ran them could race it.
                self._store = await asyncio.to_thread(open_store, self.settings, apply_migrations=False)
            store = self._store
            try:
                result = await asyncio.to_thread(store.query, saved_query(name), bound,
                                                 {"max_execution_time": self.timeout})  # fmt: skip
            except StoreError:
                self._store = None  # reconnect next time
                await asyncio.to_thread(store.close)
                raise
        return result.dicts()

    async def close(self) -> None:
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
