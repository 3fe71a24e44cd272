"""Moves the clock of a Python process started by a test that runs under a moved clock.

``tests/conftest.py`` puts this directory on ``PYTHONPATH`` and sets
``METERSTREAM_TEST_CLOCK_OFFSET`` (seconds to add to the real time) while a
``clock`` test runs at a month boundary, so the worker and CLI subprocesses the
test starts share its timeline: the same instant, ticking at the real rate.
Python's site module imports ``sitecustomize`` at start-up; nothing happens
when the variable is unset.
"""

import os

_offset = os.environ.get("METERSTREAM_TEST_CLOCK_OFFSET")
if _offset:
    import time

    import time_machine

    time_machine.travel(time.time() + float(_offset), tick=True).start()
