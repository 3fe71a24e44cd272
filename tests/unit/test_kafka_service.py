"""Unit tests for the local Kafka broker manager: no Java, no Maven, no broker."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterstream.config import LocalServicesSettings
from meterstream.services import kafka
from meterstream.services.kafka import (
    KafkaBroker,
    bootstrap_servers,
    java_major_version,
    new_cluster_id,
    render_server_properties,
)
from meterstream.services.process import ServiceError, port_in_use


@pytest.fixture()
def listener() -> Iterator[int]:
    """A port that is really in use: a socket we bind and listen on ourselves."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(tmp_path: Path, port: int = 29092, controller: int = 29093) -> LocalServicesSettings:
    return LocalServicesSettings(state_dir=tmp_path / "state", kafka_port=port,
                                 kafka_controller_port=controller)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def parse(properties: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in properties.splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def test_server_properties_use_settings_and_loopback_only(tmp_path: Path) -> None:
    props = parse(render_server_properties(make_settings(tmp_path, 29092, 29093)))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093"
    assert props["process.roles"] == "broker,controller"
    assert props["log.cleaner.enable"] == "true"
    assert props["offsets.topic.replication.factor"] == "1"
    assert "0.0.0.0" not in render_server_properties(make_settings(tmp_path))


def test_server_properties_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = LocalServicesSettings(state_dir=Path(".local"))
    log_dir = Path(parse(render_server_properties(settings))["log.dirs"])
    assert log_dir.is_absolute()
    assert log_dir == tmp_path / ".local" / "kafka" / "data"


def test_bootstrap_servers(tmp_path: Path) -> None:
    assert bootstrap_servers(make_settings(tmp_path, 19092, 19093)) == "127.0.0.1:19092"


def test_cluster_id_is_22_base64url_chars() -> None:
    for _ in range(200):
        cid = new_cluster_id()
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cid)
        assert not cid.startswith("-")


def test_port_in_use_detects_our_own_listener(listener: int) -> None:
    assert port_in_use(listener) is True


def test_port_in_use_false_for_a_free_port() -> None:
    assert port_in_use(free_port()) is False


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_292"', 8),
        ("command not found", None),
    ],
)
def test_java_major_version(output: str, major: int | None) -> None:
    assert java_major_version(output) == major


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceError, match=r"Java 17\+ is required"):
        kafka.java_executable()


def test_old_java_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "java"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho \'java version "1.8.0_292"\' >&2\n')
    fake.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    with pytest.raises(ServiceError, match=r"Java 17\+ is required.*1\.8\.0_292"):
        kafka.java_executable()


def test_missing_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceError, match=r"Maven \(`mvn`\) is required"):
        KafkaBroker(make_settings(tmp_path))._ensure_jars(lambda _step: None)


def test_failing_maven_shows_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "mvn"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '[ERROR] Could not resolve dependencies for kafka_2.13'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    broker = KafkaBroker(make_settings(tmp_path))
    with pytest.raises(ServiceError, match=r"exit 1(.|\n)*Could not resolve dependencies"):
        broker._ensure_jars(lambda _step: None)
    assert not broker.lib_dir.exists()


def test_jars_matching_the_stamp_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = KafkaBroker(make_settings(tmp_path))
    broker.lib_dir.mkdir(parents=True)
    (broker.lib_dir / ".pom.sha256").write_text(hashlib.sha256(broker.pom.read_bytes()).hexdigest())
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn: any resolve attempt would raise
    steps: list[str] = []
    broker._ensure_jars(steps.append)
    assert steps == []


def test_equal_ports_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="must differ"):
        KafkaBroker(make_settings(tmp_path, 29092, 29092))


def test_status_when_not_running(tmp_path: Path) -> None:
    status = KafkaBroker(make_settings(tmp_path, 29092, 29093)).status()
    assert status.running is False
    assert status.pid is None
    assert status.bootstrap == "127.0.0.1:29092"
    assert status.data_dir == (tmp_path / "state" / "kafka" / "data").resolve()
    assert status.version is None


def test_version_comes_from_the_resolved_jar(tmp_path: Path) -> None:
    broker = KafkaBroker(make_settings(tmp_path))
    broker.lib_dir.mkdir(parents=True)
    (broker.lib_dir / "kafka_2.13-4.4.0.jar").touch()
    (broker.lib_dir / "kafka-clients-4.4.0.jar").touch()
    assert broker.status().version == "4.4.0"


@pytest.mark.parametrize("content", ["dead", "not-a-pid", "self"])
def test_stale_pid_file_is_removed(tmp_path: Path, content: str) -> None:
    """A dead pid, garbage, or a live pid that is not a Kafka broker (recycled) are all stale."""
    broker = KafkaBroker(make_settings(tmp_path))
    broker.home.mkdir(parents=True)
    pid = {"dead": str(dead_pid()), "self": str(os.getpid())}.get(content, content)
    broker.pid_file.write_text(pid)
    assert broker.status().running is False
    assert not broker.pid_file.exists()
    assert broker.down() is False


def test_down_when_not_running_is_harmless(tmp_path: Path) -> None:
    assert KafkaBroker(make_settings(tmp_path)).down() is False


@pytest.mark.parametrize("which", ["kafka_port", "kafka_controller_port"])
def test_up_refuses_a_port_used_by_someone_else(tmp_path: Path, listener: int, which: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    other = free_port()
    ports = (listener, other) if which == "kafka_port" else (other, listener)
    broker = KafkaBroker(make_settings(tmp_path, *ports))

    def must_not_run(*_args: object) -> None:
        raise AssertionError("up() went past the port check")

    monkeypatch.setattr(kafka, "java_executable", must_not_run)
    with pytest.raises(ServiceError) as excinfo:
        broker.up()
    message = str(excinfo.value)
    assert f"Port {listener} " in message and which in message
    assert "not the meterstream broker" in message
    if sys.platform == "linux":  # the owner comes from /proc: it is this test process
        assert f"pid {os.getpid()}" in message
