"""Saved queries: SQL files in ``sql/queries/``, run by name with typed parameters.

Both the CLI and the worker's read endpoint run queries only by name, so the
SQL that customer success relies on lives in one reviewed place.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from meterstream.storage.clickhouse import SQL_DIR

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
