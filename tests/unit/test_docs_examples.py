"""The data examples of docs/ are accepted by the code that reads such data.

The Python examples run against a real worker in tests/system/test_readme_examples.py
and billing.md's catalog in test_billing_docs.py; these are the wire-format event of
architecture.md and the budgets file of budgets.md, read as the worker reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

from meterstream.budgets import load_budgets
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import ThresholdAction

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), re.S)


def test_the_wire_format_example_is_a_valid_usage_event() -> None:
    (example,) = _blocks("architecture.md", "json")
    event = UsageEvent.model_validate_json(example)
    assert (event.customer_id, event.model) == ("acme", "gpt-4o")
    assert (event.input_tokens, event.cached_input_tokens, event.output_tokens) == (1200, 400, 300)


def test_the_budgets_example_loads(tmp_path: Path) -> None:
    (example,) = _blocks("budgets.md", "yaml")
    path = tmp_path / "budgets.yaml"
    path.write_text(example)
    book = load_budgets(path, load_catalog(None))
    acme = book.for_customer("acme")
    assert acme is not None and acme.action is ThresholdAction.DOWNGRADE
    assert acme.downgrade_to == "gpt-4o-mini" and acme.monthly_amount == 250
    assert acme.run_cap is not None and acme.run_cap.max_steps == 40
    hobbyist = book.for_customer("hobbyist")
    assert hobbyist is not None and hobbyist.action is ThresholdAction.BLOCK
