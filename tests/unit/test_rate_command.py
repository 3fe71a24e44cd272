"""`meterstream rate`: every customer and period present unless --period, refused reversals, help text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import time_machine
from typer.testing import CliRunner

from meterstream.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plans.yaml"


@pytest.fixture(autouse=True)
def _clock_after_the_events() -> Iterator[None]:
    """The events below are from autumn 2026; the models refuse events dated ahead of the clock."""
    with time_machine.travel(datetime(2026, 11, 16, 12, 30, tzinfo=timezone.utc), tick=False):
        yield


def _write(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def _requests(event_id: str, customer: str, at: str, quantity: int = 10) -> dict:
    return {"event_id": event_id, "customer_id": customer, "occurred_at": at, "meter": "requests", "quantity": quantity}


def test_rate_prints_every_customer_and_period_present(tmp_path: Path) -> None:
    events = _write(
        tmp_path / "e.jsonl",
        [
            _requests("a1", "acme", "2026-09-10T00:00:00Z"),
            _requests("a2", "acme", "2026-10-10T00:00:00Z"),
            _requests("g1", "globex", "2026-10-11T00:00:00Z"),
        ],
    )
    result = CliRunner().invoke(app, ["rate", "--plan", str(EXAMPLE), "--events", str(events)])
    assert result.exit_code == 0, result.output
    invoices = json.loads(result.stdout)
    assert [(i["customer_id"], i["period"]) for i in invoices] == [
        ("acme", "2026-09"), ("acme", "2026-10"), ("globex", "2026-10"),
    ]  # fmt: skip
    only = CliRunner().invoke(app, ["rate", "--plan", str(EXAMPLE), "--events", str(events), "--period", "2026-09"])
    assert [(i["customer_id"], i["period"]) for i in json.loads(only.stdout)] == [("acme", "2026-09")]


def test_rate_reports_refused_reversals_and_keeps_them_on_the_invoice(tmp_path: Path) -> None:
    outcome = {"type": "outcome", "customer_id": "acme", "occurred_at": "2026-10-10T00:00:00Z",
               "outcome_type": "resolved_ticket", "attribution": "ai_only"}  # fmt: skip
    events = _write(
        tmp_path / "e.jsonl",
        [
            {**outcome, "event_id": "o1"},
            {**outcome, "event_id": "r1", "reversal_of": "o1", "occurred_at": "2026-10-11T00:00:00Z"},
            {**outcome, "event_id": "r2", "reversal_of": "o1", "occurred_at": "2026-10-12T00:00:00Z"},
        ],
    )
    result = CliRunner().invoke(app, ["rate", "--plan", str(EXAMPLE), "--events", str(events)])
    assert result.exit_code == 2
    assert "refused reversal r2: outcome 'o1' was already reversed by 'r1'" in result.stderr
    (invoice,) = json.loads(result.stdout)
    assert invoice["refused"] == [{"event_id": "r2", "reason": "outcome 'o1' was already reversed by 'r1'"}]


def test_rate_help_says_what_the_default_period_is() -> None:
    text = CliRunner().invoke(app, ["rate", "--help"], terminal_width=200).stdout
    assert "every period in the file" in text
    assert "current month" not in text
