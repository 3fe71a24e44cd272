"""A 60 s broker outage: the worker stays up, logs a few lines, says when the broker is back, and
``/stats/`` shows the outage. A broker of its own (own state directory and ports): the shared
one is never stopped."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone

import pytest

from meterstream.config import LocalServicesSettings
from meterstream.producers import MeterClient
from meterstream.services.kafka import KafkaBroker, bootstrap_servers

pytestmark = pytest.mark.system

OUTAGE_SECONDS = float(os.environ.get("METERSTREAM_TEST_OUTAGE_SECONDS", "60"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_broker_outage_is_quiet_reported_and_survived(base_settings, clickhouse_server_dsn, tmp_path):
    from tests.system.conftest import Pipeline

    services = LocalServicesSettings(
        state_dir=tmp_path / "state", kafka_port=_free_port(), kafka_controller_port=_free_port(), start_timeout=120
    )
    broker = KafkaBroker(services)
    pipeline = None
    try:
        broker.up()
        settings = base_settings.model_copy(
            update={"kafka": base_settings.kafka.model_copy(update={"bootstrap_servers": bootstrap_servers(services)})}
        )
        pipeline = Pipeline(settings, tmp_path, clickhouse_server_dsn, budgets=None).start()
        now = datetime.now(timezone.utc)
        with MeterClient(pipeline.kafka) as meter:
            for i in range(20):
                meter.record_llm_call("outage", "gpt-4o-mini", input_tokens=100, output_tokens=10, event_id=f"b{i}", occurred_at=now)
        pipeline.wait_processed(20)
        log_path = tmp_path / "worker.log"
        lines_before = len(log_path.read_text(errors="replace").splitlines())

        broker.down()
        down_at = time.monotonic()
        def broker_is(reachable: bool):
            stats = pipeline.worker.stats(timeout=10)
            return stats if stats["broker"]["reachable"] is reachable else None

        stats = _wait(lambda: broker_is(False), 60, "the outage")
        assert stats["broker"]["outages"] == 1
        time.sleep(max(OUTAGE_SECONDS - (time.monotonic() - down_at), 0))
        assert pipeline.worker.process is not None and pipeline.worker.process.poll() is None
        lines_during = len(log_path.read_text(errors="replace").splitlines()) - lines_before
        outage = time.monotonic() - down_at
        broker.up()

        stats = _wait(lambda: broker_is(True), 120, "the broker back")
        assert stats["broker"]["outages"] == 1 and stats["broker"]["last_outage_seconds"] >= OUTAGE_SECONDS - 5
        log = log_path.read_text(errors="replace")
        assert "broker unreachable" in log and "broker is back after" in log
        # "At most a few lines per second": the flood this replaces was ~2 lines per millisecond.
        per_minute = lines_during / outage * 60
        print(f"outage {outage:.0f} s: {lines_during} worker log lines ({per_minute:.0f} per minute)")
        assert lines_during <= 3 * outage, log.splitlines()[lines_before:][:50]

        with MeterClient(pipeline.kafka) as meter:
            for i in range(20, 40):
                meter.record_llm_call("outage", "gpt-4o-mini", input_tokens=100, output_tokens=10, event_id=f"b{i}", occurred_at=now)
        pipeline.wait_processed(20, timeout=180)
    finally:
        if pipeline is not None:
            pipeline.worker.stop()
        broker.down()
