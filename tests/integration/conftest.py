"""Integration fixtures: the real broker and the real ClickHouse engine, taken from settings.

``make test`` starts the local broker first (``meterstream services up``); the
fixtures read its address from the same settings as every other process
(``METERSTREAM_KAFKA__BOOTSTRAP_SERVERS``). ClickHouse is chDB owned by each
worker under test, or a server: ``METERSTREAM_TEST_CLICKHOUSE_DSN=http://...``,
or, where a Docker engine answers, a ClickHouse container started with
testcontainers (the path that exercises a server over HTTP).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.conftest import clock_env

from meterstream.config import ClickHouseSettings, KafkaSettings, Settings
from meterstream.services.redis import RedisServer, RedisServerError
from meterstream.stream_processors.runner import WorkerProcess
from meterstream.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    settings = Settings()
    admin = AdminClient(settings.kafka.confluent_config())
    try:
        admin.list_topics(timeout=15)
    except Exception as exc:  # a missing broker is a failed run, not a skipped one
        pytest.fail(
            f"no Kafka broker at {settings.kafka.bootstrap_servers} ({exc}); "
            "run `make test` (it starts one) or `meterstream services up`",
            pytrace=False,
        )
    return settings


@pytest.fixture(scope="session")
def clickhouse_server_dsn() -> Iterator[str | None]:
    """A ClickHouse server DSN when one is configured or Docker can start one; else None (chDB)."""
    dsn = os.environ.get("METERSTREAM_TEST_CLICKHOUSE_DSN")
    if dsn:
        yield dsn
        return
    if not _docker_available():
        yield None
        return
    from testcontainers.clickhouse import ClickHouseContainer

    with ClickHouseContainer("clickhouse/clickhouse-server:25.8") as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(8123)
        yield f"http://{container.username}:{container.password}@{host}:{port}/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Pipeline:
    """One isolated pipeline: own topics, consumer group, store and worker."""

    def __init__(
        self, base: Settings, root: Path, server_dsn: str | None, budgets: str | None, env: dict[str, str] | None = None
    ) -> None:
        name = f"t{uuid.uuid4().hex[:10]}"
        self.kafka = base.kafka.model_copy(update={"topic_prefix": f"{name}."})
        if server_dsn:
            self.clickhouse = ClickHouseSettings(dsn=server_dsn, database=name)
        else:
            self.clickhouse = ClickHouseSettings(dsn=f"chdb://{root / 'clickhouse'}")
        self.app_id = name
        self.topics: Topics = ensure_topics(self.kafka)
        self.web_port = free_port()
        self.env = {
            "METERSTREAM_KAFKA__BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "METERSTREAM_KAFKA__TOPIC_PREFIX": self.kafka.topic_prefix,
            "METERSTREAM_KAFKA__PARTITIONS": str(self.kafka.partitions),
            "METERSTREAM_CLICKHOUSE__DSN": self.clickhouse.dsn.get_secret_value(),
            "METERSTREAM_CLICKHOUSE__DATABASE": self.clickhouse.database,
            "METERSTREAM_WORKER__APP_ID": self.app_id,
            "METERSTREAM_WORKER__WEB_PORT": str(self.web_port),
            "METERSTREAM_WORKER__DATA_DIR": str(root / "worker"),
            "METERSTREAM_WORKER__BATCH_TIMEOUT": "0.2",
            **clock_env(),  # the test's clock, also in the worker and CLI processes it starts
            **(env or {}),
        }
        if budgets is not None:
            budgets_file = root / "budgets.yaml"
            budgets_file.write_text(budgets)
            self.env["METERSTREAM_WORKER__BUDGETS_FILE"] = str(budgets_file)
        self.worker = WorkerProcess(self.env, self.web_port, root / "worker.log")
        self.processed_before = 0

    def start(self) -> Pipeline:
        self.worker.start(ready_timeout=120)
        return self

    def wait_processed(self, count: int, timeout: float = 120) -> dict[str, Any]:
        """Wait until the worker has handled ``count`` more messages than at the last call."""
        target = self.processed_before + count
        stats = self.worker.wait_for(target, timeout)
        self.processed_before = stats["messages"]
        return stats

    def produce_raw(self, topic: str, values: list[bytes], key: bytes = b"raw") -> None:
        producer = Producer(self.kafka.producer_config())
        for value in values:
            producer.produce(topic, key=key, value=value)
        assert producer.flush(30) == 0

    def read_topic(self, topic: str, expected: int, timeout: float = 30) -> list[Any]:
        """All messages on ``topic`` (every partition, from the start), waiting for at least ``expected``."""
        consumer = Consumer(
            {
                **self.kafka.confluent_config(),
                "group.id": f"reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = [TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions]
        consumer.assign(partitions)
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    if len(messages) >= expected:
                        # A quiet second after reaching the count: anything extra would have arrived.
                        extra = consumer.poll(1.0)
                        if extra is None:
                            break
                        messages.append(extra)
                    continue
                if msg.error():
                    continue
                messages.append(msg)
        finally:
            consumer.close()
        return messages

    def stop(self) -> None:
        self.worker.stop()
        admin = AdminClient(self.kafka.confluent_config())
        try:
            names = [
                t
                for t in admin.list_topics(timeout=10).topics
                if t.startswith((self.kafka.topic_prefix, f"{self.app_id}-"))
            ]
            if names:
                for future in admin.delete_topics(names, operation_timeout=30).values():
                    future.result(timeout=30)
        except Exception:
            pass  # leftover test topics are harmless; the worker is what must stop


@pytest.fixture
def pipeline_factory(
    base_settings: Settings, clickhouse_server_dsn: str | None, tmp_path: Path
) -> Iterator[Callable[..., Pipeline]]:
    created: list[Pipeline] = []

    def make(budgets: str | None = None, start: bool = True, env: dict[str, str] | None = None) -> Pipeline:
        root = tmp_path / f"pipeline{len(created)}"
        root.mkdir()
        pipeline = Pipeline(base_settings, root, clickhouse_server_dsn, budgets, env)
        created.append(pipeline)
        return pipeline.start() if start else pipeline

    yield make
    for pipeline in created:
        pipeline.stop()


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory) -> Path:
    """One chDB data directory for the whole session: chDB serves one directory per process."""
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def clickhouse(chdb_dir: Path, clickhouse_server_dsn: str | None) -> ClickHouseSettings:
    """A fresh database per test, on the session's chDB directory or on the server."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    if clickhouse_server_dsn:
        return ClickHouseSettings(dsn=clickhouse_server_dsn, database=database)
    return ClickHouseSettings(dsn=f"chdb://{chdb_dir}", database=database)


@pytest.fixture
def kafka_settings(base_settings: Settings) -> KafkaSettings:
    return base_settings.kafka.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """Debian's redis-server (``make redis``) on a free loopback port, for the reservation ledger."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except RedisServerError as exc:  # a missing server is a failed run, not a skipped one
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()
