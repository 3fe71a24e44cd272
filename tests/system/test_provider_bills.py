"""meterstream reconcile-provider on the real broker and engine: docs/provider-reconciliation.md's example.

The example's October usage is backfilled (`meterstream import`), rated and stored by the
worker; the providers' exports (examples/provider-bills/, written from the documented
response shapes) are compared with it through the saved query provider_daily_usage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
BILLS = ROOT / "examples" / "provider-bills"


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "meterstream.cli", *args], env={**env, "COLUMNS": "220"},
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip


def test_worked_example_metered_vs_billed(pipeline_factory):
    pipeline = pipeline_factory()
    bills = [arg for f in sorted(BILLS.glob("*-2026-10.json")) for arg in ("--bill", str(f))]

    empty = _cli(pipeline.env, "reconcile-provider", "--period", "2026-10", *bills, "--json")
    assert empty.returncode == 1, empty.stderr  # nothing metered yet: every billed token is unmetered
    assert {r["model"]: r["flags"][:1] for r in json.loads(empty.stdout)["rows"]}["gpt-4o"] == ["unmetered"]

    imported = _cli(pipeline.env, "import", str(BILLS / "events.jsonl"), "--json")
    assert imported.returncode == 0, imported.stderr
    pipeline.wait_processed(5)

    done = _cli(pipeline.env, "reconcile-provider", "--period", "2026-10", *bills, "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    rows = {(r["provider"], r["model"], r["day"]): r for r in report["rows"]}
    assert {k: r["flags"] for k, r in rows.items()} == {
        ("anthropic", "(other: web_search)", "2026-10-07"): ["cost_gap"],
        ("anthropic", "claude-haiku-4-5", "2026-10-08"): ["over_metered", "cost_gap"],
        ("anthropic", "claude-sonnet-4-5", "2026-10-07"): ["cost_gap", "price_drift"],
        ("openai", "gpt-4o", "2026-10-05"): [],
        ("openai", "gpt-4o-mini", "2026-10-06"): ["unmetered", "cost_gap"],
    }
    gpt4o = rows[("openai", "gpt-4o", "2026-10-05")]
    assert Decimal(gpt4o["metered"]["cost"]) == Decimal(gpt4o["billed"]["cost"]) == Decimal("0.1225")
    assert gpt4o["metered"]["events"] == 2 and gpt4o["token_gap"] == 0
    mini = rows[("openai", "gpt-4o-mini", "2026-10-06")]
    assert (mini["token_gap"], mini["token_gap_percent"]) == (5500, "33.33")
    sonnet = rows[("anthropic", "claude-sonnet-4-5", "2026-10-07")]
    assert (sonnet["token_gap"], sonnet["price_drift"]) == (0, "0.00075")
    assert sonnet["price_book_version"] == "payg-2026-01"  # the plan version that rated the rows

    # the table, and a threshold that lets the 1.9% drift pass
    table = _cli(pipeline.env, "reconcile-provider", "--period", "2026-10", *bills, "--threshold", "2")
    assert table.returncode == 1 and "unmetered" in table.stdout and "price_drift" not in table.stdout

    missing = _cli(pipeline.env, "reconcile-provider", "--period", "2026-10", "--bill", str(BILLS / "nope.json"))
    assert missing.returncode == 2 and "nope.json" in missing.stderr
