"""The broker stopped and restarted while the SDK is producing: nothing lost, nothing billed twice.

A broker of its own (own state directory and ports), so the shared one is not
disturbed. A producer thread keeps recording events while the broker goes down
for a few seconds and comes back; librdkafka retries within message.timeout.ms
(idempotence keeps retries from duplicating). Every event must end delivered or
reported failed, and the store must hold exactly the delivered ones.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from meterstream.config import LocalServicesSettings
from meterstream.producers import DeliveryFailure, MeterClient
from meterstream.services.kafka import KafkaBroker, bootstrap_servers
from meterstream.storage.queries import run_saved_query

pytestmark = pytest.mark.system


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sdk_survives_a_broker_restart_and_the_store_holds_each_delivered_event_once(
    base_settings, clickhouse_server_dsn, tmp_path
):
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
        pipeline = Pipeline(settings, tmp_path, clickhouse_server_dsn, budgets=None)
        failures: list[DeliveryFailure] = []
        meter = MeterClient(pipeline.kafka, on_delivery_error=failures.append)
        stop = threading.Event()
        recorded: list[str] = []
        periods: set[str] = set()  # a run across the 1st lands in two

        def produce() -> None:
            i = 0
            while not stop.is_set() and i < 20_000:
                event = meter.record_llm_call(
                    f"restart-{i % 5}", "gpt-4o-mini", input_tokens=100 + i % 50, output_tokens=10,
                    event_id=f"r{i}",
                )  # fmt: skip
                recorded.append(event.event_id)
                periods.add(event.period)
                i += 1
                time.sleep(0.001)

        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(2)
        broker.down()  # mid-stream
        before_outage = len(recorded)
        time.sleep(3)
        during_outage = len(recorded) - before_outage
        broker.up()
        time.sleep(2)
        stop.set()
        producer.join(60)
        assert meter.flush(120) == 0, "deliveries still unconfirmed two minutes after the broker returned"
        assert meter.delivered + meter.failed == len(recorded)
        assert during_outage > 100, "the SDK should keep accepting events while the broker is down"
        # The outage is far shorter than message.timeout.ms (120 s): librdkafka retries, nothing fails.
        assert failures == []
        failed_ids = {f.event_id for f in failures}
        delivered = len(recorded) - len(failed_ids)
        assert delivered > 0

        pipeline.start()
        pipeline.wait_processed(delivered, timeout=180)
        totals = [run_saved_query(pipeline.clickhouse, "store_totals", period=p).dicts()[0] for p in periods]
        assert sum(t["rated_rows"] for t in totals) == sum(t["raw_events"] for t in totals) == delivered
        stats = pipeline.worker.stats()
        assert stats["duplicates"] == 0 and stats["dead_letters"] == 0
    finally:
        if pipeline is not None:
            pipeline.stop()
        broker.down()
