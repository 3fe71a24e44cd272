"""Fixtures of the store tier and the system tier: the ClickHouse server, taken from settings.

``make test`` starts the local ClickHouse server first (``meterstream services up``);
the fixtures read its address from the same settings as every other process
(``METERSTREAM_CLICKHOUSE__DSN``; ``METERSTREAM_TEST_CLICKHOUSE_DSN`` overrides it for
the tests). One server for the session, a random database per test (dropped
afterwards), like clickhouse-connect's own tests. Tests that stop a server or need its
users' fixed database start a private one (:func:`private_clickhouse`).

The tiers' conftest files import these fixtures by name.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
import pytest

from meterstream.config import ClickHouseSettings, LocalServicesSettings, Settings
from meterstream.services.clickhouse import ClickHouseServer


@pytest.fixture(scope="session")
def env_settings() -> Settings:
    """Settings as every process reads them (environment, .env)."""
    return Settings()


@pytest.fixture(scope="session")
def clickhouse_server_dsn(env_settings: Settings) -> str:
    """The session's ClickHouse server (a missing one is a failed run, not a skipped one)."""
    dsn = os.environ.get("METERSTREAM_TEST_CLICKHOUSE_DSN") or env_settings.clickhouse.dsn.get_secret_value()
    try:
        client = clickhouse_connect.get_client(dsn=dsn, connect_timeout=5)
        client.close()
    except Exception as exc:
        pytest.fail(
            f"no ClickHouse server at {_origin(dsn)} ({type(exc).__name__}); run `make test` (it starts one) "
            "or `meterstream services up clickhouse`",
            pytrace=False,
        )
    return dsn


def _origin(dsn: str) -> str:
    url = urlsplit(dsn)
    return f"{url.scheme}://{url.hostname}:{url.port}"


def drop_database(settings: ClickHouseSettings) -> None:
    with contextlib.suppress(Exception):  # best effort: a leftover test database is harmless
        client = clickhouse_connect.get_client(dsn=settings.dsn.get_secret_value(), connect_timeout=5)
        client.command(f"DROP DATABASE IF EXISTS {settings.database}")
        client.close()


@contextlib.contextmanager
def private_clickhouse(root: Path) -> Iterator[tuple[ClickHouseServer, str]]:
    """A ClickHouse server of this test alone (free ports, data under ``root``): one the test may
    stop, kill and restart, or whose users.xml database (``meterstream``) it may fill. Yields the
    server and the pipeline user's DSN."""
    services = LocalServicesSettings(state_dir=root, clickhouse_http_port=free_port(),
                                     clickhouse_tcp_port=free_port(), start_timeout=60)  # fmt: skip
    server = ClickHouseServer(services)
    server.up()
    try:
        yield server, f"http://meterstream:meterstream@127.0.0.1:{services.clickhouse_http_port}/"
    finally:
        server.down()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def clickhouse(clickhouse_server_dsn: str) -> Iterator[ClickHouseSettings]:
    """A fresh database per test on the session's server, dropped afterwards."""
    settings = ClickHouseSettings(dsn=clickhouse_server_dsn, database=f"t_{uuid.uuid4().hex[:12]}")
    yield settings
    drop_database(settings)
