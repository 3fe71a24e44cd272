"""The deprecation policy: warnings from worker processes are found in their logs and fail the test."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from tests import deprecations


def test_a_deprecation_in_the_test_process_is_an_error() -> None:
    with pytest.raises(DeprecationWarning):
        warnings.warn("old call", DeprecationWarning, stacklevel=1)


def test_a_worker_process_deprecation_reaches_its_log_and_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment the integration pipeline gives its worker processes.
    env = {**os.environ, "PYTHONWARNINGS": "always::DeprecationWarning"}
    code = "import warnings; warnings.warn('mode.utils.compat is deprecated', DeprecationWarning, stacklevel=1)"
    log = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stderr
    assert deprecations.untolerated(log) == [line for line in log.splitlines() if "DeprecationWarning" in line]
    assert deprecations.untolerated(log)  # found
    monkeypatch.setitem(deprecations.TOLERATED, r"mode\.utils\.compat", "a reason")
    assert deprecations.untolerated(log) == []
