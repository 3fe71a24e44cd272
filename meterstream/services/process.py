"""What the local services share: a detached process with a pid file, started, awaited and stopped.

:class:`LocalProcess` holds the pid-file bookkeeping, the stop sequence (SIGTERM, then SIGKILL)
and the wait for readiness; :mod:`meterstream.services.kafka` and
:mod:`meterstream.services.clickhouse` say how their process starts, how it answers and which
ports it needs. The /proc helpers work on Linux and degrade to trusting a live pid elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

#: How long a service gets to exit on SIGTERM before SIGKILL.
STOP_TIMEOUT = 30.0


class ServiceError(RuntimeError):
    """A local service could not be started, checked or stopped; the message says what to do."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True if something listens on host:port. Binding with SO_REUSEADDR (as Kafka does) is the
    test the broker will face, so TIME_WAIT leftovers of a stopped broker do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise ServiceError(f"Cannot bind {host}:{port} to check it: {exc}") from exc
    return False


def tail(text: str, lines: int = 30) -> str:
    """The last lines of tool output for an error message: no colour codes, long lines cut."""
    last = re.sub(r"\x1b\[[0-9;]*m", "", text).rstrip().splitlines()[-lines:]
    return "\n".join(line[:300] for line in last)


def cmdline(pid: int) -> list[str] | None:
    """argv of pid from /proc; None where there is no /proc (then a live pid is trusted)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return [] if Path("/proc/self").exists() else None
    return raw.decode(errors="replace").rstrip("\0").split("\0")


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie. Reaps pid if it is our own exited child (a service started by
    this process), which ``kill(pid, 0)`` alone would still report as alive."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except ProcessLookupError:
        return False
    except (OSError, IndexError):  # no permission or no /proc: it exists
        return True


def port_owner(port: int) -> str | None:
    """Best effort 'pid N, command' of whatever listens on port, from /proc (Linux only)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        rows = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []
        for fields in (row.split() for row in rows):  # local_address st ... inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir() if sockets else ():
        try:
            if proc.name.isdigit() and any(_fd_target(fd) in sockets for fd in (proc / "fd").iterdir()):
                argv = cmdline(int(proc.name)) or []
                what = f"a Kafka broker ({argv[-1]})" if "kafka.Kafka" in argv else " ".join(argv)[:120]
                return f"pid {proc.name}, {what}"
        except OSError:  # the process ended, or is not ours to read
            continue
    return None


def _fd_target(fd: Path) -> str | None:
    # A busy process opens and closes descriptors while we list them: one that closed is no match,
    # not a reason to skip the whole process.
    try:
        return os.readlink(fd)
    except OSError:
        return None


class LocalProcess:
    """A service process of ours, known by its pid file; subclasses say what makes a pid theirs.

    ``name`` is how messages call it ("Kafka broker", "ClickHouse server").
    """

    name: str
    pid_file: Path

    def _is_ours(self, pid: int) -> bool:
        raise NotImplementedError

    def _log_tail(self) -> str:
        raise NotImplementedError

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pid = 0
        if pid > 1 and pid_alive(pid) and self._is_ours(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)  # stale: dead, garbled, or the pid was recycled
        return None

    def down(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM, SIGKILL after ``timeout`` seconds. Returns False if no process of ours was running."""
        pid = self._running_pid()
        if pid is None:
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if sig is signal.SIGKILL:
                logger.warning("%s pid %s ignored SIGTERM for %.0fs; killing it", self.name, pid, timeout)
            with contextlib.suppress(ProcessLookupError):  # it may exit on its own meanwhile
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while (alive := pid_alive(pid)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not alive:
                self.pid_file.unlink(missing_ok=True)
                return True
        raise ServiceError(f"{self.name} pid {pid} did not exit even after SIGKILL.")

    def _await_ready(self, pid: int, answers: Callable[[float], bool], timeout: float, interval: float) -> None:
        """Poll ``answers(seconds)`` until it is true, the process dies, or ``timeout`` passes (then stop it)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not pid_alive(pid):
                self.pid_file.unlink(missing_ok=True)
                raise ServiceError(f"The {self.name} exited during start-up.\n{self._log_tail()}")
            if answers(min(2.0, left)):
                return
            time.sleep(interval)
        self.down()
        raise ServiceError(f"The {self.name} was not ready within {timeout:.0f}s and has been stopped; on a "
                           f"slow machine raise METERSTREAM_SERVICES__START_TIMEOUT.\n{self._log_tail()}")
