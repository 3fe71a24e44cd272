"""Run the official Apache Kafka broker locally (KRaft, one node), without Docker.

Why: the pipeline must be tested against a real broker (Faust and confluent-kafka behave
differently against mocks), but Docker is not available everywhere. Java 17 and Maven are
enough: Maven resolves the jars declared in ``services/kafka/pom.xml`` and this module runs
``kafka.Kafka`` from them, listening on 127.0.0.1 only.

Layout under ``settings.kafka_dir``: ``lib/`` (jars, plus a stamp of the pom they came from),
``server.properties``, ``data/``, ``logs/server.out`` (stdout: JVM errors, WARN+),
``logs/server.log`` (log4j2, INFO) and ``broker.pid``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterstream.config import LocalServicesSettings
from meterstream.services.process import (
    STOP_TIMEOUT,
    LocalProcess,
    ServiceError,
    cmdline,
    port_in_use,
    port_owner,
    tail,
)

logger = logging.getLogger(__name__)

#: ``services/kafka`` at the top of the repo (the pom and the log4j2 configuration), reached through
#: the link ``meterstream/services/files`` -> ``../../services``: the files travel in the wheel as
#: ``meterstream/services/files/kafka/``, so ``meterstream services up`` works from an installed package.
SERVICE_FILES = Path(__file__).parent / "files" / "kafka"
MIN_JAVA = 17
MAVEN_TIMEOUT = 900.0  # a cold ~/.m2 downloads ~45 MB
FORMAT_TIMEOUT = 120.0
JAVA_HINT = "Install a JDK/JRE 17+ (e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME."


@dataclass(frozen=True)
class BrokerStatus:
    """What ``meterstream services status`` shows; ``pid`` is None when not running."""

    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    version: str | None
    log_file: Path


def bootstrap_servers(settings: LocalServicesSettings) -> str:
    """The address clients use for the local broker (it never listens beyond loopback)."""
    return f"127.0.0.1:{settings.kafka_port}"


def render_server_properties(settings: LocalServicesSettings) -> str:
    """server.properties for one combined broker+controller node. Paths are absolute
    because the broker's working directory is not the caller's."""
    port, ctl, sasl = settings.kafka_port, settings.kafka_controller_port, settings.kafka_sasl_port
    listeners = f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctl}"
    advertised = f"PLAINTEXT://127.0.0.1:{port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    sasl_lines = ""
    if sasl is not None:
        listeners += f",SASL_PLAINTEXT://127.0.0.1:{sasl}"
        advertised += f",SASL_PLAINTEXT://127.0.0.1:{sasl}"
        protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
        sasl_lines = (
            "# SASL/SCRAM-SHA-512 for clients; users are created through the admin API at start-up.\n"
            "sasl.enabled.mechanisms=SCRAM-SHA-512\n"
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
        )
    return f"""\
# Written by meterstream.services.kafka on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{ctl}
listeners={listeners}
advertised.listeners={advertised}
controller.listener.names=CONTROLLER
listener.security.protocol.map={protocols}
inter.broker.listener.name=PLAINTEXT
{sasl_lines}
log.dirs={settings.kafka_dir.resolve() / "data"}
num.partitions=1
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
# One node: every internal topic must be satisfiable by a single replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Dev box: bounded disk use (7 days or 1 GiB per partition, 64 MiB segments).
log.retention.hours=168
log.retention.bytes=1073741824
log.segment.bytes=67108864
log.retention.check.interval.ms=300000
# meterstream uses a compacted topic.
log.cleaner.enable=true
"""


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID as 22 base64url characters, never starting with '-'
    (Kafka's generator avoids that too: the CLI would read it as an option)."""
    while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return cid


def java_major_version(version_output: str) -> int | None:
    """17 from 'openjdk version "17.0.15" ...', 8 from 'java version "1.8.0_292"'."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def java_executable() -> str:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH, checked to be Java 17+ (Kafka 4 needs it)."""
    home = Path(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else None
    java = str(home) if home and home.is_file() else shutil.which("java")
    if not java:
        raise ServiceError(f"Java {MIN_JAVA}+ is required to run the local Kafka broker, but no `java` "
                           f"was found on PATH or in JAVA_HOME. {JAVA_HINT}")
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
        output = (done.stderr + done.stdout).strip() or "no output"
    except (OSError, subprocess.TimeoutExpired) as exc:
        output = str(exc)
    major = java_major_version(output)
    if major is None or major < MIN_JAVA:
        raise ServiceError(f"Java {MIN_JAVA}+ is required to run the local Kafka broker; `{java} -version` "
                           f"says: {output.splitlines()[0]}. {JAVA_HINT}")
    return java


class KafkaBroker(LocalProcess):
    """Start, ready-check, report and stop the local broker described by ``settings``."""

    name = "Kafka broker"

    def __init__(self, settings: LocalServicesSettings, service_files: Path = SERVICE_FILES) -> None:
        if settings.kafka_port == settings.kafka_controller_port:
            raise ServiceError(f"kafka_port and kafka_controller_port must differ ({settings.kafka_port}).")
        self.settings = settings
        self.home = settings.kafka_dir.resolve()
        self.lib_dir, self.data_dir, self.logs_dir = self.home / "lib", self.home / "data", self.home / "logs"
        self.config_file, self.pid_file = self.home / "server.properties", self.home / "broker.pid"
        self.pom, self.log_config = service_files / "pom.xml", service_files / "log4j2.properties"
        self._log_mark = 0  # size of server.log when we last started: error tails show only this run

    def status(self) -> BrokerStatus:
        """Current state, without network calls. A stale pid file is removed."""
        pid = self._running_pid()
        jars = sorted(self.lib_dir.glob("kafka_2.*-*.jar"))  # kafka_2.13-4.4.0.jar
        return BrokerStatus(running=pid is not None, pid=pid, bootstrap=bootstrap_servers(self.settings),
                            data_dir=self.data_dir, version=jars[0].stem.split("-", 1)[1] if jars else None,
                            log_file=self.logs_dir / "server.log")

    def is_ready(self, timeout: float = 2.0) -> bool:
        """True if the broker answers a metadata request (an open port is not enough)."""
        return self._answers(self._admin(), timeout)

    def up(self, on_step: Callable[[str], None] | None = None) -> BrokerStatus:
        """Start the broker and wait until it serves requests. Idempotent: if our broker already
        runs, only wait for it to be ready. ``on_step`` receives progress labels for the CLI."""
        step = on_step or (lambda _label: None)
        pid = self._running_pid()
        if pid is not None:
            config = self.config_file.read_text() if self.config_file.is_file() else ""
            if config != render_server_properties(self.settings):
                raise ServiceError(f"The Kafka broker (pid {pid}) runs with another configuration (ports, "
                                   "paths) than requested; stop it first (`meterstream services down`).")
            step("already running")
            if not self.is_ready():
                self._wait_ready(pid)
            step("ready")
            return self.status()
        self._check_ports_free()
        java = java_executable()
        self.home.mkdir(parents=True, exist_ok=True)
        self._ensure_jars(step)
        self.config_file.write_text(render_server_properties(self.settings))
        self._ensure_formatted(java, step)
        step("starting")
        self._wait_ready(self._start(java))
        if self.settings.kafka_sasl_port is not None:
            step("creating the SCRAM user")
            self._ensure_scram_user()
        step("ready")
        return self.status()

    def _ensure_scram_user(self) -> None:
        """Create (or reset) the SASL/SCRAM-SHA-512 user through the admin API."""
        from confluent_kafka.admin import (
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        password = self.settings.kafka_sasl_password
        if password is None:
            raise ServiceError("kafka_sasl_port is set but kafka_sasl_password is not (METERSTREAM_SERVICES__KAFKA_SASL_PASSWORD)")
        upsert = UserScramCredentialUpsertion(
            self.settings.kafka_sasl_username,
            ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
            password.get_secret_value().encode(),
        )
        admin = self._admin()  # keep the handle alive until the futures resolve
        try:
            for future in admin.alter_user_scram_credentials([upsert]).values():
                future.result(timeout=30)
        except Exception as exc:
            raise ServiceError(f"could not create the SCRAM user {self.settings.kafka_sasl_username!r}: {exc}") from exc

    def down(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM (a clean shutdown avoids log recovery on the next start), SIGKILL after
        ``timeout`` seconds. Returns False if no broker of ours was running."""
        return super().down(timeout)

    def _is_ours(self, pid: int) -> bool:
        argv = cmdline(pid)
        return argv is None or ("kafka.Kafka" in argv and str(self.config_file) in argv)

    def _check_ports_free(self) -> None:
        ports = {self.settings.kafka_port: "Kafka listener, kafka_port",
                 self.settings.kafka_controller_port: "KRaft controller, kafka_controller_port"}
        if self.settings.kafka_sasl_port is not None:
            ports[self.settings.kafka_sasl_port] = "SASL listener, kafka_sasl_port"
        for port, role in ports.items():
            if port_in_use(port):
                owner = port_owner(port) or "another process"
                raise ServiceError(
                    f"Port {port} on 127.0.0.1 ({role}) is already in use by {owner}, which is not the "
                    f"meterstream broker of {self.home}. Stop that process, or choose free ports with "
                    "METERSTREAM_SERVICES__KAFKA_PORT and METERSTREAM_SERVICES__KAFKA_CONTROLLER_PORT.")

    def _ensure_jars(self, step: Callable[[str], None]) -> None:
        """Run Maven unless lib/ was resolved from this very pom (the stamp holds its hash)."""
        if not self.pom.is_file():
            raise ServiceError(f"{self.pom} not found; reinstall meterstream (the wheel carries services/kafka/).")
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()
        stamp = self.lib_dir / ".pom.sha256"
        if stamp.is_file() and stamp.read_text().strip() == digest:
            return
        if not (mvn := shutil.which("mvn")):
            raise ServiceError("Maven (`mvn`) is required to download the Kafka broker jars into "
                               f"{self.lib_dir}; install Maven 3.6+ (e.g. `apt-get install maven`).")
        step("resolving jars")
        partial = self.home / "lib.partial"  # an interrupted run must never look complete
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-f", str(self.pom), "dependency:copy-dependencies",
               f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=MAVEN_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"Maven did not resolve the Kafka jars within {MAVEN_TIMEOUT:.0f}s.") from exc
        if done.returncode != 0 or not partial.is_dir():
            output = tail(done.stdout + done.stderr)
            raise ServiceError(f"Maven could not resolve the Kafka jars (exit {done.returncode}); check "
                               f"access to Maven Central or ~/.m2/settings.xml:\n{output}")
        (partial / ".pom.sha256").write_text(digest + "\n")
        shutil.rmtree(self.lib_dir, ignore_errors=True)
        partial.rename(self.lib_dir)

    def _jvm(self, java: str) -> list[str]:
        return [java, "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.log_config}",
                f"-Dkafka.logs.dir={self.logs_dir}", "-cp", str(self.lib_dir / "*")]

    def _ensure_formatted(self, java: str, step: Callable[[str], None]) -> None:
        """KRaft needs its log dir formatted once; meta.properties marks a formatted dir."""
        if (self.data_dir / "meta.properties").exists():
            return
        step("formatting storage")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*self._jvm(java), "kafka.tools.StorageTool", "format", "-t", new_cluster_id(),
               "-c", str(self.config_file)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=FORMAT_TIMEOUT, cwd=self.home)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"Formatting {self.data_dir} took over {FORMAT_TIMEOUT:.0f}s.") from exc
        if done.returncode != 0:
            raise ServiceError(f"Formatting Kafka storage in {self.data_dir} failed "
                               f"(exit {done.returncode}):\n{tail(done.stdout + done.stderr)}")

    def _start(self, java: str) -> int:
        """Launch detached (own session) so the broker outlives the CLI that started it."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / "server.log"
        self._log_mark = log.stat().st_size if log.is_file() else 0
        cmd = [*self._jvm(java), f"-Xmx{self.settings.kafka_heap}", "-XX:+ExitOnOutOfMemoryError",
               "kafka.Kafka", str(self.config_file)]
        with open(self.logs_dir / "server.out", "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.home, start_new_session=True)
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def _admin(self) -> Any:
        from confluent_kafka.admin import AdminClient  # lazy: keeps CLI start-up fast

        return AdminClient({"bootstrap.servers": bootstrap_servers(self.settings), "log_level": 0,
                            "reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 500,
                            "socket.connection.setup.timeout.ms": 2000})

    @staticmethod
    def _answers(admin: Any, timeout: float) -> bool:
        from confluent_kafka import KafkaException

        try:
            admin.list_topics(timeout=timeout)
            return True
        except KafkaException:
            return False

    def _wait_ready(self, pid: int) -> None:
        """Poll until the broker answers, dies, or start_timeout passes (then stop it)."""
        admin = self._admin()
        self._await_ready(pid, lambda seconds: self._answers(admin, seconds), self.settings.start_timeout, 0.2)

    def _log_tail(self) -> str:
        parts = []
        for log, mark in ((self.logs_dir / "server.out", 0), (self.logs_dir / "server.log", self._log_mark)):
            try:
                with open(log, "rb") as stream:
                    stream.seek(mark if mark <= os.fstat(stream.fileno()).st_size else 0)  # else: rolled over
                    text = stream.read().decode(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- last lines of {log} ---\n{tail(text, 20)}")
        return "\n".join(parts) or f"(nothing logged in {self.logs_dir})"
