"""Run the worker as a child process and watch it: for the demo and the integration tests.

The worker is started exactly as an operator would start it (``meterstream
worker``), configured through the environment, and observed through its
``/stats/`` endpoint. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx


class WorkerProcessError(RuntimeError):
    pass


class WorkerProcess:
    def __init__(self, env: Mapping[str, str], web_port: int, log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.web_port = web_port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 120.0) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meterstream.cli", "worker", "--loglevel", "info"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Ready means the web endpoint answers and the batch consumer has been assigned partitions."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                stats = self.stats(timeout=2.0)
                if stats.get("ready"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise WorkerProcessError(f"worker not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        response = httpx.get(f"http://127.0.0.1:{self.web_port}/stats/", timeout=timeout)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def wait_for(self, messages: int, timeout: float, on_progress: Any = None) -> dict[str, Any]:
        """Wait until the worker has processed ``messages`` messages in total."""
        deadline = time.monotonic() + timeout
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                stats = self.stats()
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            if on_progress is not None:
                on_progress(stats)
            if stats["messages"] >= messages:
                return stats
            time.sleep(0.25)
        raise WorkerProcessError(
            f"worker processed {stats.get('messages', '?')} of {messages} messages in {timeout:.0f} s; "
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise WorkerProcessError(
                f"worker exited with code {self.process.returncode}; log tail:\n{self.log_tail()}"
            )

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
