"""Profile a running process with py-spy (optional: not a project dependency) and summarise it.

``py-spy record --gil --format raw`` writes collapsed stacks (``frame;frame;... count``,
each frame ``function (file:line)``, leaf last), sampling only the thread that holds the GIL:
the worker's three Python threads (event loop, rating, store writes) share one GIL, so that
thread's work is what bounds its events/s (without ``--gil`` a thread waiting for the GIL or
the store's HTTP answer showed as working). :func:`summarise` turns them into
the top functions by self time and by inclusive time, with the share of all
samples, plus the shares of a few named stages of the worker's hot path.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: Worker stages, recognised by a frame of the stack; the first match in this order wins.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("decode (decode_batch: orjson, column checks; the model for the rest)", ("decode_batch (", "decode_event (")),
    ("rate (the batch engine: rate_rows)", ("rate_rows (", "rate_event (", "Catalog.rate (")),
    ("ClickHouse insert: Arrow columns (columns.py)", ("meterstream/storage/columns.py",)),
    ("ClickHouse insert: engine call (insert_batch)", ("insert_batch (",)),
    ("ClickHouse state reads (StoreBackedState.prepare)", ("StoreBackedState.prepare", "StoreBackedState._load", "StoreBackedState._query", "StoreBackedState._preload")),
    ("aggregate/thresholds (BatchProcessor._aggregate)", ("BatchProcessor._aggregate (",)),
    ("dedupe, reversals, raw rows (BatchProcessor.process)", ("BatchProcessor.process (",)),
    ("state commit", ("BatchProcessor.commit", "StoreBackedState.commit")),
    ("publish alerts/states/dead letters", ("create_app.<locals>.publish",)),
    ("batch consumer: records -> messages, stages, commits", ("BatchConsumer.",)),
    ("rest of the batch path (stage_batch, write)", ("create_app.<locals>.stage_batch", "create_app.<locals>.write")),
    ("aiokafka producer sender (requests)", ("aiokafka/producer/", "faust/transport/drivers/aiokafka.py")),
    ("aiokafka consumer: fetch, decompress, records", ("aiokafka/consumer/", "aiokafka/record/", "aiokafka/codec.py")),
    ("aiokafka connection I/O", ("aiokafka/conn.py", "aiokafka/client.py")),
    ("web (/stats/, store reads)", ("aiohttp/",)),
]
#: Leaf frames of a thread that is waiting, not working.
IDLE_LEAVES = {"select", "_worker", "wait", "_wait_for_tstate_lock", "get", "poll"}
IDLE_FILES = ("selectors.py", "concurrent/futures/thread.py", "threading.py", "queue.py")


def _is_idle(frame: str) -> bool:
    match = _FRAME.match(frame.strip())
    if not match:
        return False
    return match.group("func").rsplit(".", 1)[-1] in IDLE_LEAVES and match.group("file").endswith(IDLE_FILES)


def available() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    return shutil.which("py-spy")


class Recorder:
    """``py-spy record`` attached to ``pid`` until :meth:`stop` (SIGINT makes it write the file)."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        exe = available()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.out = out
        self.log = out.with_suffix(".log")
        self.process = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(out), "--gil"],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def stop(self, timeout: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _func(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match.group("file")
    short = "/".join(Path(file).parts[-3:]) if "/" in file else file
    return f"{match.group('func')} ({short})"


def summarise(raw_file: Path, top: int = 20) -> dict[str, Any]:
    """Top functions (self and inclusive) and stage shares, over the samples where a thread was working."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    stage_counts: Counter[str] = Counter()
    total = idle = 0
    for line in raw_file.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if _is_idle(frames[-1]):
            idle += count
            continue
        total += count
        self_counts[_func(frames[-1])] += count
        for name in {_func(f) for f in frames}:
            incl_counts[name] += count
        for stage, needles in STAGES:
            if any(n in f for f in frames for n in needles):
                stage_counts[stage] += count
                break
        else:
            stage_counts["other (event loop, timers, tasks)"] += count

    def share(counter: Counter[str], only: str | None = None) -> list[dict[str, Any]]:
        items = [(k, n) for k, n in counter.most_common() if only is None or only in k]
        return [
            {"function": name, "samples": n, "percent": round(100 * n / total, 1)} for name, n in items[:top]
        ]

    return {
        "samples_working": total,
        "samples_idle": idle,
        "note": "percent of the samples of the thread holding the GIL (py-spy --gil; idle waits in "
        "select/queues excluded): a stage's share of the one core the worker's Python can use",
        "stages": [
            {"stage": s, "samples": n, "percent": round(100 * n / total, 1) if total else 0.0}
            for s, n in stage_counts.most_common()
        ],
        "top_self": share(self_counts),
        "top_inclusive_meterstream": share(incl_counts, only="meterstream/"),
        "top_inclusive": share(incl_counts),
    }
