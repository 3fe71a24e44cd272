"""The customer's money on the page: the invoice preview and the issued invoices.

Both are computed by the one invoice engine (:func:`meterstream.billing.invoice_from_store`),
so the page shows exactly what ``meterstream invoice --json`` prints, and read the store
only through the customer-bound saved queries (``customer_periods``, ``invoice_usage``,
``late_usage``: each takes ``customer``).

:func:`issued_invoices` is the one place that says where issued invoices come from:
the customer's closed periods, each through :func:`invoice_from_store`, which returns
the stored record of an issued invoice (``issued_invoices``, sql/008) exactly as it was
billed, and computes a closed period not issued yet. To list only stored records, or
read them through their own saved query, change this function; nothing else on the
page changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

from meterstream.billing import invoice_from_store
from meterstream.cs.render import plain_tree
from meterstream.periods import previous_period
from meterstream.pricing.invoice import Invoice
from meterstream.pricing.plans import Catalog
from meterstream.web.store import Rows

#: How many closed periods the page lists.
ISSUED_SHOWN = 12


class _Result:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows

    def dicts(self) -> list[dict[str, Any]]:
        return self._rows


def bound_runner(queries: Rows, customer: str, loop: asyncio.AbstractEventLoop, timeout: float) -> Callable[..., Any]:
    """A synchronous ``run(name, **params)`` (what the billing code takes) over the server's async
    customer-bound queries, for use in a worker thread. A query for any other customer is refused."""

    def run(name: str, **params: str) -> _Result:
        if params.pop("customer", customer) != customer:
            raise ValueError("the web server reads one customer per request")
        future = asyncio.run_coroutine_threadsafe(queries(name, customer, **params), loop)
        return _Result(future.result(timeout))

    return run


def invoice_json(invoice: Invoice) -> dict[str, Any]:
    """The invoice as ``invoice --json`` prints it (decimals as plain strings)."""
    tree: dict[str, Any] = plain_tree(invoice)
    return tree


def invoice_for(run: Callable[..., Any], catalog: Catalog, customer: str, period: str, now: datetime) -> Invoice:
    return invoice_from_store(run, catalog, customer, period, as_of=now)


def issued_invoices(run: Callable[..., Any], catalog: Catalog, customer: str, now: datetime) -> list[Invoice]:
    """The customer's invoices of closed periods, newest first (see the module docstring)."""
    current = now.strftime("%Y-%m")
    periods = [row["period"] for row in run("customer_periods", customer=customer).dicts()]
    closed = [p for p in periods if p < current][-ISSUED_SHOWN:]
    return [invoice_for(run, catalog, customer, p, now) for p in reversed(closed)]


__all__ = ["bound_runner", "invoice_for", "invoice_json", "issued_invoices", "previous_period"]
