"""Run a local ClickHouse server, without Docker: the engine of the ``chdb-core`` wheel.

Every meterstream process (worker(s), CLI, ``serve``, ``reconcile``, the benchmark, the tests)
talks to ClickHouse over HTTP with clickhouse-connect, the way production does. On a machine
without a ClickHouse server this module provides one: clickhouse-local from the pinned
``chdb-core`` wheel with its HTTP and native listeners started
(:mod:`meterstream.services.clickhouse_process`). Production points the DSN at its own server.

Layout under ``settings.clickhouse_dir``: ``config.xml`` (rendered from
``services/clickhouse/config.xml`` on every start; it points at the repository's
``services/clickhouse/users.xml``), ``data/``, ``logs/server.out`` (the process's output),
``logs/clickhouse-server.log`` / ``.err.log`` (the engine's) and ``server.pid``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

import httpx

from meterstream.config import ClickHouseSettings, LocalServicesSettings
from meterstream.services.process import (
    STOP_TIMEOUT,
    LocalProcess,
    ServiceError,
    cmdline,
    port_in_use,
    port_owner,
    tail,
)

#: ``services/clickhouse`` at the top of the repo (config.xml, a template, and users.xml), reached
#: through the link ``meterstream/services/files``: it travels in the wheel like sql/ (kafka.py).
SERVICE_FILES = Path(__file__).parent / "files" / "clickhouse"
PORT_RELEASE_GRACE = 3.0
PROCESS_MODULE = "meterstream.services.clickhouse_process"


def is_local_dsn(clickhouse: ClickHouseSettings, settings: LocalServicesSettings) -> bool:
    """True when the DSN points at the local server's HTTP port (the demo and tests start it then)."""
    url = urlsplit(clickhouse.dsn.get_secret_value())
    return url.scheme == "http" and url.hostname in ("127.0.0.1", "localhost") and (
        url.port == settings.clickhouse_http_port
    )


@dataclass(frozen=True)
class ServerStatus:
    """What ``meterstream services status`` shows; ``pid`` is None when not running."""

    running: bool
    pid: int | None
    http_url: str
    tcp_port: int
    data_dir: Path
    log_file: Path


def render_config(settings: LocalServicesSettings, users_xml: Path, logs_dir: Path,
                  template: Path = SERVICE_FILES / "config.xml") -> str:  # fmt: skip
    return Template(template.read_text()).substitute(
        http_port=settings.clickhouse_http_port,
        tcp_port=settings.clickhouse_tcp_port,
        users_xml=users_xml,
        logs_dir=logs_dir,
    )


class ClickHouseServer(LocalProcess):
    """Start, ready-check, report and stop the local ClickHouse server described by ``settings``."""

    name = "ClickHouse server"

    def __init__(self, settings: LocalServicesSettings, service_files: Path = SERVICE_FILES) -> None:
        if settings.clickhouse_http_port == settings.clickhouse_tcp_port:
            raise ServiceError(f"clickhouse_http_port and clickhouse_tcp_port must differ ({settings.clickhouse_http_port}).")
        self.settings = settings
        self.home = settings.clickhouse_dir.resolve()
        self.data_dir, self.logs_dir = self.home / "data", self.home / "logs"
        self.config_file, self.pid_file = self.home / "config.xml", self.home / "server.pid"
        self.template, self.users_xml = service_files / "config.xml", service_files / "users.xml"
        self._out_mark = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.clickhouse_http_port}/"

    def status(self) -> ServerStatus:
        pid = self._running_pid()
        return ServerStatus(running=pid is not None, pid=pid, http_url=self.http_url,
                            tcp_port=self.settings.clickhouse_tcp_port, data_dir=self.data_dir,
                            log_file=self.logs_dir / "clickhouse-server.log")  # fmt: skip

    def is_ready(self, timeout: float = 2.0) -> bool:
        """True if the HTTP interface answers ``/ping`` (no credentials needed)."""
        try:
            return httpx.get(f"{self.http_url}ping", timeout=timeout).text.strip() == "Ok."
        except httpx.HTTPError:
            return False

    def up(self, on_step: Callable[[str], object] | None = None) -> ServerStatus:
        """Start the server and wait until ``/ping`` answers. Idempotent: if our server already
        runs with this configuration, only wait for it to be ready."""
        step = on_step or (lambda _label: None)
        config = render_config(self.settings, self.users_xml, self.logs_dir, self.template)
        pid = self._running_pid()
        if pid is not None:
            current = self.config_file.read_text() if self.config_file.is_file() else ""
            if current != config:
                raise ServiceError(f"The ClickHouse server (pid {pid}) runs with another configuration (ports, "
                                   "paths) than requested; stop it first (`meterstream services down clickhouse`).")
            step("already running")
            self._wait_ready(pid)
            step("ready")
            return self.status()
        self._check_ports_free()
        for folder in (self.data_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(config)
        step("starting")
        self._wait_ready(self._start())
        step("ready")
        return self.status()

    def down(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM (the engine flushes and exits in ~2 s), SIGKILL after ``timeout`` seconds.
        Returns False if no server of ours was running."""
        return super().down(timeout)

    def _is_ours(self, pid: int) -> bool:
        argv = cmdline(pid)
        return argv is None or (PROCESS_MODULE in argv and str(self.data_dir) in argv)

    def _check_ports_free(self) -> None:
        ports = {self.settings.clickhouse_http_port: "HTTP interface, clickhouse_http_port",
                 self.settings.clickhouse_tcp_port: "native interface, clickhouse_tcp_port"}  # fmt: skip
        for port, role in ports.items():
            # A server killed a moment ago frees its sockets a little after its pid is gone.
            deadline = time.monotonic() + PORT_RELEASE_GRACE
            while port_in_use(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            if port_in_use(port):
                owner = port_owner(port) or "another process"
                raise ServiceError(
                    f"Port {port} on 127.0.0.1 ({role}) is already in use by {owner}, which is not the "
                    f"meterstream ClickHouse server of {self.home}. Stop that process, or choose free ports with "
                    "METERSTREAM_SERVICES__CLICKHOUSE_HTTP_PORT and METERSTREAM_SERVICES__CLICKHOUSE_TCP_PORT "
                    "(and point METERSTREAM_CLICKHOUSE__DSN at the HTTP one).")

    def _start(self) -> int:
        """Launch detached (own session) so the server outlives the CLI that started it."""
        out = self.logs_dir / "server.out"
        self._out_mark = out.stat().st_size if out.is_file() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(out, "ab") as stream:
            proc = subprocess.Popen([sys.executable, "-m", PROCESS_MODULE, str(self.data_dir)],
                                    stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT,
                                    cwd=self.home, env=env, start_new_session=True)  # fmt: skip
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def _wait_ready(self, pid: int) -> None:
        """Poll /ping until it answers, the process dies, or start_timeout passes (then stop it)."""
        self._await_ready(pid, lambda seconds: self.is_ready(timeout=min(seconds, 1.0)), self.settings.start_timeout, 0.1)

    def _log_tail(self) -> str:
        out = self.logs_dir / "server.out"
        try:
            with open(out, "rb") as stream:
                stream.seek(self._out_mark)
                text = stream.read().decode(errors="replace")
        except OSError:
            text = ""
        return f"--- last lines of {out} ---\n{tail(text, 20)}" if text.strip() else f"(nothing logged in {out})"
