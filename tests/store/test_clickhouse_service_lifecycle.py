"""The local ClickHouse server as `meterstream services` runs it: start, ready, idempotent, stop."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import clickhouse_connect
import httpx
import pytest

from meterstream.config import LocalServicesSettings
from meterstream.services.clickhouse import ClickHouseServer
from meterstream.services.process import ServiceError

pytestmark = pytest.mark.store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_up_ready_idempotent_status_sql_down_and_restart_keeps_data(tmp_path: Path):
    settings = LocalServicesSettings(state_dir=tmp_path, clickhouse_http_port=free_port(),
                                     clickhouse_tcp_port=free_port(), start_timeout=60)  # fmt: skip
    server = ClickHouseServer(settings)
    steps: list[str] = []
    try:
        status = server.up(on_step=steps.append)
        assert steps == ["starting", "ready"]
        assert status.running and status.pid and server.is_ready()
        assert httpx.get(f"{status.http_url}ping", timeout=5).text == "Ok.\n"

        again: list[str] = []
        assert server.up(on_step=again.append).pid == status.pid  # a second `up` is harmless
        assert again == ["already running", "ready"]

        client = clickhouse_connect.get_client(host="127.0.0.1", port=settings.clickhouse_http_port,
                                               username="meterstream", password="meterstream")  # fmt: skip
        assert client.server_version.startswith("26.")
        client.command("CREATE DATABASE lifecycle")
        client.command("CREATE TABLE lifecycle.t (n UInt32) ENGINE = MergeTree ORDER BY n")
        client.insert("lifecycle.t", [[1], [2], [3]], column_names=["n"])
        # The HTTP interface's default format is TabSeparated, as on any server.
        plain = httpx.post(status.http_url, content="SELECT sum(n), 'x' FROM lifecycle.t",
                           auth=("meterstream", "meterstream"), timeout=10)  # fmt: skip
        assert plain.text == "6\tx\n"
        # The launcher user (no password, loopback) reads none of the data.
        anonymous = httpx.post(status.http_url, content="SELECT count() FROM lifecycle.t", timeout=10)
        assert anonymous.status_code != 200 and "ACCESS_DENIED" in anonymous.text
        # The keep-alive query sleeps: the idle server uses well under a core.
        ticks = os.sysconf("SC_CLK_TCK")
        before = sum(map(int, Path(f"/proc/{status.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]))
        time.sleep(3)
        after = sum(map(int, Path(f"/proc/{status.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]))
        assert (after - before) / ticks < 1.5, "the idle server burns CPU"

        assert server.down() is True  # SIGTERM: a clean stop
        assert not server.status().running and not server.is_ready()
        assert server.down() is False

        server.up()
        client = clickhouse_connect.get_client(host="127.0.0.1", port=settings.clickhouse_http_port,
                                               username="meterstream", password="meterstream")  # fmt: skip
        assert client.query("SELECT sum(n) FROM lifecycle.t").result_rows == [(6,)]
    finally:
        server.down()


def test_a_server_that_dies_at_start_up_reports_why(tmp_path: Path):
    settings = LocalServicesSettings(state_dir=tmp_path, clickhouse_http_port=free_port(),
                                     clickhouse_tcp_port=free_port(), start_timeout=60)  # fmt: skip
    server = ClickHouseServer(settings)
    server.up()
    try:
        os.kill(server.status().pid, signal.SIGKILL)  # a crash: the pid file stays behind, stale
        deadline = time.monotonic() + 10
        while server.status().running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.status().running
        assert server.up().running  # SIGKILL + restart: the stale pid file is ignored
    finally:
        server.down()
    other = ClickHouseServer(settings.model_copy(update={"state_dir": tmp_path / "other"}))
    server.up()
    try:
        with pytest.raises(ServiceError, match=rf"Port {settings.clickhouse_http_port} .* in use by pid \d+, .*clickhouse_process"):
            other.up()
    finally:
        server.down()
