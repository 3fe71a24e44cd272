"""The real broker, started from Maven-resolved jars on free ports in a temporary state dir.

Needs Java 17+ and Maven (jars come from ~/.m2 or Maven Central); never touches a broker
on the default ports.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from meterstream.config import LocalServicesSettings
from meterstream.services.kafka import KafkaBroker, bootstrap_servers
from meterstream.services.process import ServiceError, port_in_use

pytestmark = [
    pytest.mark.system,
    # Java 17+ and Maven are required by the whole suite (the broker runs on them): no skip.
    pytest.mark.timeout(300),
]


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture()
def settings(tmp_path: Path) -> LocalServicesSettings:
    port, controller = free_ports(2)
    return LocalServicesSettings(state_dir=tmp_path / "state", kafka_port=port,
                                 kafka_controller_port=controller, start_timeout=90)


@pytest.fixture()
def broker(settings: LocalServicesSettings) -> Iterator[KafkaBroker]:
    manager = KafkaBroker(settings)
    try:
        yield manager
    finally:
        manager.down()  # never leave a broker behind, whatever failed


def round_trip(bootstrap: str) -> bytes | None:
    topic = f"lifecycle-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"customer-1", value=b"one event")
    assert producer.flush(15) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "lifecycle", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                return msg.value()
        return None
    finally:
        consumer.close()


def test_up_ready_idempotent_status_down(
    broker: KafkaBroker, settings: LocalServicesSettings, tmp_path: Path
) -> None:
    steps: list[str] = []
    started = time.monotonic()
    status = broker.up(on_step=steps.append)
    assert time.monotonic() - started < settings.start_timeout + 60
    assert steps[-2:] == ["starting", "ready"]
    assert "formatting storage" in steps
    assert status.running and status.pid
    assert status.bootstrap == bootstrap_servers(settings) == f"127.0.0.1:{settings.kafka_port}"
    assert status.version and status.version[0].isdigit()
    assert (status.data_dir / "meta.properties").is_file()
    assert broker.is_ready()

    # The broker logs through log4j2 into server.log (not the SLF4J NOP fallback).
    assert "Kafka Server started" in status.log_file.read_text()
    assert "NOP" not in (broker.logs_dir / "server.out").read_text()

    assert round_trip(status.bootstrap) == b"one event"

    # Starting again is harmless: same process, nothing redone.
    again: list[str] = []
    assert broker.up(on_step=again.append).pid == status.pid
    assert again == ["already running", "ready"]

    # Another state dir on the same ports is refused, naming the port.
    intruder = KafkaBroker(LocalServicesSettings(state_dir=tmp_path / "other", kafka_port=settings.kafka_port,
                                                 kafka_controller_port=settings.kafka_controller_port))
    with pytest.raises(ServiceError, match=f"Port {settings.kafka_port} .*not the meterstream broker"):
        intruder.up()

    assert broker.down() is True
    assert not broker.status().running
    assert not broker.pid_file.exists()
    assert not port_in_use(settings.kafka_port) and not port_in_use(settings.kafka_controller_port)
    assert broker.down() is False

    # A restart reuses the jars and the formatted storage.
    restart: list[str] = []
    assert broker.up(on_step=restart.append).running
    assert restart == ["starting", "ready"]
    assert broker.down() is True
