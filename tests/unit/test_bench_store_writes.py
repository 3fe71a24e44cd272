"""bench/store_writes.py's logic that is not timing: which views the migrations define, which a
dropped view starves, the variants it measures, and the invoice query it derives without
usage_recent. (No figure of the benchmark is asserted here.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.store_writes import View, discover_views, invoice_without_recent, starved_by, variants
from meterstream.storage.clickhouse import SQL_DIR, _statements

CHAIN = [
    View("a_mv", "a", "base"),
    View("b_mv", "b", "a"),
    View("c_mv", "c", "b"),
    View("d_mv", "d", "base"),
]


def test_every_materialized_view_of_the_migrations_is_found_with_its_source_and_target() -> None:
    statements = [s for p in sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql")) for s in _statements(p.read_text())]
    declared = [s for s in statements if re.match(r"CREATE\s+MATERIALIZED\s+VIEW", s, re.I)]
    tables = {m.group(1) for s in statements if (m := re.match(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", s))}
    views = discover_views()
    assert len(views) == len(declared) > 0
    for view in views:
        assert view.target in tables and view.source in tables, view
    # The chain the store's docs describe: usage_day_counts is fed from usage_recent, not usage_rated.
    by_name = {v.name: v for v in views}
    assert by_name["usage_day_counts_mv"].source == "usage_recent"
    assert by_name["usage_recent_mv"].source == "usage_rated"


def test_discovery_reads_comments_case_and_chains(tmp_path: Path) -> None:
    (tmp_path / "001_base.sql").write_text("CREATE TABLE base (x UInt8) ENGINE = Memory;\n")
    (tmp_path / "002_views.sql").write_text(
        "-- CREATE MATERIALIZED VIEW commented_mv TO nowhere AS SELECT 1 FROM base;\n"
        "create materialized view if not exists a_mv to a as\nselect x\nfrom base;\n"
        "CREATE MATERIALIZED VIEW b_mv TO b AS SELECT x FROM a GROUP BY x;\n"
    )
    (tmp_path / "notes.sql").write_text("CREATE MATERIALIZED VIEW ignored_mv TO t AS SELECT 1 FROM base;\n")
    assert discover_views(tmp_path) == [View("a_mv", "a", "base"), View("b_mv", "b", "a")]


def test_a_dropped_view_starves_the_views_fed_only_through_it() -> None:
    assert starved_by(CHAIN, ["a_mv"]) == ["b_mv", "c_mv"]
    assert starved_by(CHAIN, ["b_mv"]) == ["c_mv"]
    assert starved_by(CHAIN, ["d_mv"]) == []
    # A target another view still fills keeps its readers fed.
    fed_twice = [*CHAIN, View("a2_mv", "a", "base")]
    assert starved_by(fed_twice, ["a_mv"]) == []
    with pytest.raises(ValueError, match="no such materialized view"):
        starved_by(CHAIN, ["missing_mv"])


def test_variants_are_the_full_schema_each_view_dropped_and_none() -> None:
    plan = variants(CHAIN)
    assert plan[0] == ("full schema", [])
    assert [dropped for _, dropped in plan[1:-1]] == [["a_mv"], ["b_mv"], ["c_mv"], ["d_mv"]]
    assert plan[1][0] == "without a_mv (starves b_mv, c_mv)"
    assert plan[-1][1] == ["a_mv", "b_mv", "c_mv", "d_mv"]


def test_the_invoice_query_without_usage_recent_reads_every_unsettled_day_from_usage_rated() -> None:
    sql = "\n".join(line for line in invoice_without_recent().splitlines() if not line.lstrip().startswith("--"))
    assert "usage_recent" not in sql
    assert "FROM usage_settled" in sql and "FROM usage_rated FINAL" in sql
    assert "- 7" not in sql  # no day is left to a recent-days branch
    assert sql.count("UNION ALL") == 1
