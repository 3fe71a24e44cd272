"""Kafka with SASL/SCRAM: an unauthenticated producer is refused; the SDK and the worker authenticate.

A broker of its own with a SASL_PLAINTEXT listener (SCRAM-SHA-512) beside the
PLAINTEXT one; the SCRAM user is created through the admin API at start-up.
"""

from __future__ import annotations

import socket

import pytest
from pydantic import SecretStr

from meterstream.clock import current_period, utc_now
from meterstream.config import KafkaSettings, LocalServicesSettings
from meterstream.producers import DeliveryFailure, MeterClient
from meterstream.services.kafka import KafkaBroker
from meterstream.storage.queries import run_saved_query

pytestmark = pytest.mark.system
PASSWORD = "s3cret-scram-password"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sasl_scram_refuses_the_unauthenticated_and_carries_the_pipeline(base_settings, clickhouse_server_dsn, tmp_path):
    from tests.system.conftest import Pipeline

    services = LocalServicesSettings(
        state_dir=tmp_path / "state", kafka_port=_free_port(), kafka_controller_port=_free_port(),
        kafka_sasl_port=_free_port(), kafka_sasl_password=SecretStr(PASSWORD), start_timeout=120,
    )  # fmt: skip
    broker = KafkaBroker(services)
    pipeline = None
    try:
        broker.up()
        sasl_address = f"127.0.0.1:{services.kafka_sasl_port}"
        anonymous = KafkaSettings(bootstrap_servers=sasl_address, topic_prefix="sec.")
        refused: list[DeliveryFailure] = []
        with MeterClient(anonymous, on_delivery_error=refused.append, producer_config={"message.timeout.ms": 3000}) as m:
            m.record_llm_call("intruder", "gpt-4o", input_tokens=1, output_tokens=1)
        assert m.delivered == 0 and len(refused) == 1

        wrong = KafkaSettings(bootstrap_servers=sasl_address, topic_prefix="sec.", security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="SCRAM-SHA-512", sasl_username="meterstream",
                              sasl_password=SecretStr("wrong"))  # fmt: skip
        rejected: list[DeliveryFailure] = []
        with MeterClient(wrong, on_delivery_error=rejected.append, producer_config={"message.timeout.ms": 3000}) as m:
            m.record_llm_call("intruder", "gpt-4o", input_tokens=1, output_tokens=1)
        assert m.delivered == 0 and len(rejected) == 1
        assert "wrong" not in repr(wrong) and "wrong" not in str(wrong.model_dump())

        secure = wrong.model_copy(update={"sasl_password": SecretStr(PASSWORD)})
        settings = base_settings.model_copy(update={"kafka": secure})
        pipeline = Pipeline(settings, tmp_path, clickhouse_server_dsn, budgets=None)
        pipeline.env.update({
            "METERSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "METERSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "METERSTREAM_KAFKA__SASL_USERNAME": "meterstream",
            "METERSTREAM_KAFKA__SASL_PASSWORD": PASSWORD,
        })  # fmt: skip
        pipeline.worker.env.update(pipeline.env)
        pipeline.start()
        now = utc_now()  # one instant for every event: one period, whatever the date
        with MeterClient(pipeline.kafka) as meter:
            for i in range(20):
                meter.record_llm_call("tenant", "gpt-4o-mini", input_tokens=1000, output_tokens=10, event_id=f"s{i}",
                                      occurred_at=now)  # fmt: skip
        assert meter.failed == 0
        pipeline.wait_processed(20)
        period = current_period(lambda: now)
        assert run_saved_query(pipeline.clickhouse, "store_totals", period=period).dicts()[0]["rated_rows"] == 20
        assert PASSWORD not in pipeline.worker.log_path.read_text()
    finally:
        if pipeline is not None:
            pipeline.stop()
        broker.down()
