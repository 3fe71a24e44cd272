"""Least privilege, as shipped in services/clickhouse/users.xml and enforced by the server over HTTP:
customer success reads the reporting tables and nothing else; a tenant reads only its own rows;
the reporting commands run as the customer-success user."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from meterstream.config import ClickHouseSettings
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import RawEvent
from meterstream.storage.clickhouse import open_store
from tests.servers import private_clickhouse

pytestmark = pytest.mark.store
ROOT = Path(__file__).resolve().parents[2]
PERIOD = "2026-11"
#: The database users.xml grants on (roles and row policies name it).
DATABASE = "meterstream"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A private server (its `meterstream` database is the one users.xml names), with acme's and globex's usage."""
    with private_clickhouse(tmp_path_factory.mktemp("access")) as (server, dsn):
        store = open_store(ClickHouseSettings(dsn=dsn, database=DATABASE))
        catalog = load_catalog()
        for i, customer in enumerate(["acme", "acme", "globex"]):
            event = UsageEvent(event_id=f"e{i}", customer_id=customer, occurred_at=datetime(2026, 11, 3, tzinfo=timezone.utc),
                               model="gpt-4o", input_tokens=1000 * (i + 1))  # fmt: skip
            rated = catalog.rate(event)
            raw = RawEvent(event.event_id, customer, "usage", event.occurred_at, PERIOD,
                           event.model_dump_json().encode(), "usage.events", 0, i)  # fmt: skip
            store.insert_batch([raw], [rated])
        store.close()
        yield server, dsn


def _client(server, user: str):
    return clickhouse_connect.get_client(host="127.0.0.1", port=server.settings.clickhouse_http_port,
                                         username=user, password=user, database=DATABASE)  # fmt: skip


REFUSED = [
    "INSERT INTO usage_rated (event_id, customer_id) VALUES ('x', 'acme')",
    "ALTER TABLE usage_rated DELETE WHERE 1",
    "ALTER TABLE usage_rated ADD COLUMN hacked UInt8",
    "DROP TABLE usage_rated",
    "TRUNCATE TABLE budget_alerts",
    "CREATE TABLE mine (n UInt8) ENGINE = Memory",
    "SELECT * FROM file('/etc/passwd', 'LineAsString')",
    "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
    "SET max_execution_time = 0",
]


@pytest.mark.parametrize("user", ["cs_reader", "tenant_acme"])
def test_readers_cannot_write_alter_drop_or_read_files(server, user):
    client = _client(server[0], user)
    for statement in REFUSED:
        with pytest.raises(DatabaseError) as refused:
            client.command(statement)
        assert "ACCESS_DENIED" in str(refused.value) or "READONLY" in str(refused.value), statement


def test_customer_success_reads_every_customer_of_the_reporting_tables_only(server):
    client = _client(server[0], "cs_reader")
    assert client.query("SELECT customer_id, count() FROM usage_rated FINAL GROUP BY customer_id ORDER BY 1").result_rows == [
        ("acme", 2), ("globex", 1)]  # fmt: skip
    assert client.query("SELECT count() FROM events_raw FINAL").result_rows == [(3,)]
    assert client.query("SELECT currentRoles()").result_rows == [(["customer_success"],)]
    with pytest.raises(DatabaseError, match="ACCESS_DENIED"):
        client.query("SELECT * FROM schema_migrations")  # not a reporting table


def test_the_readers_profile_runs_materialized_ctes_once(server):
    """A readonly user cannot set enable_materialized_cte per query: its profile gives it, and
    period_usage.sql's MATERIALIZED CTEs (their temporary tables) run within readonly = 1."""
    from meterstream.storage.queries import saved_query

    admin = _client(server[0], "meterstream")
    query = saved_query("period_usage")
    want = admin.query(query + "\nSETTINGS enable_materialized_cte = 0", parameters={"period": PERIOD, "customer": ""})
    for user in ("cs_reader", "tenant_acme"):
        client = _client(server[0], user)
        assert client.query("SELECT getSetting('enable_materialized_cte'), getSetting('readonly')").result_rows == [(True, 1)]
        got = client.query(query, parameters={"period": PERIOD, "customer": ""}).result_rows
        expected = [row for row in want.result_rows if user == "cs_reader" or row[0] == "acme"]
        assert got == expected and len(expected) >= 1, user


def test_a_tenant_sees_only_its_own_rows(server):
    client = _client(server[0], "tenant_acme")
    assert client.query("SELECT DISTINCT customer_id FROM usage_rated").result_rows == [("acme",)]
    assert client.query("SELECT count() FROM usage_rated WHERE customer_id = 'globex'").result_rows == [(0,)]
    assert client.query("SELECT DISTINCT customer_id FROM usage_daily").result_rows == [("acme",)]
    with pytest.raises(DatabaseError, match="ACCESS_DENIED"):
        client.query("SELECT count() FROM events_raw")  # raw payloads are not the tenant's to read
    # The pipeline's own user still reads every customer (the tenant's row policy is the tenant's).
    admin = _client(server[0], "meterstream")
    assert admin.query("SELECT count() FROM usage_rated FINAL").result_rows == [(3,)]


def test_reporting_commands_run_as_the_customer_success_user(server):
    _, dsn = server
    port = server[0].settings.clickhouse_http_port
    env = {
        "PATH": "/usr/bin:/bin",
        # The pipeline DSN is unusable here: the commands must get by with the CS user alone.
        "METERSTREAM_CLICKHOUSE__DSN": f"http://meterstream:wrong@127.0.0.1:{port}/",
        "METERSTREAM_CLICKHOUSE__CS_DSN": f"http://cs_reader:cs_reader@127.0.0.1:{port}/",
        "METERSTREAM_CLICKHOUSE__DATABASE": DATABASE,
        "COLUMNS": "250",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meterstream.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120, cwd=ROOT)  # fmt: skip

    admin = _client(server[0], "meterstream")
    started = admin.query("SELECT now64(6)").result_rows[0][0]
    usage = cli("usage", "--period", PERIOD, "--json")
    assert usage.returncode == 0, usage.stderr
    assert sorted(row["customer_id"] for row in json.loads(usage.stdout)) == ["acme", "globex"]
    audit = cli("audit", "--customer", "acme", "--period", PERIOD, "--json")
    assert audit.returncode == 0, audit.stderr
    assert json.loads(audit.stdout)["reconciled"] is True
    profile = cli("profile", "--period", PERIOD, "--json")
    assert profile.returncode == 0, profile.stderr
    # Writing commands do not use the CS DSN: with the pipeline DSN wrong, migrate fails on authentication.
    migrate = cli("migrate")
    assert migrate.returncode != 0 and "AUTHENTICATION_FAILED" in migrate.stderr.replace("\n", "")

    admin.command("SYSTEM FLUSH LOGS")
    readers = admin.query(
        "SELECT DISTINCT user FROM system.query_log WHERE type = 'QueryFinish' AND query_kind = 'Select' "
        "AND has(databases, 'meterstream') AND query_start_time_microseconds >= {started:DateTime64(6)}",
        parameters={"started": started},
    ).result_rows
    assert readers == [("cs_reader",)]
    assert Decimal(json.loads(usage.stdout)[0]["usage_credits"]) > 0
