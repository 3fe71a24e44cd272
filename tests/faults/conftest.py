"""Fault tests reuse the integration fixtures (real broker, real engine)."""

from tests.integration.conftest import base_settings, clickhouse_server_dsn, pipeline_factory  # noqa: F401
