"""Who owns the embedded store, and how everyone else reads it.

chDB allows one process per data directory. While the worker runs it owns the
store and records ``{pid, web_port}`` beside it; the CLI then runs saved
queries through the worker's ``/store/query/NAME/`` endpoint instead of opening
the directory. With a server DSN every process connects directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
import httpx

from meterstream.config import ClickHouseSettings
from meterstream.storage.clickhouse import QueryResult, StoreError, open_store
from meterstream.storage.queries import saved_query


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Owner:
    pid: int
    web_port: int


class StoreOwnership:
    def __init__(self, settings: ClickHouseSettings, web_port: int) -> None:
        self.settings = settings
        self.web_port = web_port

    @property
    def path(self) -> Path | None:
        if not self.settings.embedded:
            return None
        return self.settings.chdb_path.with_name(self.settings.chdb_path.name + ".owner.json")

    def claim(self) -> None:
        if self.path is None:
            return
        owner = current_owner(self.settings)
        if owner is not None and owner.pid != os.getpid():
            raise StoreError(
                f"the embedded store {self.settings.chdb_path} is owned by process {owner.pid}; "
                "stop that worker or point METERSTREAM_CLICKHOUSE__DSN elsewhere"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"pid": os.getpid(), "web_port": self.web_port}))

    def release(self) -> None:
        if self.path is not None and self.path.exists():
            owner = current_owner(self.settings)
            if owner is None or owner.pid == os.getpid():
                self.path.unlink(missing_ok=True)


def current_owner(settings: ClickHouseSettings) -> Owner | None:
    """The live worker that owns the embedded store, if any (stale records are ignored)."""
    if not settings.embedded:
        return None
    path = settings.chdb_path.with_name(settings.chdb_path.name + ".owner.json")
    try:
        data = json.loads(path.read_text())
        owner = Owner(pid=int(data["pid"]), web_port=int(data["web_port"]))
    except (OSError, ValueError, KeyError):
        return None
    return owner if _pid_alive(owner.pid) else None


def run_saved_query(
    settings: ClickHouseSettings, name: str, timeout: float = 30.0, *, open_directly: bool = True, **params: str
) -> QueryResult:
    """Run a saved query wherever the store is: through the owning worker, or directly.

    Decimal columns come back as :class:`~decimal.Decimal` either way. A long-running
    reader (``meterstream serve``) passes ``open_directly=False``: opening the embedded
    store would hold the data directory and keep the worker from starting.
    """
    sql = saved_query(name)
    owner = current_owner(settings)
    if owner is None and settings.embedded and not open_directly:
        raise StoreError(f"no worker owns the embedded store {settings.chdb_path}; start `meterstream worker`")
    if owner is not None and owner.pid != os.getpid():
        url = f"http://127.0.0.1:{owner.web_port}/store/query/{name}/"
        try:
            response = httpx.get(url, params=params, timeout=timeout)
        except httpx.HTTPError as exc:
            raise StoreError(f"the worker (pid {owner.pid}) owns the store but did not answer at {url}: {exc}") from exc
        body = response.json()
        if response.status_code != 200:
            raise StoreError(f"the worker could not run {name}: {body.get('error', response.text)}")
        return QueryResult.from_json_dict(body)
    store = open_store(settings)
    try:
        return store.query(sql, params)
    finally:
        store.close()
