"""System-tier fixtures: the real broker, workers and the ClickHouse server (tests/servers.py).

``make test`` starts the local broker and ClickHouse server first (``meterstream
services up``); the fixtures read their addresses from the same settings as every
other process (``METERSTREAM_KAFKA__BOOTSTRAP_SERVERS``, ``METERSTREAM_CLICKHOUSE__DSN``).
Each :class:`Pipeline` has its own topics, consumer group, database and worker process.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from meterstream.config import ClickHouseSettings, KafkaSettings, Settings
from meterstream.services.redis import RedisServer, RedisServerError
from meterstream.stream_processors.runner import WorkerProcess
from meterstream.topics import Topics, ensure_topics
from tests.conftest import clock_env
from tests.deprecations import untolerated
from tests.servers import (  # fixtures, found by pytest under these names
    clickhouse,
    clickhouse_server_dsn,
    drop_database,
    env_settings,
    free_port,
    private_clickhouse,
)


@pytest.fixture(scope="session")
def base_settings(env_settings: Settings) -> Settings:
    """The session's settings, once the broker answers (a missing broker is a failed run, not a skipped one)."""
    admin = AdminClient(env_settings.kafka.confluent_config())
    try:
        admin.list_topics(timeout=15)
    except Exception as exc:
        pytest.fail(
            f"no Kafka broker at {env_settings.kafka.bootstrap_servers} ({exc}); "
            "run `make test` (it starts one) or `meterstream services up`",
            pytrace=False,
        )
    return env_settings


class Pipeline:
    """One isolated pipeline: own topics, consumer group, store and worker."""

    def __init__(
        self, base: Settings, root: Path, server_dsn: str, budgets: str | None, env: dict[str, str] | None = None
    ) -> None:
        name = f"t{uuid.uuid4().hex[:10]}"
        self.kafka = base.kafka.model_copy(update={"topic_prefix": f"{name}."})
        self.clickhouse = ClickHouseSettings(dsn=server_dsn, database=name)
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
            # deprecations reach the worker's log, which the test checks when it ends (tests/deprecations.py)
            "PYTHONWARNINGS": "always::DeprecationWarning",
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
        self.processed_before = 0  # a started worker counts its messages from zero
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
        drop_database(self.clickhouse)
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
    base_settings: Settings, clickhouse_server_dsn: str, tmp_path: Path
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
    found = [line for p in created if p.worker.log_path.exists()
             for line in untolerated(p.worker.log_path.read_text(errors="replace"))]  # fmt: skip
    if found:
        pytest.fail("deprecation warnings in the worker's log (list them in tests/deprecations.py "
                    "with a reason, or fix the call):\n" + "\n".join(dict.fromkeys(found)))  # fmt: skip


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
