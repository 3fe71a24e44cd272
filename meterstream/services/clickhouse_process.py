"""The local ClickHouse server's process: ``python -m meterstream.services.clickhouse_process DATA_DIR``.

It runs the ClickHouse engine of the ``chdb-core`` wheel (clickhouse-local) and has it start
its HTTP and native listeners (``SYSTEM START LISTEN``). Run it from the directory holding
``config.xml`` (ports, users.xml, logs): the engine reads ``./config.xml`` when the module is
imported. :mod:`meterstream.services.clickhouse` starts, checks and stops it.

Why these details:

- ``chdb._chdb.query`` is the module's low-level entry point, and a private one: chdb and
  chdb-core are pinned exactly in pyproject.toml and ``tests/unit/test_clickhouse_service.py``
  fails loudly when an upgrade removes or changes it.
- The listeners live only while the query that started them runs, so the same call goes on
  with a keep-alive query. ``sleepEachRow(1)`` over one-row blocks sleeps instead of spinning
  (a ``count()`` over ``system.numbers`` burned a core).
- The output format of that call becomes the HTTP interface's default format: TabSeparated,
  as on any ClickHouse server.
- SIGTERM ends the query and the engine shuts down cleanly (~2 s).
"""

from __future__ import annotations

import sys
from pathlib import Path

#: Sleeps one second per row, one row per block, one thread: ~0% CPU, runs until stopped.
KEEP_ALIVE = "SELECT sum(sleepEachRow(1)) FROM system.numbers SETTINGS max_block_size = 1, max_threads = 1"
START = f"SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; {KEEP_ALIVE}"
#: The HTTP interface's default output format (the format of the launching query).
DEFAULT_FORMAT = "TabSeparated"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m meterstream.services.clickhouse_process DATA_DIR", file=sys.stderr)
        return 2
    if not Path("config.xml").is_file():
        print(f"no config.xml in {Path.cwd()}: start the server with `meterstream services up`", file=sys.stderr)
        return 2
    from chdb import _chdb

    print("clickhouse: starting listeners", flush=True)
    _chdb.query(START, DEFAULT_FORMAT, path=argv[1], params={})  # type: ignore[attr-defined]  # private, no stub
    # The keep-alive query only ends when the engine stops (a signal) or a statement failed
    # (the engine printed why on stderr, e.g. a port in use).
    print("clickhouse: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
