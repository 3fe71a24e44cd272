"""Issued invoices in ClickHouse (sql/008_issued_invoices.sql): written once when a period closes.

Written through clickhouse-connect's client API (``client.insert``), so the same code runs on
the embedded engine and on a ClickHouse server. Reads go through the saved queries
``issued_invoice`` and ``issued_customers`` (see :mod:`meterstream.billing`).
"""

from __future__ import annotations

from typing import Any

from meterstream.pricing.invoice import Invoice, catalog_fingerprint
from meterstream.pricing.plans import Catalog
from meterstream.storage.clickhouse import StoreError

INVOICE_COLUMNS = [
    "invoice_number", "customer_id", "period", "issued_at", "plan_id", "plan_versions",
    "catalog_fingerprint", "currency", "subtotal", "total", "invoice_json", "catalog_json",
]  # fmt: skip
LINE_COLUMNS = [
    "invoice_number", "customer_id", "period", "line_no", "kind", "description", "quantity", "unit_price", "amount",
]  # fmt: skip


def store_issued_invoice(client: Any, invoice: Invoice, catalog: Catalog) -> None:
    """Insert an issued invoice (``status == "issued"``), its lines and the catalog it was issued with.

    The catalog is kept (sql/009) so late usage of the period is priced as the period was
    billed (see :func:`meterstream.billing.late_adjustments`); it must be the one whose
    fingerprint the invoice carries. Raises :class:`StoreError`.
    """
    if invoice.status != "issued" or invoice.issued_at is None:
        raise ValueError("only an issued invoice is stored (see meterstream.billing.issue_invoice)")
    if catalog_fingerprint(catalog) != invoice.catalog_fingerprint:
        raise ValueError(f"invoice {invoice.invoice_number} was not issued with this catalog (fingerprints differ)")
    try:
        client.insert(
            "issued_invoices",
            [[
                invoice.invoice_number, invoice.customer_id, invoice.period, invoice.issued_at, invoice.plan_id,
                list(invoice.plan_versions), invoice.catalog_fingerprint, invoice.currency, invoice.subtotal,
                invoice.total, invoice.model_dump_json(), catalog.model_dump_json(),
            ]],  # fmt: skip
            column_names=INVOICE_COLUMNS,
        )
        client.insert(
            "issued_invoice_lines",
            [
                [invoice.invoice_number, invoice.customer_id, invoice.period, number, line.kind, line.description,
                 line.quantity, line.unit_price, line.amount]  # fmt: skip
                for number, line in enumerate(invoice.lines, 1)
            ],
            column_names=LINE_COLUMNS,
        )
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        raise StoreError(f"storing invoice {invoice.invoice_number} failed: {exc}") from exc
