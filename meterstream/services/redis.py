"""A local Redis server for the reservation ledger: Debian's ``redis-server``, loopback only.

``make redis`` installs it (as ``make browser`` installs Chromium); the integration tests
and ``bench/caps.py`` start one on a free loopback port with this class and stop it again
(also to test a ledger that goes away). No persistence: the ledger is rebuilt from the
worker's stored totals at its start (``reconcile_ledger``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


class RedisServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1:``port`` (no persistence)."""

    def __init__(self, work_dir: Path, port: int | None = None, binary: str = "redis-server") -> None:
        self.work_dir = Path(work_dir)
        self.port = port or free_port()
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        path = shutil.which(self.binary)
        if path is None:
            raise RedisServerError("redis-server is not installed; run `make redis` (Debian's redis-server)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = (self.work_dir / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.work_dir), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited with {self.process.returncode}; see {log.name}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout:.0f} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
