"""Customer-visible usage end to end: SDK -> Kafka -> worker -> ClickHouse -> `meterstream serve`.

One pipeline (worker child process, real broker, its own store) with budgets for two
customers; `meterstream serve` runs as a subprocess with the same environment and reads
through the worker. The JSON API is checked for exact figures and for scoping; headless
Chromium (installed by `make browser`) loads the page and the rendered DOM is checked.
"""

from __future__ import annotations

import json
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
from decimal import Decimal
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

# alpha is on a team plan with a base fee, included credits and a free grant; its budget is set in
# money ($1.00 = 100 credits at the plan's credit value of 0.01), so the page shows it in dollars.
PLANS = f"""
currency: USD
default_plan: payg
plans:
  payg:
    versions:
      - {{version: "payg-web-1", effective_from: "2026-01-01", price_book: default, credit_value: "0.01",
          overage: {{model: per_unit, unit_price: "0.01"}}}}
  team:
    versions:
      - {{version: "team-web-1", effective_from: "2026-01-01", price_book: default, credit_value: "0.01",
          base_fee: "20", included_credits: "50", overage: {{model: per_unit, unit_price: "0.02"}}}}
customers:
  {ALPHA}: {{plan: team, grants: [{{id: alpha-free, kind: free, credits: "30", granted_on: "2026-01-01"}}]}}
"""

BUDGETS = f"""
customers:
  {ALPHA}: {{monthly_amount: "1", thresholds: [50, 80, 100], action: block}}
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
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meterstream.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

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
    plans_file = root / "plans.yaml"
    plans_file.write_text(PLANS)
    pipeline.env["METERSTREAM_WORKER__PLANS_FILE"] = str(plans_file)
    pipeline.worker.env["METERSTREAM_WORKER__PLANS_FILE"] = str(plans_file)
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

        tokens = {ALPHA: new_token(), BRAVO: new_token(), "scoped": new_token(), "expired": new_token()}
        later = (now + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
        tokens_file = root / "tokens.yaml"
        tokens_file.write_text(
            f'"{token_hash(tokens[ALPHA])}": {{customer: {ALPHA}, expires: "{later}"}}\n'
            f'"{token_hash(tokens[BRAVO])}": {BRAVO}\n'
            f'"{token_hash(tokens["scoped"])}": {{customer: {ALPHA}, expires: "{later}", meters: [documents]}}\n'
            f'"{token_hash(tokens["expired"])}": {{customer: {ALPHA}, expires: "2026-01-01T00:00:00Z"}}\n'
        )
        port = free_port()
        env = {
            **pipeline.worker.env,
            "METERSTREAM_WEB__TOKENS_FILE": str(tokens_file),
            "METERSTREAM_WEB__SHOW_COST_TO_SERVE": "true",  # off by default; the test checks the figure
        }
        log_path = root / "serve.log"
        server = _start_server(env, port, log_path)
        yield WebSetup(pipeline, f"http://127.0.0.1:{port}", tokens, expected, log_path, {**env, "COLUMNS": "200"})
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
    assert Decimal(daily["totals"]["usage_credits"]) == alpha.credits() == Decimal(125)
    assert Decimal(daily["totals"]["cost_to_serve"]) == alpha.cost()
    assert daily["totals"]["events"] == 25
    by_day: dict[str, Decimal] = defaultdict(Decimal)
    catalog = load_catalog()
    for event in alpha.events:
        by_day[event.occurred_at.strftime("%Y-%m-%dT00:00:00Z")] += catalog.rate(event).credits
    assert {p["start"]: Decimal(p["usage_credits"]) for p in daily["series"] if p["events"]} == by_day

    hourly = web.get(f"{base}/usage", token, days="7", bucket="hour").json()
    assert len(hourly["series"]) == 168 and hourly["totals"]["usage_credits"] == daily["totals"]["usage_credits"]

    budget = web.get(f"{base}/budget", token).json()
    month_to_date = alpha.credits(period=period)  # 125, or 105 in the first days of a month
    assert Decimal(budget["month_to_date"]["budget_credits"]) == month_to_date
    assert budget["budget"] == {"unit": "money", "monthly_credits": "100", "monthly_amount": "1", "currency": "USD",
                                "thresholds": [50, 80, 100], "action": "block"}  # fmt: skip
    assert Decimal(budget["month_to_date"]["spent_amount"]) == month_to_date / 100  # at 0.01 per credit
    assert Decimal(budget["used_percent"]) == month_to_date
    assert all(t["reached"] for t in budget["thresholds"]) and budget["budget_reached"] is True
    assert Decimal(budget["days"][-1]["cumulative_budget_credits"]) == month_to_date

    deadline = time.monotonic() + 30  # the server follows the worker's decisions on the enforcement-state topic
    while (state := web.get(f"{base}/enforcement", token).json())["state"] != "block" or state[
        "derived_from"
    ] != "enforcement-state":
        assert time.monotonic() < deadline, f"the worker's decision never reached the server: {state}"
        time.sleep(0.2)
    assert state["state"] == "block" and "monthly budget of 100 budget credits (usage + outcome credits) reached" in state["reason"]
    assert [a["threshold_percent"] for a in state["alerts"]] == [50, 80, 100]

    bravo = web.get(f"/api/v1/customers/{BRAVO}/budget", web.tokens[BRAVO]).json()
    assert Decimal(bravo["month_to_date"]["budget_credits"]) == web.expected[BRAVO].credits() == Decimal("7.77")
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
            f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra,
            *(() if any(e.startswith("--window-size") for e in extra) else ("--window-size=1280,900",)), url,
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


def _invoice_cli(web: WebSetup, period: str) -> dict:
    result = web.cli("invoice", "--customer", ALPHA, "--period", period, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_money_in_the_api_is_the_invoice_to_the_cent(web: WebSetup):
    token = web.tokens[ALPHA]
    base = f"/api/v1/customers/{ALPHA}"
    period = datetime.now(timezone.utc).strftime("%Y-%m")
    expected = _invoice_cli(web, period)
    got = web.get(f"{base}/invoice", token, period="current").json()
    # The same invoice, line for line and digit for digit (only the moment it was computed differs).
    assert {k: v for k, v in got.items() if k != "as_of"} == {k: v for k, v in expected.items() if k != "as_of"}
    assert Decimal(got["total"]) == sum(Decimal(line["amount"]) for line in got["lines"])
    [grant] = got["grants"]
    assert grant["grant_id"] == "alpha-free" and Decimal(grant["drawn_credits"]) > 0
    # The budget's usage credits are the invoice's usage credits; a budget adds the outcome credits.
    budget = web.get(f"{base}/budget", token).json()
    assert Decimal(budget["month_to_date"]["usage_credits"]) == Decimal(expected["usage"]["credits_used"])
    assert Decimal(budget["month_to_date"]["budget_credits"]) == Decimal(expected["usage"]["credits_used"]) + Decimal(
        budget["month_to_date"]["outcome_credits"])  # fmt: skip

    # Issued invoices: the closed periods with usage (November, when this runs in early December).
    periods = sorted({e.period for e in web.expected[ALPHA].events if e.period < period}, reverse=True)
    issued = web.get(f"{base}/invoices", token).json()["invoices"]
    assert [i["period"] for i in issued] == periods
    for item in issued:
        assert item["total"] == _invoice_cli(web, item["period"])["total"] and item["status"] == "final"

    breakdown = web.get(f"{base}/breakdown", token).json()
    [model] = breakdown["by_model"]
    assert model["name"] == "gpt-4o"
    assert Decimal(model["this_period"]["usage_credits"]) == web.expected[ALPHA].credits(period=period)
    previous = periods[0] if periods else None
    assert Decimal(model["last_period"]["usage_credits"]) == (web.expected[ALPHA].credits(period=previous) if previous else 0)
    assert [w["name"] for w in breakdown["by_workflow"]] == ["(no workflow)"]


def test_tokens_expire_and_a_meter_scoped_token_sees_no_money(web: WebSetup):
    base = f"/api/v1/customers/{ALPHA}"
    expired = web.get("/api/v1/me", web.tokens["expired"])
    assert expired.status_code == 401 and "expired" in expired.json()["error"]
    scoped = web.tokens["scoped"]
    assert web.get("/api/v1/me", scoped).json()["meters"] == ["documents"]
    usage = web.get(f"{base}/usage", scoped, days="7").json()
    assert usage["totals"]["usage_credits"] == "0" and usage["totals"]["events"] == 0  # alpha used only tokens
    assert web.get(f"{base}/breakdown", scoped).json()["by_model"] == []
    for money in ("invoice", "invoices", "budget", "enforcement"):
        assert web.get(f"{base}/{money}", scoped).status_code == 403, money


def _exact_values(dom: str, element_id: str) -> list[str]:
    """The exact decimals (data-exact) inside one element, in document order."""
    match = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', dom, re.S)
    assert match, f"no #{element_id} in the page"
    return re.findall(r'data-exact="([^"]*)"', match.group(2))


def test_the_page_shows_the_customer_its_money_and_usage(web: WebSetup):
    url = f"{web.url}/#token={web.tokens[ALPHA]}"
    dom = _chromium(url, "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom)
    assert body and 'data-state="ready"' in body.group(1), _element(dom, "error")
    period = datetime.now(timezone.utc).strftime("%Y-%m")
    invoice = _invoice_cli(web, period)

    # Money first, and the page's figures are `invoice --json`'s.
    assert dom.index('id="bill-card"') < dom.index('id="budget-card"') < dom.index('id="usage-card"')
    attributes, text = _element(dom, "invoice-total")
    assert f'data-exact="{invoice["total"]}"' in attributes and text == f"${Decimal(invoice['total']):,.2f}"
    # every line's amount, then the total in the table's footer
    assert _exact_values(dom, "invoice-lines") == [line["amount"] for line in invoice["lines"]] + [invoice["total"]]
    assert _exact_values(dom, "grants") == [v for g in invoice["grants"]
                                            for v in (g["opening_credits"], g["drawn_credits"], g["closing_credits"])]
    assert f'data-exact="{invoice["usage"]["billed_overage_credits"]}"' in _element(dom, "billed-credits")[0]
    assert invoice["plan_version"] in _element(dom, "invoice-plan")[1]

    # The budget in its own unit (dollars), credits second, one percentage.
    month_to_date = web.expected[ALPHA].credits(period=period)
    assert _element(dom, "budget-spent")[1] == f"${month_to_date / 100:,.2f} of $1.00"
    assert f"{month_to_date:,.2f} budget credits" in _element(dom, "budget-credits-line")[1]
    assert _element(dom, "used-percent")[1] == f"{month_to_date:.1f}%"
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<svg.*?</svg>", " ", dom, flags=re.S))  # what the reader sees
    card = re.search(r'<section[^>]*id="budget-card".*?</section>', dom, re.S).group(0)
    card_text = re.sub(r"<[^>]+>", " ", re.sub(r"<svg.*?</svg>", " ", card, flags=re.S))
    # the thresholds, and one percentage of the budget
    assert set(re.findall(r"\d+(?:\.\d+)?%", card_text)) - {"50%", "80%", "100%"} == {f"{month_to_date:.1f}%"}
    assert _element(dom, "enforcement-state")[1] == "block"
    assert re.search(r"Since \d{1,2} [A-Z][a-z]{2} \d{4}, \d{2}:\d{2} UTC\.", _element(dom, "enforcement-detail")[1])
    assert "+00:00" not in text and not re.search(r"\d{2}:\d{2}:\d{2}\.\d", text)  # no raw timestamps
    assert _element(dom, "usage-credits")[1] == "125.00"
    assert "gpt-4o" in _element(dom, "by-model")[1]
    assert "enforcement-state topic" in _element(dom, "enforcement-note")[1]
    assert dom.count('class="bar"') == 30  # one bar per day of the default 30 days
    # Nothing of the other customer, and the token is not left in the page.
    assert BRAVO not in dom
    bravo_credits = dec(web.expected[BRAVO].credits())  # "7.77"
    assert f'data-exact="{bravo_credits}"' not in dom
    assert not re.search(rf"(?<![\d.,]){re.escape(bravo_credits)}(?!\d)", text)
    assert web.tokens[ALPHA] not in dom

    hourly = _chromium(f"{web.url}/?bucket=hour&days=2#token={web.tokens[ALPHA]}", "--dump-dom")
    assert hourly.count('class="bar"') == 48 and _element(hourly, "usage-credits")[1] == "105.00"

    scoped = _chromium(f"{web.url}/#token={web.tokens['scoped']}", "--dump-dom")
    assert 'data-state="ready"' in re.search(r"<body([^>]*)>", scoped).group(1)
    assert re.search(r'<section[^>]*id="bill-card"[^>]*hidden', scoped)  # no money for a meter-scoped token

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "web-customer-page.png"
    screenshot.unlink(missing_ok=True)
    _chromium(url, f"--screenshot={screenshot}", "--window-size=1280,2300")
    assert screenshot.stat().st_size > 10_000


def test_the_page_asks_for_a_token_when_it_has_none_or_a_bad_one(web: WebSetup):
    dom = _chromium(f"{web.url}/", "--dump-dom")
    assert re.search(r'<body[^>]*data-state="signin"', dom)
    dom = _chromium(f"{web.url}/#token=mst_not-a-real-token", "--dump-dom")
    assert re.search(r'<body[^>]*data-state="error"', dom)
    assert "not valid" in _element(dom, "error")[1]
    assert ALPHA not in dom and BRAVO not in dom
