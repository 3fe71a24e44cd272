import logging

from meterstream.stream_processors.quiet_logs import RepeatFilter


def _record(msg: str, name: str = "aiokafka.conn") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (1,), None)


def test_repeats_pass_once_per_interval_with_a_count_of_those_held_back():
    now = [0.0]
    repeat = RepeatFilter(interval=10, clock=lambda: now[0])
    passed = []
    for i in range(2000):  # 2 per millisecond for a second
        now[0] = i / 2000
        record = _record("Unable connect to node with id %s")
        if repeat.filter(record):
            passed.append(record.getMessage())
    assert passed == ["Unable connect to node with id 1"]
    now[0] = 11.0
    record = _record("Unable connect to node with id %s")
    assert repeat.filter(record)
    assert record.getMessage() == "Unable connect to node with id 1 [and 1999 more like this in the last 10 s]"
    assert repeat.filter(_record("another message"))  # other templates are not held back
