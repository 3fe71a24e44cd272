"""Store-tier fixtures: the ClickHouse server alone (no broker, no worker); see tests/servers.py."""

from tests.servers import (  # fixtures, found by pytest under these names
    clickhouse,
    clickhouse_server_dsn,
    env_settings,
)
