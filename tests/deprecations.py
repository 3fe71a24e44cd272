"""The deprecation warnings the suite tolerates, each with the reason.

A deprecation is an upgrade about to break. In the test process every ``DeprecationWarning``
is an error (pyproject's ``filterwarnings``); the worker processes the integration tests start
run with ``PYTHONWARNINGS=always::DeprecationWarning`` and their logs are checked for them when
the test ends (``tests/system/conftest.py``). A warning fails the test unless its text
matches one of the patterns below. Add one only with the reason, and remove it when the
dependency or our code no longer warns.
"""

from __future__ import annotations

import re

#: pattern (searched in the warning's line) -> why it is tolerated
TOLERATED: dict[str, str] = {}


def untolerated(log_text: str) -> list[str]:
    """The log's warning lines that no pattern of :data:`TOLERATED` covers."""
    lines = [line for line in log_text.splitlines() if "DeprecationWarning" in line]
    return [line for line in lines if not any(re.search(p, line) for p in TOLERATED)]
