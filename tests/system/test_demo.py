"""The README's first command runs: the demo end to end, small, as `make demo` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end_and_its_totals_check_out(base_settings):
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "demo", "--customers", "8", "--events", "600", "--timeout", "180"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Month-to-date usage" in out and "Budget alerts raised" in out
    assert "✓ stored usage + outcome credits" in out and "(exact: True)" in out
    assert "acme-corp" in out
