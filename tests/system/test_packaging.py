"""The package as users install it: a wheel built from this repo, in a clean virtualenv.

`pip install meterstream` is the SDK alone (pydantic, pydantic-settings,
confluent-kafka): a service that only records usage gets tens of MB, not the
worker's engine, Faust or Arrow. The test builds the wheel, installs it without
extras in a new virtualenv (no source tree on its path), records an event there
against the real broker, and reads it back here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from meterstream.schemas.events import UsageEvent
from meterstream.topics import ensure_topics

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
#: What the SDK alone may weigh on disk, site-packages included ("tens of MB, not a GB").
SDK_BUDGET_MB = 80


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)])
    [built] = out.glob("meterstream-*.whl")
    return built


def test_the_wheel_carries_the_ddl_saved_queries_and_price_data(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    ddl = {f"meterstream/sql/{p.name}" for p in (ROOT / "sql").glob("*.sql")}
    queries = {f"meterstream/sql/queries/{p.name}" for p in (ROOT / "sql" / "queries").glob("*.sql")}
    assert ddl and queries and ddl | queries <= names
    assert {"meterstream/data/price_book.yaml", "meterstream/data/plans.yaml"} <= names


def test_the_sdk_installs_alone_and_records_an_event(wheel: Path, tmp_path: Path, kafka_settings):
    venv = tmp_path / "sdk-venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)])

    site_packages = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    installed = {p.name.split("-")[0].lower() for p in site_packages.glob("*.dist-info")}
    assert {"pydantic", "pydantic_settings", "confluent_kafka"} <= installed
    assert not installed & {"faust_streaming", "aiokafka", "chdb", "chdb_core", "pyarrow", "matplotlib", "clickhouse_connect"}
    size_mb = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
    assert size_mb < SDK_BUDGET_MB, f"the SDK venv is {size_mb:.0f} MB"

    topics = ensure_topics(kafka_settings)
    event_id = f"sdk-{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(
        f"""
        from meterstream.producers import MeterClient
        with MeterClient() as meter:
            meter.record_llm_call("sdk-only", "gpt-4o", input_tokens=1200, output_tokens=300, event_id={event_id!r})
        assert (meter.delivered, meter.failed) == (1, 0), (meter.delivered, meter.failed)
        print("recorded")
        """
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "METERSTREAM_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "METERSTREAM_KAFKA__TOPIC_PREFIX": kafka_settings.topic_prefix,
    }
    # Run outside the repo, so nothing of the source tree can be imported instead of the wheel.
    assert "recorded" in _run([str(python), "-c", script], env=env, cwd=tmp_path).stdout
    missing = subprocess.run([str(venv / "bin" / "meterstream"), "usage"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "meterstream[server]" in missing.stderr

    consumer = Consumer({**kafka_settings.confluent_config(), "group.id": f"sdk-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    try:
        metadata = consumer.list_topics(topics.usage.name, timeout=10)
        consumer.assign([TopicPartition(topics.usage.name, p, 0) for p in metadata.topics[topics.usage.name].partitions])
        message = None
        for _ in range(60):  # at most ~30 s
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                break
        assert message is not None and not message.error()
    finally:
        consumer.close()
    event = UsageEvent.model_validate(json.loads(message.value()))
    assert (event.event_id, event.customer_id, event.input_tokens, event.output_tokens) == (event_id, "sdk-only", 1200, 300)
    assert message.key() == b"sdk-only"
