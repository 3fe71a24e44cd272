"""Customer-visible usage end to end: SDK -> Kafka -> worker -> ClickHouse -> `meterstream serve`.

One pipeline (worker child process, real broker, its own store) with budgets for two
customers; `meterstream serve` runs as a subprocess with the same environment and reads
through the worker. The JSON API is checked for exact figures and for scoping; headless
Chromium (installed by `make browser`) loads the page and the rendered DOM is checked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from html import unescape
from pathlib import Path

import httpx
import pytest

from meterstream.config import Settings
from meterstream.pricing.plans import load_catalog
from meterstream.producers import MeterClient
from meterstream.schemas.events import UsageEvent
from meterstream.web.tokens import new_token, token_hash
from meterstream.web.views import dec

from .conftest import Pipeline, free_port

pytestmark = pytest.mark.system

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ALPHA, BRAVO = "web-alpha", "web-bravo"

BUDGETS = f"""
customers:
  {ALPHA}: {{monthly_credits: "100", thresholds: [50, 80, 100], action: block}}
  {BRAVO}:
    monthly_credits: "10"
    thresholds: [50, 80, 100]
    action: downgrade
    downgrade_to: gpt-4o-mini
    run_cap: {{max_steps: 1, action: block}}   # its one run is capped: that blocks the run, not bravo
"""


@dataclass
class Expected:
    """What the store must hold per customer, computed offline from the events sent."""

    events: list[UsageEvent] = field(default_factory=list)

    def credits(self, since: datetime | None = None, period: str | None = None) -> Decimal:
        catalog = load_catalog()
        return sum(
            (catalog.rate(e).credits for e in self.events
             if (since is None or e.occurred_at >= since) and (period is None or e.period == period)),
            Decimal(0),
        )  # fmt: skip

    def cost(self) -> Decimal:
        catalog = load_catalog()
        return sum((catalog.rate(e).cost_to_serve for e in self.events), Decimal(0))


@dataclass
class WebSetup:
    pipeline: Pipeline
    url: str
    tokens: dict[str, str]
    expected: dict[str, Expected]
    log_path: Path

    def get(self, path: str, token: str | None = None, **params: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + path, headers=headers, params=params, timeout=60)


def _start_server(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "meterstream.cli", "serve", "--port", str(port), "--bind", "127.0.0.1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"meterstream serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    _stop(process)
    pytest.fail(f"meterstream serve did not answer in 30 s:\n{log_path.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def web(base_settings: Settings, clickhouse_server_dsn: str | None, tmp_path_factory) -> Iterator[WebSetup]:
    root = tmp_path_factory.mktemp("web")
    pipeline = Pipeline(base_settings, root, clickhouse_server_dsn, BUDGETS)
    server: subprocess.Popen[bytes] | None = None
    try:
        pipeline.start()
        now = datetime.now(timezone.utc)
        expected = {ALPHA: Expected(), BRAVO: Expected()}
        with MeterClient(pipeline.kafka) as meter:
            # gpt-4o input is 0.5 credits per 1K tokens: 10,000 input tokens = exactly 5 credits.
            for i in range(21):  # 105 credits now: past 50, 80 and 100% of alpha's 100 -> block
                expected[ALPHA].events.append(
                    meter.record_llm_call(ALPHA, "gpt-4o", input_tokens=10_000, output_tokens=0, event_id=f"a-{i}")
                )
            for i in range(4):  # three days ago: in the usage series; in this month's budget only if same month
                expected[ALPHA].events.append(
                    meter.record_llm_call(ALPHA, "gpt-4o", input_tokens=10_000, output_tokens=0,
                                          event_id=f"a-old-{i}", occurred_at=now - timedelta(days=3))  # fmt: skip
                )
            # 15,540 input tokens = 7.77 credits: 77.7% of bravo's 10 -> warn (and a run-cap alert).
            expected[BRAVO].events.append(
                meter.record_llm_call(BRAVO, "gpt-4o", input_tokens=15_540, output_tokens=0, event_id="b-0",
                                      run_id="b-run")  # fmt: skip
            )
            assert meter.flush(30) == 0
        assert meter.failed == 0
        stats = pipeline.wait_processed(26)
        assert stats["rated"] == 26 and stats["alerts"] == 5, stats  # alpha 50/80/100, bravo 50 and its run

        tokens = {ALPHA: new_token(), BRAVO: new_token()}
        tokens_file = root / "tokens.yaml"
        tokens_file.write_text("".join(f'"{token_hash(t)}": {c}\n' for c, t in tokens.items()))
        port = free_port()
        env = {
            **pipeline.worker.env,
            "METERSTREAM_WEB__TOKENS_FILE": str(tokens_file),
            "METERSTREAM_WEB__SHOW_COST_TO_SERVE": "true",  # off by default; the test checks the figure
        }
        log_path = root / "serve.log"
        server = _start_server(env, port, log_path)
        yield WebSetup(pipeline, f"http://127.0.0.1:{port}", tokens, expected, log_path)
    finally:
        if server is not None:
            _stop(server)
        pipeline.stop()


# -- the JSON API ---------------------------------------------------------------------------------


def test_the_api_returns_a_customers_own_figures_exactly(web: WebSetup):
    token = web.tokens[ALPHA]
    alpha = web.expected[ALPHA]
    period = datetime.now(timezone.utc).strftime("%Y-%m")
    assert web.get("/api/v1/me", token).json()["customer_id"] == ALPHA

    base = f"/api/v1/customers/{ALPHA}"
    daily = web.get(f"{base}/usage", token, days="7", bucket="day").json()
    assert daily["customer_id"] == ALPHA and len(daily["series"]) == 7
    assert Decimal(daily["totals"]["credits"]) == alpha.credits() == Decimal(125)
    assert Decimal(daily["totals"]["cost_to_serve"]) == alpha.cost()
    assert daily["totals"]["events"] == 25
    by_day: dict[str, Decimal] = defaultdict(Decimal)
    catalog = load_catalog()
    for event in alpha.events:
        by_day[event.occurred_at.strftime("%Y-%m-%dT00:00:00Z")] += catalog.rate(event).credits
    assert {p["start"]: Decimal(p["credits"]) for p in daily["series"] if p["events"]} == by_day

    hourly = web.get(f"{base}/usage", token, days="7", bucket="hour").json()
    assert len(hourly["series"]) == 168 and hourly["totals"]["credits"] == daily["totals"]["credits"]

    budget = web.get(f"{base}/budget", token).json()
    month_to_date = alpha.credits(period=period)  # 125, or 105 in the first days of a month
    assert Decimal(budget["month_to_date"]["credits"]) == month_to_date
    assert budget["budget"] == {"monthly_credits": "100", "thresholds": [50, 80, 100], "action": "block"}
    assert Decimal(budget["used_percent"]) == month_to_date
    assert all(t["reached"] for t in budget["thresholds"]) and budget["projection"]["budget_reached"] is True
    assert Decimal(budget["days"][-1]["cumulative_credits"]) == month_to_date

    deadline = time.monotonic() + 30  # the server follows the worker's decisions on the enforcement-state topic
    while (state := web.get(f"{base}/enforcement", token).json())["state"] != "block" or state[
        "derived_from"
    ] != "enforcement-state":
        assert time.monotonic() < deadline, f"the worker's decision never reached the server: {state}"
        time.sleep(0.2)
    assert state["state"] == "block" and "monthly budget of 100 credits reached" in state["reason"]
    assert [a["threshold_percent"] for a in state["alerts"]] == [50, 80, 100]

    bravo = web.get(f"/api/v1/customers/{BRAVO}/budget", web.tokens[BRAVO]).json()
    assert Decimal(bravo["month_to_date"]["credits"]) == web.expected[BRAVO].credits() == Decimal("7.77")
    # Bravo's run-cap alert (100%, block) concerns one run: the customer is only warned.
    bravo_state = web.get(f"/api/v1/customers/{BRAVO}/enforcement", web.tokens[BRAVO]).json()
    assert bravo_state["state"] == "warn", bravo_state
    assert [a["threshold_percent"] for a in bravo_state["alerts"]] == [50]


def test_a_token_cannot_read_another_customer_and_no_token_reads_nothing(web: WebSetup):
    alpha_token = web.tokens[ALPHA]
    for view in ("usage", "budget", "enforcement"):
        own = web.get(f"/api/v1/customers/{ALPHA}/{view}", alpha_token)
        assert own.status_code == 200 and BRAVO not in own.text
        for other in (BRAVO, "no-such-customer"):
            denied = web.get(f"/api/v1/customers/{other}/{view}", alpha_token)
            assert denied.status_code == 403 and "7.77" not in denied.text
        for token in (None, "mst_not-a-real-token", web.tokens[BRAVO] + "x"):
            assert web.get(f"/api/v1/customers/{ALPHA}/{view}", token).status_code == 401
    assert web.get("/api/v1/me").status_code == 401
    assert web.get("/api/v1/me", "mst_not-a-real-token").status_code == 401
    # Tokens never reach the server's log.
    log = web.log_path.read_text()
    assert "GET /api/v1/me 401" in log
    assert all(token not in log for token in web.tokens.values())


# -- the page in a real browser ----------------------------------------------------------------


def _chromium(url: str, *extra: str, timeout: float = 90) -> str:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed: run `make browser` (`make test` does it)", pytrace=False)
    with tempfile.TemporaryDirectory() as profile:
        command = [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1280,900", "--virtual-time-budget=10000", *extra, url,
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the browser's helper processes too
            process.communicate(timeout=10)
            pytest.fail(f"chromium did not finish in {timeout:.0f} s")
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def _element(dom: str, element_id: str) -> tuple[str, str]:
    """(attributes, text) of the element with this id (the page's figures are leaf elements)."""
    match = re.search(rf'<(\w+)([^>]*\bid="{element_id}"[^>]*)>(.*?)</\1>', dom, re.S)
    assert match, f"no #{element_id} in the page"
    return match.group(2), unescape(re.sub(r"<[^>]+>", "", match.group(3))).strip()


def test_the_page_shows_the_customer_its_own_usage(web: WebSetup):
    url = f"{web.url}/#token={web.tokens[ALPHA]}"
    dom = _chromium(url, "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom)
    assert body and 'data-state="ready"' in body.group(1), _element(dom, "error")

    month_to_date = web.expected[ALPHA].credits(period=datetime.now(timezone.utc).strftime("%Y-%m"))
    attributes, text = _element(dom, "mtd-credits")
    assert f'data-exact="{dec(month_to_date)}"' in attributes
    assert text == f"{month_to_date.quantize(Decimal('0.01'), ROUND_HALF_UP):,}"  # "125.00"
    assert _element(dom, "customer")[1] == ALPHA
    assert _element(dom, "enforcement-state")[1] == "block"
    assert _element(dom, "budget-credits")[1] == "100.00"
    assert _element(dom, "usage-credits")[1] == "125.00"
    assert "enforcement-state topic" in _element(dom, "enforcement-note")[1]
    assert dom.count('class="bar"') == 30  # one bar per day of the default 30 days
    # Nothing of the other customer (its id, or its month-to-date figure as any figure on the page),
    # and the token is not left in the page.
    assert BRAVO not in dom
    bravo_credits = dec(web.expected[BRAVO].credits())  # "7.77"
    assert f'data-exact="{bravo_credits}"' not in dom
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<svg.*?</svg>", " ", dom, flags=re.S))  # what the reader sees
    assert not re.search(rf"(?<![\d.,]){re.escape(bravo_credits)}(?!\d)", text)
    assert web.tokens[ALPHA] not in dom

    hourly = _chromium(f"{web.url}/?bucket=hour&days=2#token={web.tokens[ALPHA]}", "--dump-dom")
    assert hourly.count('class="bar"') == 48 and _element(hourly, "usage-credits")[1] == "105.00"

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "web-customer-page.png"
    screenshot.unlink(missing_ok=True)
    _chromium(url, f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000


def test_the_page_asks_for_a_token_when_it_has_none_or_a_bad_one(web: WebSetup):
    dom = _chromium(f"{web.url}/", "--dump-dom")
    assert re.search(r'<body[^>]*data-state="signin"', dom)
    dom = _chromium(f"{web.url}/#token=mst_not-a-real-token", "--dump-dom")
    assert re.search(r'<body[^>]*data-state="error"', dom)
    assert "not valid" in _element(dom, "error")[1]
    assert ALPHA not in dom and BRAVO not in dom
