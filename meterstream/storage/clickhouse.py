"""ClickHouse behind a small interface: connect, migrate, insert a batch, query.

Every process talks to one ClickHouse server over HTTP (``http://...``; locally the
server of ``meterstream services up``, see :mod:`meterstream.services.clickhouse`).
``chdb://PATH`` (the engine inside this process, one process per data directory)
is kept for single-process work that needs no server: ``bench/invoice.py`` builds
and reads a 10M-event store in one process (tests/store/test_storage.py
checks the DDL and a batch on it).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError

from meterstream.clock import utc_now
from meterstream.config import ClickHouseSettings
from meterstream.pricing.engine import RatedBatch
from meterstream.schemas.records import AlertKind, BudgetAlert, RatedUsage, RawBatch, RawEvent

if TYPE_CHECKING:
    from meterstream.storage.batches import Recovery

log = logging.getLogger(__name__)

#: Numbered DDL files live at the repository root in ``sql/``.
#: The numbered DDL and saved queries: the repo's top-level sql/, linked as meterstream/sql so it is in the wheel.
#: Tests only (tests/system/test_kill_mid_insert.py): seconds a worker holds its write after each
#: table's insert, saying so on stderr, so that a test can SIGKILL it exactly there.
_PAUSE_AFTER_INSERT = float(os.environ.get("METERSTREAM_TEST_PAUSE_AFTER_INSERT", "0") or 0)


def _test_pause(table: str) -> None:
    if _PAUSE_AFTER_INSERT > 0:
        # Straight to file descriptor 2 (the worker's log): Faust routes sys.stderr through logging,
        # whose repeat filter (quiet_logs.py) would fold these lines.
        os.write(2, f"test pause after INSERT INTO {table}\n".encode())
        time.sleep(_PAUSE_AFTER_INSERT)


SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class StoreError(RuntimeError):
    """The store is unavailable (unreachable, overloaded, shutting down); the caller may retry
    the same batch. Its subclasses :class:`StoreAccessError` and :class:`StoreStatementError`
    are not worth retrying: ``retryable`` tells them apart."""

    retryable = True


class StoreAccessError(StoreError):
    """The server refused the credentials or the grant (wrong password, unknown user, read-only
    user, missing privilege): retrying will not help; fix the DSN or the user's grants."""

    retryable = False


class StoreStatementError(StoreError):
    """A statement failed on a server that answered (a missing table, a SQL error, a type
    mismatch): a programming or schema error that no retry fixes. ``statement`` names it."""

    retryable = False

    def __init__(self, message: str, statement: str) -> None:
        super().__init__(message)
        self.statement = statement


#: Server error codes that mean "unavailable for now" (retry): timeouts, network errors, too many
#: queries or parts, memory limit, cancelled or aborted because the server is stopping.
_RETRYABLE_CODES = frozenset({3, 159, 202, 203, 209, 210, 236, 241, 242, 252, 319, 394, 425, 999, 1000})
#: Credentials and grants: fix the DSN or the user, do not retry.
_ACCESS_CODES = frozenset({164, 192, 193, 194, 195, 497, 516})


#: UNKNOWN_TABLE, UNKNOWN_DATABASE: the schema was never applied to this server (or another database is named)
_SCHEMA_MISSING_CODES = frozenset({60, 81})


def classify_error(exc: BaseException, statement: str, where: str = "the ClickHouse server") -> StoreError:
    """Map a clickhouse-connect exception to the store's error classes, once, at the storage edge.

    Transport errors carry no server code (refused connection, reset, timeout): unavailable.
    ``statement`` names what failed (its first line), never the rows or the DSN.
    """
    if isinstance(exc, StoreError):
        return exc
    code = getattr(exc, "code", None)
    if code is None:
        code = _code_from_message(str(exc))
    first_line = " ".join(statement.split())[:160]
    reason = " ".join(str(exc).split())[:400]
    if code in _ACCESS_CODES:
        return StoreAccessError(f"{where} refused the credentials or grants ({reason}); check the DSN's user "
                                f"and password and the user's grants")
    if code is None or code in _RETRYABLE_CODES or isinstance(exc, (OperationalError, OSError)):
        return StoreError(f"{where} is unavailable ({reason})")
    hint = "; the store is not set up: run `meterstream migrate`" if code in _SCHEMA_MISSING_CODES else ""
    return StoreStatementError(f"statement failed, not retried: {first_line!r}: {reason}{hint}", first_line)


def _code_from_message(message: str) -> int | None:
    match = re.search(r"\bCode:\s*(\d+)", message)
    return int(match.group(1)) if match else None


def dsn_origin(settings: ClickHouseSettings) -> str:
    """Where the store is, for messages: scheme://host:port (no user, no password), or the chDB path."""
    if settings.embedded:
        return f"chDB at {settings.chdb_path}"
    url = urlsplit(settings.dsn.get_secret_value())
    return f"{url.scheme}://{url.hostname}:{url.port or (443 if url.scheme == 'https' else 8123)}"


#: Session settings meterstream's saved queries are written for, set on every connection whose
#: user may change them and whose server knows them. A readonly user cannot set them: its
#: profile gives them (services/clickhouse/users.xml; docs/security.md for your own server).
#: enable_materialized_cte: ``period_usage.sql`` runs each ``AS MATERIALIZED`` CTE once instead
#: of once per reference (same rows either way; the setting is in ClickHouse's experimental tier).
SESSION_SETTINGS: dict[str, int] = {"enable_materialized_cte": 1}


def _apply_session_settings(client: Client) -> None:
    for key, value in SESSION_SETTINGS.items():
        known = client.server_settings.get(key)
        if known is not None and not known.readonly and known.value != str(value):
            client.set_client_setting(key, value)


def connect(settings: ClickHouseSettings, *, create_database: bool = True) -> Client:
    """A clickhouse-connect client for the configured DSN, on the configured database."""
    dsn = settings.dsn.get_secret_value()
    try:
        if settings.embedded:
            settings.chdb_path.mkdir(parents=True, exist_ok=True)
            path = f"chdb://{settings.chdb_path.resolve()}"
            if create_database:  # chDB takes the database when the client is made: make it first
                with clickhouse_connect.get_client(dsn=path) as bootstrap:
                    bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {_ident(settings.database)}")
            client = clickhouse_connect.get_client(dsn=path, database=settings.database)
        else:
            # tz_mode="schema": a DateTime64(3, 'UTC') column reads back timezone-aware, as the
            # records require (the default returns naive UTC datetimes over HTTP).
            client = clickhouse_connect.get_client(dsn=dsn, tz_mode="schema")
            if create_database:
                client.command(f"CREATE DATABASE IF NOT EXISTS {_ident(settings.database)}")
            client.database = settings.database
        _apply_session_settings(client)
        return client
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        error = classify_error(exc, f"CREATE DATABASE IF NOT EXISTS {settings.database}", dsn_origin(settings))
        error.args = (f"cannot open {dsn_origin(settings)}: {error}",)
        raise error from exc


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"invalid ClickHouse identifier {name!r}")
    return name


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def discover_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration numbers in {sql_dir}: {versions}")
    return migrations


def _statements(sql: str) -> list[str]:
    # DDL files hold no semicolons inside strings, so a split on ';' is exact here.
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


def migrate(client: Client, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the numbered DDL not yet applied; returns the names applied now. Idempotent."""
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version UInt32, name String, applied_at DateTime64(3, 'UTC')) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    applied = {row[0] for row in client.query("SELECT version FROM schema_migrations FINAL").result_rows}
    done = []
    for migration in discover_migrations(sql_dir):
        if migration.version in applied:
            continue
        for statement in _statements(migration.sql):
            client.command(statement)
        client.insert(
            "schema_migrations",
            [(migration.version, migration.name, utc_now())],
            column_names=["version", "name", "applied_at"],
        )
        done.append(migration.name)
        log.info("applied migration %s", migration.name)
    return done


RATED_COLUMNS = [
    "event_id", "kind", "customer_id", "occurred_at", "period", "meter", "model", "provider",
    "workflow_id", "run_id", "input_tokens", "cached_input_tokens", "output_tokens", "quantity",
    "unit", "outcome_type", "attribution", "credits", "cost_to_serve", "currency",
    "price_book_version", "rule", "billed_in",
]  # fmt: skip
ALERT_COLUMNS = [
    "alert_id", "customer_id", "period", "threshold_percent", "budget_credits",
    "spent_credits", "action", "crossed_at", "triggering_event_id",
    "kind", "scope", "run_id", "projected_exhaustion_at", "detail",
]  # fmt: skip


def as_utc(value: datetime) -> datetime:
    """A timestamp read back from the store, timezone-aware in UTC.

    Every DateTime column of the DDL is declared in UTC, but clickhouse-connect (and chDB
    through it) returns such values naive when the column's zone matches the session's.
    Every reader gets its rows through :class:`QueryResult`, which applies this to each
    DateTime column, so no reader sees a naive timestamp (a naive ``crossed_at`` once kept
    the worker from starting: pydantic refuses it).
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _aware_rows(types: list[str], rows: list[list[Any]]) -> list[list[Any]]:
    datetime_columns = [i for i, t in enumerate(types) if "DateTime" in t]
    if not datetime_columns:
        return rows
    for row in rows:
        for i in datetime_columns:
            value = row[i]
            if isinstance(value, datetime):
                row[i] = as_utc(value)
            elif isinstance(value, list):  # Array(DateTime64(...))
                row[i] = [as_utc(v) if isinstance(v, datetime) else v for v in value]
    return rows


@dataclass
class QueryResult:
    """Rows of a query; DateTime values are always timezone-aware UTC (:func:`as_utc`)."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]

    def __post_init__(self) -> None:
        self.rows = _aware_rows(self.types, self.rows)

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def to_json_dict(self) -> dict[str, Any]:
        """Decimals and datetimes as text, so a reader can restore them exactly from ``types``."""
        return {
            "columns": self.columns,
            "types": self.types,
            "rows": [[v if isinstance(v, (int, str, type(None))) else str(v) for v in row] for row in self.rows],
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> QueryResult:
        types = data["types"]
        rows = [[_revive(v, t) for v, t in zip(row, types, strict=True)] for row in data["rows"]]
        return cls(columns=data["columns"], types=types, rows=rows)


def _revive(value: Any, clickhouse_type: str) -> Any:
    if value is None:
        return None
    if "Decimal" in clickhouse_type:
        return Decimal(value)
    if "DateTime" in clickhouse_type:
        return as_utc(datetime.fromisoformat(value))
    return value


class Storage(Protocol):
    """What the worker needs from a store: write a batch, run a saved query."""

    def insert_batch(
        self, raw: Sequence[RawEvent], rated: Sequence[RatedUsage], alerts: Sequence[BudgetAlert] = (),
        *, raw_stored: Collection[tuple[str, int, int]] = (),
    ) -> None: ...

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> QueryResult: ...

    def recover_batches(self, committed: Mapping[tuple[str, int], int | None]) -> Recovery: ...


class ClickHouseStore:
    """The sink's storage: one call writes one batch, or raises :class:`StoreError`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def insert_batch(
        self,
        raw: Sequence[RawEvent],
        rated: Sequence[RatedUsage],
        alerts: Sequence[BudgetAlert] = (),
        *,
        raw_stored: Collection[tuple[str, int, int]] = (),
    ) -> None:
        """Write a batch: events_raw, usage_rated (and its views), budget_alerts, each insert with the
        batch's deduplication token (storage/batches.py), so calling this again with the same batch
        completes what a crash or a failed call left undone and doubles nothing.

        ``raw_stored``: places (topic, partition, offset) whose raw row events_raw already holds
        (a batch read again after a crash cut its write): not written again.
        """
        # pyarrow is imported by the first write, not by every command that imports the store
        # (it is a third of a report command's start-up).
        from meterstream.storage.batches import batch_id, insert_settings, ordered_rated_table, sources_of
        from meterstream.storage.columns import raw_table

        now = utc_now()
        raw = raw if isinstance(raw, RawBatch) else RawBatch.of(raw)
        rated = rated if isinstance(rated, RatedBatch) else RatedBatch.of(rated)
        batch = batch_id(raw, rated, [a.alert_id for a in alerts])
        sources = sources_of(raw, rated)
        if raw_stored:
            raw = RawBatch.of([r for r in raw if (r.source_topic, r.source_partition, r.source_offset) not in raw_stored])
        statement = "INSERT INTO events_raw"
        try:
            # Raw events and rated rows go as Arrow columns (meterstream/storage/columns.py).
            if raw:
                self.client.insert_arrow("events_raw", raw_table(raw, now), settings=insert_settings(batch, "events_raw"))
                _test_pause("events_raw")
            statement = "INSERT INTO usage_rated"
            if rated:
                self.client.insert_arrow(
                    "usage_rated", ordered_rated_table(rated, sources, now, batch),
                    settings=insert_settings(batch, "usage_rated"),
                )  # fmt: skip
                _test_pause("usage_rated")
            statement = "INSERT INTO budget_alerts"
            if alerts:
                self.client.insert(
                    "budget_alerts",
                    [
                        (
                            a.alert_id, a.customer_id, a.period, a.threshold_percent,
                            a.budget_credits, a.spent_credits, a.action.value, a.crossed_at,
                            a.triggering_event_id, a.kind.value,
                            "" if a.kind is AlertKind.THRESHOLD else a.alert_id,
                            a.run_id, a.projected_exhaustion_at, a.detail,
                        )  # fmt: skip
                        for a in alerts
                    ],
                    column_names=ALERT_COLUMNS,
                    settings=insert_settings(batch, "budget_alerts"),
                )
                _test_pause("budget_alerts")
        except Exception as exc:
            raise classify_error(exc, statement) from exc

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> QueryResult:
        """Run ``sql``; ``settings`` are the server's query settings for this query alone
        (e.g. ``max_execution_time``)."""
        try:
            result = self.client.query(sql, parameters=parameters or {}, settings=settings)
        except Exception as exc:
            raise classify_error(exc, sql) from exc
        return QueryResult(
            columns=list(result.column_names),
            types=[t.name for t in result.column_types],
            rows=[list(row) for row in result.result_rows],
        )

    def recover_batches(self, committed: Mapping[tuple[str, int], int | None]) -> Recovery:
        """Write again the batches stored past the committed offsets (storage/batches.py)."""
        from meterstream.storage.batches import recover_batches  # pyarrow: see insert_batch

        try:
            return recover_batches(self.client, committed)
        except Exception as exc:  # clickhouse-connect raises several unrelated types
            raise classify_error(exc, "recovery of batches stored past the committed offsets (batches.py)") from exc

    def close(self) -> None:
        self.client.close()



def open_store(settings: ClickHouseSettings, *, apply_migrations: bool = True) -> ClickHouseStore:
    """A store on the configured database; a reader (``apply_migrations=False``) creates nothing,
    so it works for read-only users (customer success, tenants)."""
    client = connect(settings, create_database=apply_migrations)
    if apply_migrations:
        migrate(client)
    return ClickHouseStore(client)


