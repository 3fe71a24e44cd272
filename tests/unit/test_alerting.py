"""The alert consumers' pure parts: backoff, signing, the retry rule, the ledger, and one forwarder step.

No processes: HTTP goes through ``httpx.MockTransport``, the ledger is a file in tmp_path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from meterstream.alerting.forwarder import AlertForwarder, ForwarderError, secret_from_env
from meterstream.alerting.ledger import DeliveryLedger, DeliveryState, LedgerError
from meterstream.alerting.source import AlertMessage
from meterstream.alerting.tail import format_alert
from meterstream.alerting.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    Outcome,
    RetryPolicy,
    Verdict,
    WebhookSender,
    alert_body,
    backoff_delay,
    classify,
    retry_after_seconds,
    retry_schedule,
    sign,
    url_origin,
    verify_signature,
)
from meterstream.config import AlertForwarderSettings, Settings
from meterstream.schemas.records import BudgetAlert, ThresholdAction

SECRET = "whsec-unit-7d1c0a"
URL = "https://hooks.example.com/services/T000/B000/tok3n?x=1"


def _alert(customer: str = "acme", threshold: int = 80, **fields) -> BudgetAlert:
    values = {
        "alert_id": BudgetAlert.make_id(customer, "2026-11", threshold),
        "customer_id": customer,
        "period": "2026-11",
        "threshold_percent": threshold,
        "budget_credits": Decimal("25000"),
        "spent_credits": Decimal("20000.125"),
        "crossed_at": datetime(2026, 11, 27, 10, 15, 3, tzinfo=timezone.utc),
        "triggering_event_id": "evt-9",
        **fields,
    }
    return BudgetAlert(**values)


def _message(alert: BudgetAlert | None, raw: bytes = b"", offset: int = 0) -> AlertMessage:
    return AlertMessage(alert, "" if alert else "not a BudgetAlert", raw or (alert_body(alert) if alert else b""),
                        "t.budget-alerts", 0, offset)  # fmt: skip


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_from_the_initial_wait_and_is_capped() -> None:
    assert retry_schedule(8, 0.5, 30.0) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert retry_schedule(1, 0.5, 30.0) == []  # one attempt: no wait at all
    assert backoff_delay(10_000, 0.5, 30.0) == 30.0  # no overflow however many attempts
    with pytest.raises(ValueError):
        backoff_delay(0, 0.5, 30.0)


def test_retry_after_lengthens_the_wait_but_never_past_the_cap() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_initial=1.0, backoff_max=20.0)
    assert policy.delay(1) == 1.0
    assert policy.delay(1, retry_after=7) == 7.0
    assert policy.delay(3, retry_after=1) == 4.0  # a shorter Retry-After does not shorten the backoff
    assert policy.delay(1, retry_after=3600) == 20.0


def test_retry_after_header_forms() -> None:
    now = datetime(2026, 11, 27, 10, 0, 0, tzinfo=timezone.utc)
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, Verdict.DELIVERED), (202, Verdict.DELIVERED), (204, Verdict.DELIVERED),
     (429, Verdict.RETRY), (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY), (599, Verdict.RETRY),
     (400, Verdict.PERMANENT), (401, Verdict.PERMANENT), (404, Verdict.PERMANENT), (408, Verdict.PERMANENT),
     (410, Verdict.PERMANENT), (422, Verdict.PERMANENT), (301, Verdict.PERMANENT), (302, Verdict.PERMANENT)],
)  # fmt: skip
def test_which_answers_are_retried(status: int, verdict: Verdict) -> None:
    assert classify(status) is verdict


# -- signing ----------------------------------------------------------------------------------


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = alert_body(_alert())
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert sign(SecretStr(SECRET), body) == expected
    assert verify_signature(SECRET, body, expected)
    assert verify_signature(SecretStr(SECRET), body, expected)
    assert not verify_signature(SECRET, body + b" ", expected)
    assert not verify_signature("another-secret", body, expected)
    assert not verify_signature(SECRET, body, None)
    assert not verify_signature(SECRET, body, expected.replace("sha256=", "sha1="))


def test_body_is_the_wire_format_with_exact_decimals() -> None:
    alert = _alert()
    body = json.loads(alert_body(alert))
    assert body["spent_credits"] == "20000.125"
    assert BudgetAlert.model_validate_json(alert_body(alert)) == alert


def test_url_origin_drops_credentials_path_and_query() -> None:
    assert url_origin("https://user:pw@hooks.example.com:8443/T0/B1/xyz?token=1") == "https://hooks.example.com:8443"
    assert url_origin(URL) == "https://hooks.example.com"


def test_secret_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET_UNIT", SECRET)
    secret = secret_from_env("HOOK_SECRET_UNIT")
    assert secret.get_secret_value() == SECRET
    assert SECRET not in repr(secret) and SECRET not in str(secret)
    monkeypatch.delenv("HOOK_SECRET_UNIT")
    with pytest.raises(ForwarderError, match="HOOK_SECRET_UNIT is not set"):
        secret_from_env("HOOK_SECRET_UNIT")


# -- settings ---------------------------------------------------------------------------------


def test_forwarder_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("METERSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METERSTREAM_ALERT_FORWARDER__URL", URL)
    monkeypatch.setenv("METERSTREAM_ALERT_FORWARDER__SECRET_ENV", "HOOK_SECRET")
    monkeypatch.setenv("METERSTREAM_ALERT_FORWARDER__MAX_ATTEMPTS", "3")
    settings = Settings()
    assert settings.alert_forwarder.url is not None and settings.alert_forwarder.url.get_secret_value() == URL
    assert settings.alert_forwarder.max_attempts == 3
    assert "tok3n" not in repr(settings) and "tok3n" not in settings.model_dump_json()
    monkeypatch.setenv("METERSTREAM_ALERT_FORWARDER__URL", "ftp://hooks.example.com/tok3n")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert [tuple(e["loc"]) for e in info.value.errors()] == [("alert_forwarder", "url")]
    assert "tok3n" not in str(info.value)
    with pytest.raises(ValidationError):
        AlertForwarderSettings(group_id="../escape")  # names a file in the state dir


# -- the ledger -------------------------------------------------------------------------------


def test_ledger_records_states_durably_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "fwd.sqlite3"
    alert, other = _alert(threshold=50), _alert(threshold=80)
    with DeliveryLedger(path) as ledger:
        assert ledger.get(alert.alert_id) is None
        ledger.mark_sending(alert)
        assert ledger.get(alert.alert_id).state is DeliveryState.SENDING
        ledger.mark_delivered(alert.alert_id, attempts=3, status=200)
        ledger.mark_sending(alert)  # never downgrades a delivered alert
        ledger.mark_sending(other)
    with DeliveryLedger(path) as ledger:
        entry = ledger.get(alert.alert_id)
        assert (entry.state, entry.attempts, entry.status) == (DeliveryState.DELIVERED, 3, 200)
        assert [e.alert_id for e in ledger.in_state(DeliveryState.SENDING)] == [other.alert_id]
        ledger.forget_sending(alert.alert_id)  # only removes an in-flight marker
        assert ledger.get(alert.alert_id).state is DeliveryState.DELIVERED
        ledger.mark_dead(other.alert_id, attempts=1, status=410, reason="HTTP 410")
        assert ledger.get(other.alert_id).detail == "HTTP 410"
        with pytest.raises(LedgerError, match="not marked as sending"):
            ledger.mark_delivered(_alert(threshold=100).alert_id, attempts=1, status=200)


def test_one_process_per_ledger(tmp_path: Path) -> None:
    path = tmp_path / "fwd.sqlite3"
    with DeliveryLedger(path), pytest.raises(LedgerError, match="in use by pid"):
        DeliveryLedger(path)
    DeliveryLedger(path).close()  # released on close


# -- one delivery, over a mock transport --------------------------------------------------------


class Hook:
    """A scripted receiver: answers from ``script`` in order (then 200), recording each request."""

    def __init__(self, *script: int | Exception, headers: dict[str, str] | None = None) -> None:
        self.script = list(script)
        self.extra_headers = headers or {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script.pop(0) if self.script else 200
        if isinstance(step, Exception):
            raise step
        return httpx.Response(step, headers=self.extra_headers)


def _sender(hook: Hook, *, attempts: int = 4, stop: threading.Event | None = None) -> WebhookSender:
    return WebhookSender(URL, RetryPolicy(attempts, 0.001, 0.004), secret=SecretStr(SECRET), stop=stop,
                         transport=httpx.MockTransport(hook))  # fmt: skip


def test_retries_5xx_then_delivers_the_same_signed_body_with_the_idempotency_key(caplog) -> None:
    hook, alert = Hook(503, 429), _alert()
    with caplog.at_level(logging.DEBUG):
        delivery = _sender(hook).deliver(alert)
    assert (delivery.outcome, delivery.attempts, delivery.status) == (Outcome.DELIVERED, 3, 200)
    assert len({r.content for r in hook.requests}) == 1
    for attempt, request in enumerate(hook.requests, start=1):
        assert request.headers[IDEMPOTENCY_HEADER] == alert.alert_id
        assert request.headers["X-Meterstream-Delivery-Attempt"] == str(attempt)
        assert request.headers["Content-Type"] == "application/json"
        assert verify_signature(SECRET, request.content, request.headers[SIGNATURE_HEADER])
    assert "retrying" in caplog.text
    assert SECRET not in caplog.text and "tok3n" not in caplog.text  # logs show the origin only


def test_a_4xx_is_permanent_and_not_retried() -> None:
    hook = Hook(410)
    delivery = _sender(hook).deliver(_alert())
    assert (delivery.outcome, delivery.attempts, delivery.status) == (Outcome.FAILED, 1, 410)
    assert "permanent" in delivery.reason
    assert len(hook.requests) == 1


def test_gives_up_after_max_attempts() -> None:
    hook = Hook(*([503] * 10))
    delivery = _sender(hook, attempts=3).deliver(_alert())
    assert (delivery.outcome, delivery.attempts, delivery.status) == (Outcome.FAILED, 3, 503)
    assert delivery.reason.startswith("gave up after 3 attempts")
    assert len(hook.requests) == 3


def test_no_answer_is_retried_and_a_timeout_may_have_arrived() -> None:
    refused = _sender(Hook(httpx.ConnectError("refused"))).deliver(_alert())
    assert (refused.outcome, refused.attempts, refused.maybe_received) == (Outcome.DELIVERED, 2, False)
    timed_out = _sender(Hook(httpx.ReadTimeout("slow"))).deliver(_alert())
    assert (timed_out.outcome, timed_out.attempts, timed_out.maybe_received) == (Outcome.DELIVERED, 2, True)


def test_a_stop_between_attempts_abandons_the_alert() -> None:
    stop = threading.Event()
    stop.set()
    delivery = _sender(Hook(503), stop=stop).deliver(_alert())
    assert (delivery.outcome, delivery.attempts) == (Outcome.ABANDONED, 1)


# -- one forwarder step: ledger + webhook + dead letters ---------------------------------------


def _forwarder(tmp_path: Path, hook: Callable[[httpx.Request], httpx.Response],
               stop: threading.Event | None = None) -> AlertForwarder:
    settings = AlertForwarderSettings(state_dir=tmp_path, max_attempts=3, backoff_initial=0.001, backoff_max=0.002)
    return AlertForwarder(settings, URL, group_id="g", secret=SecretStr(SECRET), stop=stop or threading.Event(),
                          transport=httpx.MockTransport(hook))  # fmt: skip


def test_a_repeated_alert_is_posted_once_and_failures_are_dead_lettered(tmp_path: Path) -> None:
    hook = Hook(503, 200, 404)
    alert, refused = _alert(threshold=50), _alert(customer="gone", threshold=50)
    forwarder = _forwarder(tmp_path, hook)
    try:
        actions = [forwarder.handle(_message(m, raw=b"{nope", offset=i) if m is None else _message(m, offset=i)).action
                   for i, m in enumerate([alert, alert, refused, None, refused])]  # fmt: skip
    finally:
        forwarder.close()
    assert actions == ["delivered", "skipped", "dead-lettered", "unreadable", "skipped"]
    assert [r.headers[IDEMPOTENCY_HEADER] for r in hook.requests] == [alert.alert_id] * 2 + [refused.alert_id]
    letters = [json.loads(line) for line in (tmp_path / "g.dead-letters.jsonl").read_text().splitlines()]
    assert [(d["alert_id"], d["status"], d["source_offset"]) for d in letters] == [
        (refused.alert_id, 404, 2), (None, None, 3)]  # fmt: skip
    assert letters[0]["alert"]["customer_id"] == "gone"
    assert letters[1]["raw"] == "e25vcGU="  # base64 of b"{nope"
    with DeliveryLedger(tmp_path / "g.sqlite3") as ledger:
        assert ledger.get(alert.alert_id).state is DeliveryState.DELIVERED
        assert ledger.get(refused.alert_id).state is DeliveryState.DEAD


def test_an_alert_left_sending_by_a_crash_is_sent_again_with_the_same_key(tmp_path: Path, caplog) -> None:
    alert = _alert()
    with DeliveryLedger(tmp_path / "g.sqlite3") as ledger:
        ledger.mark_sending(alert)  # a previous run died after its POST, before recording the answer
    hook = Hook(200)
    forwarder = _forwarder(tmp_path, hook)
    try:
        assert forwarder.handle(_message(alert)).action == "delivered"
        assert forwarder.handle(_message(alert)).action == "skipped"
    finally:
        forwarder.close()
    assert forwarder.stats.resent_after_crash == 1
    assert [r.headers[IDEMPOTENCY_HEADER] for r in hook.requests] == [alert.alert_id]
    assert "may have arrived" in caplog.text


def test_a_clean_stop_leaves_nothing_in_flight(tmp_path: Path) -> None:
    stop = threading.Event()
    alert = _alert()
    hook = Hook(503)
    stop.set()
    forwarder = _forwarder(tmp_path, hook, stop)
    try:
        assert forwarder.handle(_message(alert)).action == "abandoned"
        assert forwarder.ledger.get(alert.alert_id) is None  # the 503 proves it was not accepted
    finally:
        forwarder.close()


def test_redeliver_sends_each_dead_alert_again_until_delivered(tmp_path: Path) -> None:
    refused, delivered = _alert(customer="gone", threshold=50), _alert(threshold=50)
    forwarder = _forwarder(tmp_path, Hook(404, 200))
    try:
        forwarder.handle(_message(refused))
        forwarder.handle(_message(delivered))
    finally:
        forwarder.close()
    hook = Hook(503, 200)
    again = _forwarder(tmp_path, hook)
    try:
        stats = again.redeliver_dead()
        assert (stats.messages, stats.delivered, stats.attempts) == (1, 1, 2)
        assert again.redeliver_dead().messages == 1  # nothing dead is left: no second try
        assert again.ledger.get(refused.alert_id).state is DeliveryState.DELIVERED
    finally:
        again.close()
    assert [r.headers[IDEMPOTENCY_HEADER] for r in hook.requests] == [refused.alert_id] * 2


def test_a_stopped_redelivery_leaves_the_alert_dead(tmp_path: Path) -> None:
    refused = _alert(customer="gone", threshold=50)
    forwarder = _forwarder(tmp_path, Hook(404))
    try:
        forwarder.handle(_message(refused))
    finally:
        forwarder.close()
    stop = threading.Event()

    def stop_then_fail(request: httpx.Request) -> httpx.Response:
        stop.set()  # SIGTERM arrives during the first attempt
        return httpx.Response(503)

    again = _forwarder(tmp_path, stop_then_fail, stop)
    try:
        assert again.redeliver_dead().messages == 1
        assert again.ledger.get(refused.alert_id).state is DeliveryState.DEAD
    finally:
        again.close()


# -- tail -------------------------------------------------------------------------------------


def test_format_alert_for_people() -> None:
    line = format_alert(_alert(threshold=100, action=ThresholdAction.BLOCK))
    assert line == "2026-11-27 10:15:03Z  acme  2026-11  100%  20,000.13 / 25,000.00 credits  block"
