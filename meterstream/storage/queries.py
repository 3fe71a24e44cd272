"""Saved queries: SQL files in ``sql/queries/``, run by name with typed parameters.

The CLI, ``serve`` and the web API run queries only by name, so the SQL that
customer success relies on lives in one reviewed place.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

from meterstream.config import ClickHouseSettings
from meterstream.storage.clickhouse import SQL_DIR, QueryResult, open_store

QUERY_DIR = SQL_DIR / "queries"
_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*):String\}")


class UnknownQuery(KeyError):
    pass


@cache
def saved_query(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise UnknownQuery(name)
    path = QUERY_DIR / f"{name}.sql"
    if not path.is_file():
        raise UnknownQuery(name)
    return path.read_text()


def query_parameters(name: str) -> set[str]:
    """The parameter names a saved query takes (all are strings)."""
    return set(_PARAM.findall(saved_query(name)))


def saved_query_names(query_dir: Path = QUERY_DIR) -> list[str]:
    return sorted(p.stem for p in query_dir.glob("*.sql"))


def run_saved_query(settings: ClickHouseSettings, name: str, **params: Any) -> QueryResult:
    """Run one saved query on its own connection (commands that run many use one store instead)."""
    sql = saved_query(name)
    store = open_store(settings, apply_migrations=False)
    try:
        return store.query(sql, params)
    finally:
        store.close()
