"""Keep a broker outage from flooding the worker's log.

While the broker is down aiokafka logs every failed connection attempt
(``Unable connect to node with id 1`` about twice per millisecond, measured:
74,914 lines in ~40 s). :class:`RepeatFilter` lets one line per logger and
message template through every ``interval`` seconds and says how many it held
back; the worker's own outage and recovery lines (consumer.py) carry the news.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

#: Loggers whose repeats are held back (their children included, see install()).
NOISY = ("aiokafka", "faust", "mode")


class RepeatFilter(logging.Filter):
    """At most one record per (logger, message template) per ``interval`` seconds."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} [and {held} more like this in the last {self.interval:.0f} s]"
        if len(self._last) > 10_000:  # messages with ids in their template: keep the table bounded
            self._last.clear()
        return True


def install(interval: float = 10.0, prefixes: Iterable[str] = NOISY) -> RepeatFilter:
    """Put one filter on every existing logger under ``prefixes`` (a logger's filters do not
    apply to its children's records, so each gets it)."""
    repeat = RepeatFilter(interval)
    prefixes = tuple(prefixes)
    names = [name for name in list(logging.root.manager.loggerDict) if name.split(".")[0] in prefixes]
    for name in {*names, *prefixes}:
        logger = logging.getLogger(name)
        if repeat not in logger.filters:
            logger.addFilter(repeat)
    return repeat
