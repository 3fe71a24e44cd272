"""Every module the package (and bench/) imports is declared in pyproject.toml, in the right place.

deptry reads the imports and the declared dependencies ([tool.deptry] in pyproject.toml):
a module imported but not declared (DEP001), declared but never imported (DEP002), imported
but only there through another package (DEP003), or a dev-only package imported by the
package (DEP004) fails this test with deptry's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_is_declared_in_pyproject() -> None:
    result = subprocess.run([sys.executable, "-m", "deptry", "."], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={"NO_COLOR": "1", "PATH": ""})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Scanning" in result.stdout + result.stderr  # it did look at the code
