"""The Python examples of the README and docs/, run as written against the real broker and worker.

Each example is taken from its page (the SDK snippet: README.md, the first block of
its section; the guard: docs/budgets.md, the code block after its marker comment) and
executed with only the names it leaves to the reader supplied: settings, the model
call, the SDK client. If the documented API drifts from the code, these fail.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest

from meterstream.config import get_settings
from meterstream.producers import BudgetExceeded, MeterClient, Reason

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BUDGETS_DOC = ROOT / "docs" / "budgets.md"


def _block_after(page: Path, marker: str) -> str:
    text = page.read_text()
    start = text.index(marker)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no python block after {marker!r} in {page.name}"
    return match.group(1)


@pytest.fixture
def readme_env(pipeline_factory, monkeypatch):
    """A pipeline, and the process-wide settings pointing at its topics (the examples read them)."""
    pipeline = pipeline_factory(budgets="customers:\n  acme: {monthly_credits: '2', thresholds: [100], action: block}\n")
    monkeypatch.setenv("METERSTREAM_KAFKA__TOPIC_PREFIX", pipeline.kafka.topic_prefix)
    monkeypatch.delenv("METERSTREAM_LEDGER__REDIS_URL", raising=False)
    get_settings.cache_clear()
    yield pipeline
    get_settings.cache_clear()


def test_the_guard_example(readme_env):
    pipeline = readme_env
    code = _block_after(BUDGETS_DOC, '<!-- docs example "guard"')
    calls: list[str] = []

    def call_model(model: str, max_tokens: int):
        calls.append(model)
        return SimpleNamespace(usage=SimpleNamespace(prompt_tokens=1200, completion_tokens=max_tokens // 2))

    guards = []
    with MeterClient(pipeline.kafka) as meter:

        def run() -> dict:
            namespace = {"kafka_settings": pipeline.kafka, "max_tokens": 100, "call_model": call_model, "meter": meter}
            exec(compile(code, "docs/budgets.md (guard example)", "exec"), namespace)
            guards.append(namespace["guard"])
            deadline = time.monotonic() + 30
            while "acme" not in namespace["guard"].view.states:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            return namespace

        try:
            # gpt-4o: 1,200 input tokens 0.6 credits + 100 output tokens 0.2: 0.8 estimated per call.
            first = run()
            assert first["decision"].code is Reason.WITHIN_BUDGET and calls == ["gpt-4o"]
            second = run()  # a new guard, as the example builds one
            assert second["decision"].allowed
            pipeline.wait_processed(2)  # 1.4 credits stored (0.7 each); 0.6 left < 0.8 estimated
            with pytest.raises(BudgetExceeded) as blocked:
                run()
            assert blocked.value.code in (Reason.WOULD_EXCEED_BUDGET, Reason.BUDGET_EXHAUSTED)
        finally:
            for guard in guards:
                guard.stop()
    assert len(calls) == 2


def test_the_sdk_example(readme_env):
    pipeline = readme_env
    text = README.read_text()
    section = text.index("## Recording usage (the SDK)")
    code = re.compile(r"```python\n(.*?)```", re.S).search(text, section).group(1)
    logged: list[str] = []
    namespace = {
        "log": SimpleNamespace(error=lambda *a: logged.append(a[0] % a[1:])),
        "completion": SimpleNamespace(usage=SimpleNamespace(prompt_tokens=1000, completion_tokens=200)),
        "message": SimpleNamespace(usage=SimpleNamespace(input_tokens=800, output_tokens=100,
                                                         cache_read_input_tokens=0, cache_creation_input_tokens=0)),
    }  # fmt: skip
    exec(compile(code, "README.md (SDK example)", "exec"), namespace)
    assert logged == [] and namespace["meter"].failed == 0
    stats = pipeline.wait_processed(5)
    assert stats["dead_letters"] == 0
    from meterstream.storage.queries import run_saved_query

    rows = run_saved_query(pipeline.clickhouse, "month_to_date", period=datetime.now(timezone.utc).strftime("%Y-%m"), customer="acme").dicts()
    assert rows and rows[0]["usage_credits"] > Decimal(0)
