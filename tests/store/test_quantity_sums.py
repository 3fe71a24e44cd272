"""A charge on the sum of reported quantities (``measure: sum``), to the cent, through the real
ClickHouse server (stored rows, settled days, migration 009 on a store settled before it) and
through `meterstream rate`: docs/billing.md's pages example."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

import meterstream.storage.settle as settle_module
from meterstream.billing import invoice_from_store
from meterstream.cli import app
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import RawEvent
from meterstream.storage.clickhouse import SQL_DIR, connect, migrate, open_store
from meterstream.storage.queries import saved_query
from meterstream.storage.settle import settle
from tests.store.test_settled_usage import Pre010Store

pytestmark = pytest.mark.store

DOC = Path(__file__).resolve().parents[2] / "docs" / "billing.md"
AFTER = datetime(2030, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 12, 20, tzinfo=UTC)  # the settle runs' clock: November is long closed
# docs/billing.md, "Charges on the sum of quantities": 400, 900 and 1,250 pages (one resent) and
# 2,000 requests credits, in November 2026.
EVENTS = [
    ("d1", 3, "documents", 400), ("d2", 14, "documents", 900), ("d3", 20, "documents", 1250),
    ("d3", 20, "documents", 1250), ("r1", 5, "requests", 2000),
]  # fmt: skip
TOTAL = Decimal("115.50")


def _catalog(tmp_path: Path):
    text = DOC.read_text()
    section = text[text.index("## Charges on the sum of quantities") :]
    block = section[section.index("```yaml\n") + 8 : section.index("```\n", section.index("```yaml\n") + 8)]
    path = tmp_path / "plans.yaml"
    path.write_text(block)
    return load_catalog(path), path


def _events() -> list[UsageEvent]:
    return [
        UsageEvent(event_id=i, customer_id="pied-piper", occurred_at=datetime(2026, 11, day, 9, tzinfo=UTC),
                   meter=meter, quantity=quantity)  # fmt: skip
        for i, day, meter, quantity in EVENTS
    ]


def _store_events(store, catalog) -> None:
    for offset, event in enumerate(_events()):
        rated = catalog.rate(event)
        raw = RawEvent(event.event_id, event.customer_id, "usage", rated.occurred_at, rated.period,
                       event.model_dump_json().encode(), "usage.events", 0, offset)  # fmt: skip
        store.insert_batch([raw], [rated])


def _pages_line(invoice) -> list[tuple[Decimal | None, Decimal]]:
    return [(line.quantity, line.amount) for line in invoice.lines if line.kind == "usage_charge"]


def test_the_sum_of_quantities_through_rate(tmp_path: Path) -> None:
    _, plans = _catalog(tmp_path)
    events = tmp_path / "events.jsonl"
    events.write_text("".join(e.model_dump_json() + "\n" for e in _events()))
    result = CliRunner().invoke(app, ["rate", "--plan", str(plans), "--events", str(events)])
    assert result.exit_code == 0, result.output
    (invoice,) = json.loads(result.stdout)
    lines = [(Decimal(line["quantity"]), Decimal(line["amount"])) for line in invoice["lines"] if line["kind"] == "usage_charge"]
    assert lines == [(Decimal(1550), Decimal("15.50"))]  # 2,550 pages (the resend counts once) − 1,000 free
    assert Decimal(invoice["total"]) == TOTAL


def test_the_sum_of_quantities_in_the_store_also_after_migrating_a_settled_store(
    clickhouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog, _ = _catalog(tmp_path)
    # A store as it was before migration 009: migrated to 008, its November days settled by the
    # settle of that time (no sum_quantity column).
    old_sql = tmp_path / "sql"
    old_sql.mkdir()
    for path in sorted(SQL_DIR.glob("00[1-8]_*.sql")):
        shutil.copy(path, old_sql / path.name)
    client = connect(clickhouse, create_database=True)
    try:
        assert migrate(client, old_sql)[-1] == "008_issued_invoices.sql"
        old_aggregate = settle_module._AGGREGATE.replace("\n     sum_quantity, credits", "\n     credits").replace(
            "max(quantity), sum(quantity), sum(credits)", "max(quantity), sum(credits)"
        )
        assert "sum_quantity" not in old_aggregate
        store = Pre010Store(connect(clickhouse))
        try:
            _store_events(store, catalog)
            with monkeypatch.context() as patch:
                patch.setattr(settle_module, "_AGGREGATE", old_aggregate)
                assert settle(client, date(2026, 12, 1), now=NOW).customer_days == 4
        finally:
            store.close()

        store = open_store(clickhouse)  # applies 009 on that store
        try:
            assert [r[0] for r in client.query("SELECT name FROM schema_migrations FINAL ORDER BY version").result_rows][
                -1
            ] == "010_insert_dedup.sql"  # 009 and every later one (010: issue 15's deduplication tokens)

            def run(name: str, **params: str):
                return store.query(saved_query(name), params)

            # Days settled without the sum are read from the rows until they are settled again.
            unusable = client.query("SELECT countIf(seen_rows = 0), count() FROM usage_settled_days FINAL").result_rows
            assert unusable == [(4, 4)]
            invoice = invoice_from_store(run, catalog, "pied-piper", "2026-11", as_of=AFTER)
            assert _pages_line(invoice) == [(Decimal(1550), Decimal("15.50"))]
            assert invoice.total == TOTAL

            result = settle(client, date(2026, 12, 1), now=NOW)
            assert result.customer_days == 4 and result.unsettleable_customer_days == 0
            sums = client.query(
                "SELECT sum(sum_quantity) FROM usage_settled WHERE meter = 'documents' AND settle_id = {s:UUID}",
                parameters={"s": result.settle_id},
            ).result_rows
            assert sums == [(Decimal(2550),)]
            invoice = invoice_from_store(run, catalog, "pied-piper", "2026-11", as_of=AFTER)
            assert _pages_line(invoice) == [(Decimal(1550), Decimal("15.50"))]
            assert invoice.total == TOTAL
        finally:
            store.close()
    finally:
        client.close()
