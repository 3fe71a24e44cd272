"""The alert consumers on the real broker: ``alerts forward`` to a local webhook, ``alerts tail``.

No worker is needed: BudgetAlert JSON is produced straight onto a unique-prefix
``budget-alerts`` topic (keyed by customer, as the worker does), with one alert
twice and one unreadable message. The commands run as subprocesses, as in
production; the webhook is an ``http.server`` in a thread on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from meterstream.alerting.webhook import verify_signature
from meterstream.config import KafkaSettings
from meterstream.schemas.records import BudgetAlert, ThresholdAction
from meterstream.topics import ensure_topics

pytestmark = pytest.mark.system

SECRET = "whsec-integration-3e9b51"
PERIOD = datetime.now(timezone.utc).strftime("%Y-%m")


def _alert(customer: str, threshold: int, action: ThresholdAction = ThresholdAction.ALERT) -> BudgetAlert:
    budget = Decimal("1000")
    return BudgetAlert(
        alert_id=BudgetAlert.make_id(customer, PERIOD, threshold), customer_id=customer, period=PERIOD,
        threshold_percent=threshold, budget_credits=budget, spent_credits=budget * threshold / 100 + Decimal("0.5"),
        crossed_at=datetime.now(timezone.utc), triggering_event_id=f"evt-{customer}-{threshold}", action=action,
    )  # fmt: skip


class Webhook:
    """Fails each alert's first two attempts with 503, then accepts; refuses customer "gone" with 410.

    Customer "slow": the first request is held until ``release`` is set (to kill the forwarder mid-POST);
    "gone" is accepted once ``accept_gone`` is set (the receiver fixed, for ``alerts redeliver``).
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.slow_received = threading.Event()
        self.accept_gone = False
        self.release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                customer = json.loads(body)["customer_id"]
                with hook.lock:
                    seen = sum(1 for r in hook.requests if r["body"] == body)
                    if customer == "gone":
                        status = 200 if hook.accept_gone else 410
                    elif customer == "slow":
                        status = 200
                    else:
                        status = 503 if seen < 2 else 200
                    hook.requests.append({"headers": dict(self.headers), "body": body, "status": status})
                if customer == "slow" and seen == 0:
                    hook.slow_received.set()
                    hook.release.wait(30)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the forwarder was killed while waiting for this answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/meterstream?token=t0k3n"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def by_alert(self) -> dict[str, list[int]]:
        statuses: dict[str, list[int]] = defaultdict(list)
        with self.lock:
            for request in self.requests:
                statuses[json.loads(request["body"])["alert_id"]].append(request["status"])
        return dict(statuses)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    hook.thread.start()
    yield hook
    hook.release.set()
    hook.server.shutdown()
    hook.server.server_close()
    hook.thread.join(timeout=10)


@pytest.fixture
def alert_topic(kafka_settings: KafkaSettings) -> Iterator[str]:
    topics = ensure_topics(kafka_settings)
    yield topics.budget_alerts.name
    admin = AdminClient(kafka_settings.confluent_config())
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(kafka_settings.topic_prefix)]
    try:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            future.result(timeout=30)
    except Exception:
        pass  # leftover test topics are harmless


def _produce(kafka: KafkaSettings, topic: str, messages: list[tuple[str, bytes]]) -> None:
    producer = Producer(kafka.producer_config())
    failures: list[str] = []
    for key, value in messages:
        producer.produce(topic, key=key.encode(), value=value,
                         on_delivery=lambda err, msg: failures.append(str(err)) if err else None)  # fmt: skip
    assert producer.flush(30) == 0 and not failures


def _env(kafka: KafkaSettings, state_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")},
        "METERSTREAM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "METERSTREAM_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "METERSTREAM_ALERT_FORWARDER__STATE_DIR": str(state_dir),
        "METERSTREAM_ALERT_FORWARDER__BACKOFF_INITIAL": "0.05",
        "METERSTREAM_ALERT_FORWARDER__BACKOFF_MAX": "0.2",
        "METERSTREAM_ALERT_FORWARDER__MAX_ATTEMPTS": "5",
        # A forwarder restarted after SIGKILL waits this long for its dead predecessor to leave the group.
        "METERSTREAM_ALERT_FORWARDER__SESSION_TIMEOUT": "6",
        "HOOK_SECRET": SECRET,
        "COLUMNS": "200",
        **extra,
    }


def _cli(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterstream.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _popen(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "meterstream.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_stderr(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> list[str]:
    """Read the process's stderr until a line contains ``needle`` (bounded); the rest is drained in a thread."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    while True:
        line = lines.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"exited before {needle!r}: {''.join(seen)}")
        seen.append(line)
        if needle in line:
            return seen


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


# -- forward ----------------------------------------------------------------------------------


def _forward(env: dict[str, str], cwd: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _cli(env, cwd, "alerts", "forward", "--url", url, "--secret-env", "HOOK_SECRET", *args)


def test_forward_posts_each_alert_once_with_retries_signature_and_a_ledger(
    kafka_settings, alert_topic, webhook, tmp_path
):
    acme50, acme80 = _alert("acme", 50), _alert("acme", 80)
    globex100, gone50 = _alert("globex", 100, ThresholdAction.BLOCK), _alert("gone", 50)
    sent = {a.alert_id: a for a in (acme50, acme80, globex100, gone50)}
    _produce(kafka_settings, alert_topic, [
        ("acme", acme50.model_dump_json().encode()),
        ("acme", acme80.model_dump_json().encode()),
        ("junk", b"{not an alert"),
        ("globex", globex100.model_dump_json().encode()),
        ("acme", acme50.model_dump_json().encode()),  # the same alert again (a recovering worker's repeat)
        ("gone", gone50.model_dump_json().encode()),
    ])  # fmt: skip
    env = _env(kafka_settings, tmp_path / "state")
    group = f"fwd-{uuid.uuid4().hex[:8]}"

    run = _forward(env, tmp_path, webhook.url, "--group", group, "--max", "6", "--timeout", "90")
    assert run.returncode == 0, run.stderr
    statuses = webhook.by_alert()
    # Each deliverable alert: two 503s, then exactly one accepted POST; the 410 is not retried.
    assert statuses == {acme50.alert_id: [503, 503, 200], acme80.alert_id: [503, 503, 200],
                        globex100.alert_id: [503, 503, 200], gone50.alert_id: [410]}  # fmt: skip
    for request in webhook.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        alert = BudgetAlert.model_validate_json(request["body"])
        assert alert == sent[alert.alert_id]
        assert headers["idempotency-key"] == alert.alert_id
        assert verify_signature(SECRET, request["body"], headers["x-meterstream-signature"])
        assert headers["content-type"] == "application/json"
    lines = run.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["dead-lettered", "delivered", "delivered", "delivered",
                                                          "skipped", "unreadable"]  # fmt: skip
    assert "handled 6: 3 delivered, 1 skipped as already handled, 2 dead-lettered" in run.stderr
    for secret_text in (SECRET, "t0k3n"):
        assert secret_text not in run.stdout + run.stderr
    letters = [json.loads(x) for x in (tmp_path / "state" / f"{group}.dead-letters.jsonl").read_text().splitlines()]
    assert sorted((d["alert_id"] or "", d["status"] or 0) for d in letters) == [("", 0), (gone50.alert_id, 410)]

    # A restart with the same group: offsets were committed, nothing is read or posted again.
    before = len(webhook.requests)
    again = _forward(env, tmp_path, webhook.url, "--group", group, "--timeout", "4")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "" and len(webhook.requests) == before

    # Offsets lost (group deleted): every message is re-read, and the ledger still posts nothing.
    admin = AdminClient(kafka_settings.confluent_config())
    for future in admin.delete_consumer_groups([group], request_timeout=30).values():
        future.result(timeout=30)
    reread = _forward(env, tmp_path, webhook.url, "--group", group, "--max", "6", "--timeout", "60")
    assert reread.returncode == 0, reread.stderr
    assert len(webhook.requests) == before
    assert sorted(line.split()[0] for line in reread.stdout.splitlines()) == ["skipped"] * 5 + ["unreadable"]

    # The receiver is fixed: `alerts redeliver` sends the dead-lettered alert once, and only once.
    webhook.accept_gone = True
    for _ in range(2):
        redelivered = _cli(env, tmp_path, "alerts", "redeliver", "--url", webhook.url, "--secret-env", "HOOK_SECRET",
                           "--group", group)  # fmt: skip
        assert redelivered.returncode == 0, redelivered.stderr
    assert webhook.by_alert()[gone50.alert_id] == [410, 200]
    assert len(webhook.requests) == before + 1


def test_a_forwarder_killed_mid_post_resends_with_the_same_key_and_only_then(
    kafka_settings, alert_topic, webhook, tmp_path
):
    """The one documented window: death after the receiver got the POST, before the ledger recorded it."""
    slow = _alert("slow", 80)
    _produce(kafka_settings, alert_topic, [("slow", slow.model_dump_json().encode())])
    env = _env(kafka_settings, tmp_path / "state")
    group = f"fwd-{uuid.uuid4().hex[:8]}"
    proc = _popen(env, tmp_path, "alerts", "forward", "--url", webhook.url, "--group", group, "--timeout", "60")
    try:
        assert webhook.slow_received.wait(60), "the forwarder never POSTed"
        proc.kill()  # SIGKILL: no handler runs, the ledger still says "sending"
        proc.wait(timeout=10)
    finally:
        _stop(proc)
        webhook.release.set()

    resumed = _cli(env, tmp_path, "alerts", "forward", "--url", webhook.url, "--group", group,
                   "--max", "1", "--timeout", "60")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "may have arrived" in resumed.stderr and "1 resent after a crash" in resumed.stderr
    keys = [r["headers"]["Idempotency-Key"] for r in webhook.requests]
    assert keys == [slow.alert_id, slow.alert_id]  # the receiver can drop the repeat by its key

    admin = AdminClient(kafka_settings.confluent_config())
    for future in admin.delete_consumer_groups([group], request_timeout=30).values():
        future.result(timeout=30)
    third = _cli(env, tmp_path, "alerts", "forward", "--url", webhook.url, "--group", group,
                 "--max", "1", "--timeout", "60")  # fmt: skip
    assert third.returncode == 0, third.stderr
    assert third.stdout.startswith("skipped") and len(webhook.requests) == 2


def test_forward_refuses_a_missing_secret_and_a_bad_url(kafka_settings, alert_topic, tmp_path):
    env = _env(kafka_settings, tmp_path / "state")
    env.pop("HOOK_SECRET")
    run = _cli(env, tmp_path, "alerts", "forward", "--url", "http://127.0.0.1:9/x", "--secret-env", "HOOK_SECRET")
    assert run.returncode == 1 and "HOOK_SECRET is not set" in run.stderr
    run = _cli(env, tmp_path, "alerts", "forward", "--url", "ftp://example.com/t0k3n")
    assert run.returncode == 1 and "must start with http:// or https://" in run.stderr and "t0k3n" not in run.stderr


# -- tail -------------------------------------------------------------------------------------


def test_tail_prints_alerts_from_the_beginning_once_each(kafka_settings, alert_topic, tmp_path):
    alerts = [_alert("acme", 50), _alert("acme", 80), _alert("globex", 100, ThresholdAction.BLOCK)]
    _produce(kafka_settings, alert_topic, [
        *((a.customer_id, a.model_dump_json().encode()) for a in alerts),
        ("junk", b"{not an alert"),
        ("acme", alerts[0].model_dump_json().encode()),
    ])  # fmt: skip
    env = _env(kafka_settings, tmp_path / "state")

    run = _cli(env, tmp_path, "alerts", "tail", "--json", "--from-beginning", "--max", "3", "--timeout", "60")
    assert run.returncode == 0, run.stderr
    printed = [BudgetAlert.model_validate_json(line) for line in run.stdout.splitlines()]
    assert sorted(printed, key=lambda a: a.alert_id) == sorted(alerts, key=lambda a: a.alert_id)

    # Nothing more to show: the repeat and the unreadable message are not alerts; --timeout ends it (exit 2).
    run = _cli(env, tmp_path, "alerts", "tail", "--json", "--from-beginning", "--max", "4", "--timeout", "4")
    assert run.returncode == 2 and len(run.stdout.splitlines()) == 3
    assert "timed out after 4 s with 3 of 4 alerts" in run.stderr and "skipped" in run.stderr

    run = _cli(env, tmp_path, "alerts", "tail", "--from-beginning", "--customer", "acme", "--max", "2",
               "--timeout", "60")  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = sorted(run.stdout.splitlines(), key=lambda line: "80%" in line)
    assert [line.split()[2:5] for line in lines] == [["acme", PERIOD, "50%"], ["acme", PERIOD, "80%"]]
    assert lines[1].endswith("800.50 / 1,000.00 credits  alert")


def test_tail_starts_at_the_end_and_stops_cleanly_on_ctrl_c(kafka_settings, alert_topic, tmp_path):
    old, new = _alert("acme", 50), _alert("acme", 80)
    _produce(kafka_settings, alert_topic, [("acme", old.model_dump_json().encode())])
    env = _env(kafka_settings, tmp_path / "state")

    proc = _popen(env, tmp_path, "alerts", "tail", "--json", "--max", "1", "--timeout", "60")
    try:
        _wait_for_stderr(proc, "following")
        _produce(kafka_settings, alert_topic, [("acme", new.model_dump_json().encode())])
        stdout, _ = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 0
    assert [BudgetAlert.model_validate_json(line).alert_id for line in stdout.splitlines()] == [new.alert_id]

    proc = _popen(env, tmp_path, "alerts", "tail")
    try:
        seen = _wait_for_stderr(proc, "following")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        rest = proc.stdout.read()  # type: ignore[union-attr]
    finally:
        _stop(proc)
    assert proc.returncode == 0
    assert rest == "" and "Traceback" not in "".join(seen)
