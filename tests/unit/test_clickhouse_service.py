"""The local ClickHouse server's pieces that need no running server: the pins, the private
entry point, the rendered config and the shipped users.xml."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

import pytest

from meterstream.config import LocalServicesSettings
from meterstream.services.clickhouse import SERVICE_FILES, ClickHouseServer, render_config
from meterstream.services.clickhouse_process import DEFAULT_FORMAT, KEEP_ALIVE
from meterstream.services.process import ServiceError

ROOT = Path(__file__).resolve().parents[2]


def test_chdb_and_chdb_core_are_pinned_exactly_to_what_is_installed():
    pins = dict(re.findall(r'"(chdb(?:-core)?)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    assert set(pins) == {"chdb", "chdb-core"}, "pin chdb and chdb-core exactly: the server uses a private entry point"
    assert version("chdb") == pins["chdb"]
    assert version("chdb-core") == pins["chdb-core"]


def test_the_private_entry_point_still_runs_a_query_on_a_data_directory(tmp_path: Path):
    """If an upgrade renames or changes chdb._chdb.query, the local server cannot start: fail here, loudly."""
    script = (
        "from chdb import _chdb\n"
        "import sys\n"
        f"r = _chdb.query('SELECT 40 + 2 AS answer', {DEFAULT_FORMAT!r}, path=sys.argv[1], params={{}})\n"
        "print(r.bytes().decode(), end='')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, f"chdb._chdb.query changed: {done.stderr[-2000:]}"
    assert done.stdout == "42\n", f"chdb._chdb.query changed its output: {done.stdout!r} {done.stderr[-2000:]}"


def test_keep_alive_sleeps_one_row_at_a_time():
    # The count() form burned a core: the keep-alive must sleep per one-row block on one thread.
    assert "sleepEachRow(1)" in KEEP_ALIVE and "max_block_size = 1" in KEEP_ALIVE and "max_threads = 1" in KEEP_ALIVE


def test_rendered_config_listens_on_loopback_with_the_configured_ports_and_users(tmp_path: Path):
    settings = LocalServicesSettings(state_dir=tmp_path, clickhouse_http_port=18124, clickhouse_tcp_port=19001)
    config = ET.fromstring(render_config(settings, SERVICE_FILES / "users.xml", tmp_path / "logs"))
    assert config.findtext("listen_host") == "127.0.0.1"
    assert config.findtext("http_port") == "18124"
    assert config.findtext("tcp_port") == "19001"
    assert config.findtext("user_directories/users_xml/path") == str(SERVICE_FILES / "users.xml")
    assert config.findtext("logger/log") == str(tmp_path / "logs" / "clickhouse-server.log")


def test_same_http_and_tcp_port_is_refused(tmp_path: Path):
    settings = LocalServicesSettings(state_dir=tmp_path, clickhouse_http_port=18124, clickhouse_tcp_port=18124)
    with pytest.raises(ServiceError, match="must differ"):
        ClickHouseServer(settings)


def test_a_port_held_by_another_process_is_named(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        settings = LocalServicesSettings(state_dir=tmp_path, clickhouse_http_port=port, clickhouse_tcp_port=port + 1)
        with pytest.raises(ServiceError) as caught:
            ClickHouseServer(settings).up()
    message = str(caught.value)
    assert f"Port {port} on 127.0.0.1 (HTTP interface" in message
    if sys.platform == "linux":  # the owner comes from /proc: it is this test process
        assert re.search(r"in use by pid \d+, .*python", message)
    assert not (tmp_path / "clickhouse-server" / "server.pid").exists()


def test_users_xml_ships_the_launcher_the_pipeline_customer_success_and_a_tenant():
    users = ET.parse(SERVICE_FILES / "users.xml").getroot()
    launcher = [q.text for q in users.findall("users/default/grants/query")]
    assert launcher == ["GRANT SYSTEM LISTEN ON *.*", "GRANT SELECT ON system.numbers"]
    assert users.find("users/cs_reader/profile").text == "readonly"
    assert [q.text for q in users.findall("users/cs_reader/grants/query")] == ["GRANT customer_success"]
    role = [q.text for q in users.findall("roles/customer_success/grants/query")]
    assert role and all(q.startswith("GRANT SELECT ON meterstream.") for q in role)
    tenant = users.find("users/tenant_acme")
    assert tenant.find("profile").text == "readonly"
    filters = {t.tag: t.findtext("filter") for t in tenant.find("databases/meterstream")}
    granted = {q.text.rsplit(".", 1)[1] for q in tenant.findall("grants/query")}
    assert set(filters) == granted  # every table it can read has its row policy
    assert set(filters.values()) == {"customer_id = 'acme'"}


# -- errors told apart at the storage edge (meterstream.storage.clickhouse.classify_error) ---------


def test_errors_are_told_apart_unavailable_access_statement():
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    from meterstream.storage.clickhouse import (
        StoreAccessError,
        StoreError,
        StoreStatementError,
        classify_error,
    )

    unreachable = classify_error(OperationalError("HTTPConnectionPool(host='127.0.0.1', port=8123): refused"), "SELECT 1")
    assert type(unreachable) is StoreError and unreachable.retryable
    stopping = classify_error(DatabaseError("Code: 210. DB::NetException: Connection reset", code=210), "SELECT 1")
    assert type(stopping) is StoreError and stopping.retryable
    password = classify_error(DatabaseError("Code: 516. Authentication failed", code=516), "SELECT 1")
    assert isinstance(password, StoreAccessError) and not password.retryable
    missing = classify_error(DatabaseError("Code: 60. Unknown table 'usage_rated'"), "INSERT INTO usage_rated")
    assert isinstance(missing, StoreStatementError) and not missing.retryable
    assert missing.statement == "INSERT INTO usage_rated" and "INSERT INTO usage_rated" in str(missing)
    assert str(missing).endswith("the store is not set up: run `meterstream migrate`")
    no_database = classify_error(DatabaseError("Code: 81. Database meterstream does not exist. (UNKNOWN_DATABASE)"),
                                 "SELECT 1")  # fmt: skip
    assert "run `meterstream migrate`" in str(no_database)
    syntax = classify_error(DatabaseError("Code: 62. Syntax error", code=62), "SELEC 1\nFROM t")
    assert isinstance(syntax, StoreStatementError) and syntax.statement == "SELEC 1 FROM t"
    assert "migrate" not in str(syntax)


def test_status_of_a_stopped_server_names_whatever_holds_its_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`services status` run with another state directory than the running server's says stopped, and why."""
    from typer.testing import CliRunner

    from meterstream.cli import app
    from meterstream.config import get_settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        monkeypatch.setenv("METERSTREAM_SERVICES__STATE_DIR", str(tmp_path))
        monkeypatch.setenv("METERSTREAM_SERVICES__CLICKHOUSE_HTTP_PORT", str(port))
        monkeypatch.setenv("METERSTREAM_SERVICES__CLICKHOUSE_TCP_PORT", str(port + 1))
        get_settings.cache_clear()
        try:
            held = CliRunner().invoke(app, ["services", "status", "clickhouse"], terminal_width=400)
        finally:
            get_settings.cache_clear()
    assert held.exit_code == 3
    assert "ClickHouse stopped" in held.stdout
    assert f"but port {port} is in use by" in held.stdout and str(tmp_path) in held.stdout
    monkeypatch.setenv("METERSTREAM_SERVICES__CLICKHOUSE_HTTP_PORT", str(port))  # nothing listens there now
    get_settings.cache_clear()
    try:
        free = CliRunner().invoke(app, ["services", "status", "clickhouse"], terminal_width=400)
    finally:
        get_settings.cache_clear()
    assert free.exit_code == 3 and "ClickHouse stopped" in free.stdout and "in use" not in free.stdout
