"""No message stops the pipeline: hostile values from a non-Python producer (kcat) are dead-lettered.

Every kind is sent with kcat (installed by ``make test``, like chromium), the way an
operator or a foreign service would: values up to the broker's message limit, deep
nesting, binary, invalid UTF-8, nulls, huge keys, huge numbers, thousands of fields,
far-future timestamps, and valid events among them. The worker must never stop (same
process, no restart), and every message must be accounted for: stored, counted as a
duplicate, or on the dead-letter topic with a reason, its size and its digest (the raw
bytes cut to what fits on the broker).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from meterstream.schemas.events import UsageEvent
from meterstream.schemas.records import DEAD_LETTER_RAW_LIMIT
from meterstream.storage.queries import run_saved_query

pytestmark = pytest.mark.system


def _set_max_message_bytes(admin: AdminClient, topic: str, value: str) -> None:
    """One topic setting changed (incrementally: alter_configs is deprecated and replaced the whole set)."""
    entry = ConfigEntry("max.message.bytes", value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource("topic", topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)

NOW = datetime.now(timezone.utc).replace(microsecond=0)
PERIOD = NOW.strftime("%Y-%m")


def _valid(customer: str, i: int) -> bytes:
    return UsageEvent(
        event_id=f"{customer}-{i}", customer_id=customer, occurred_at=NOW - timedelta(seconds=i),
        model="gpt-4o", input_tokens=100 + i, output_tokens=10,
    ).model_dump_json().encode()  # fmt: skip


def _hostile() -> dict[str, bytes]:
    head = b'{"event_id":"big","customer_id":"fuzz","occurred_at":"' + NOW.isoformat().encode() + b'","pad":"'
    return {
        "oversized 1 MB": head + b"x" * 1_000_000 + b'"}',
        "oversized near the broker limit": head + b"y" * 1_040_000 + b'"}',
        "oversized 300 KB": head + b"z" * 300_000 + b'"}',
        "deeply nested arrays": b"[" * 200_000 + b"]" * 200_000,
        "deeply nested objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "binary": bytes(range(256)) * 64,
        "invalid utf-8": b'{"event_id":"\xff\xfe","customer_id":"\xc3\x28"}',
        "nul bytes": b'{"event_id":"a\x00b","customer_id":"c"}',
        "huge number": b'{"event_id":"n","customer_id":"c","occurred_at":"2026-01-01T00:00:00Z","input_tokens":1'
        + b"0" * 5000
        + b"}",
        "thousands of fields": b"{" + b",".join(b'"f%d":%d' % (i, i) for i in range(20_000)) + b"}",
        "long string field": b'{"event_id":"' + b"e" * 60_000 + b'","customer_id":"c"}',
        "far future": b'{"event_id":"ff","customer_id":"c","occurred_at":"2099-01-01T00:00:00Z","model":"gpt-4o"}',
        "json scalar": b"42",
        "json null": b"null",
        "nested arrays within the size limit": b"[" * 30_000 + b"]" * 30_000,
        "nested objects within the size limit": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    }


def _kcat(pipeline, topic: str, partition: int, files: list[Path], *extra: str) -> None:
    subprocess.run(
        ["kcat", "-P", "-b", pipeline.kafka.bootstrap_servers, "-t", topic, "-p", str(partition),
         "-X", "message.max.bytes=2000000", *extra, *[str(f) for f in files]],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _kcat_installed() -> None:
    if shutil.which("kcat") is None:  # make test installs it; a missing tool is a failed run
        pytest.fail("kcat is not installed: run `make kcat` (make test does)", pytrace=False)


def test_hostile_messages_from_kcat_are_dead_lettered_and_the_worker_never_stops(pipeline_factory, tmp_path):
    pipeline = pipeline_factory()
    pid = pipeline.worker.stats()["pid"]
    usage = pipeline.topics.usage.name
    hostile = _hostile()
    files: dict[str, Path] = {}
    for n, (kind, value) in enumerate(hostile.items()):
        files[kind] = tmp_path / f"h{n}.bin"
        files[kind].write_bytes(value)
    valid = [_valid("fuzz-ok", i) for i in range(40)]
    valid_files = []
    for i, value in enumerate(valid):
        valid_files.append(tmp_path / f"v{i}.json")
        valid_files[-1].write_bytes(value)

    # Hostile values on every partition, interleaved with valid events and resends.
    sent = Counter()
    for partition in range(pipeline.kafka.partitions):
        _kcat(pipeline, usage, partition, valid_files[:10])
        _kcat(pipeline, usage, partition, list(files.values()))
        _kcat(pipeline, usage, partition, [files["json null"]], "-k", "k" * 100_000)  # a 100 KB key
        sent.update({kind: 1 for kind in hostile})
        sent.update({"100 KB key": 1})
    # kcat sends no empty message, in any mode: the empty and the NULL value come from confluent-kafka.
    from confluent_kafka import Producer

    producer = Producer(pipeline.kafka.producer_config())
    for partition in range(pipeline.kafka.partitions):
        producer.produce(usage, value=b"", partition=partition)
        producer.produce(usage, value=None, partition=partition)
    assert producer.flush(30) == 0
    n = pipeline.kafka.partitions
    sent.update({"empty (confluent-kafka)": n, "null value (confluent-kafka)": n})
    _kcat(pipeline, usage, 0, valid_files[10:])
    _kcat(pipeline, usage, 1, valid_files[:5])  # resent: counted once
    sent.update({"valid": 10 * pipeline.kafka.partitions + 30, "resent valid": 5})
    total = sum(sent.values())

    stats = pipeline.wait_processed(total, timeout=float(__import__("os").environ.get("FUZZ_WAIT", "300")))
    assert stats["pid"] == pid, "the worker restarted"
    assert pipeline.worker.process is not None and pipeline.worker.process.poll() is None
    rejected = total - sent["valid"] - sent["resent valid"]
    assert stats["messages"] == total
    assert stats["dead_letters"] == rejected
    assert stats["rated"] == 40
    assert stats["duplicates"] == sent["valid"] + sent["resent valid"] - 40
    assert stats["rated"] + stats["duplicates"] + stats["dead_letters"] == total  # every message accounted for
    assert stats["held"] == {}

    letters = [json.loads(m.value()) for m in pipeline.read_topic(pipeline.topics.dead_letter.name, rejected, timeout=60)]
    assert len(letters) == rejected
    by_digest = Counter(letter["sha256"] for letter in letters)
    for kind, value in hostile.items():
        assert by_digest[hashlib.sha256(value).hexdigest()] >= pipeline.kafka.partitions, kind
    for letter in letters:
        raw = base64.b64decode(letter["raw"])
        assert letter["reason"] and letter["source_topic"] == usage and letter["source_offset"] >= 0
        assert len(raw) <= DEAD_LETTER_RAW_LIMIT
        assert letter["truncated"] == (letter["size"] > DEAD_LETTER_RAW_LIMIT)
        if not letter["truncated"]:
            assert hashlib.sha256(raw).hexdigest() == letter["sha256"] and len(raw) == letter["size"]
    # One dead letter per rejected message, at its own place.
    places = {(letter["source_partition"], letter["source_offset"]) for letter in letters}
    assert len(places) == rejected

    rows = run_saved_query(pipeline.clickhouse, "month_to_date", period=PERIOD, customer="fuzz-ok").dicts()
    assert [row["events"] for row in rows] == [40]
    print(f"fuzz: sent by kind {dict(sent)}; dead-lettered {len(letters)}; stored 40; worker restarts 0")


def test_a_dead_letter_the_broker_refuses_holds_only_its_partition(pipeline_factory, tmp_path):
    """The dead-letter topic takes ~300-byte messages: a letter is refused whole and compact; the
    message's partition is held at its offset, the other partitions go on."""
    pipeline = pipeline_factory(start=False)
    admin = AdminClient(pipeline.kafka.confluent_config())
    _set_max_message_bytes(admin, pipeline.topics.dead_letter.name, "300")
    pipeline.start()
    usage = pipeline.topics.usage.name
    poison = tmp_path / "poison.bin"
    poison.write_bytes(b"{not json at all" + b"!" * 2000)
    before = [tmp_path / f"b{i}.json" for i in range(3)]
    after = [tmp_path / f"a{i}.json" for i in range(3)]
    for i, f in enumerate(before):
        f.write_bytes(_valid("held-0", i))
    for i, f in enumerate(after):
        f.write_bytes(_valid("held-0", 10 + i))
    _kcat(pipeline, usage, 0, [*before, poison, *after])
    others = []
    for partition in (1, 2):
        for i in range(5):
            f = tmp_path / f"o{partition}-{i}.json"
            f.write_bytes(_valid(f"other-{partition}", i))
            others.append(f)
        _kcat(pipeline, usage, partition, others[-5:])

    stats = pipeline.worker.wait_for(3 + 1 + 3 + 10, timeout=120)
    assert stats["held"] == {f"{usage}:0": 3}
    assert stats["unpublishable_dead_letters"] == 1
    assert pipeline.worker.process is not None and pipeline.worker.process.poll() is None
    log = pipeline.worker.log_tail(200)
    assert f"partition {usage}:0 held at offset 3" in log and "meterstream dlq skip" in log
    for partition in (1, 2):
        rows = run_saved_query(pipeline.clickhouse, "month_to_date", period=PERIOD, customer=f"other-{partition}").dicts()
        assert [row["events"] for row in rows] == [5]

    # The escape hatch. Refused while the worker is in the group:
    cli = [sys.executable, "-m", "meterstream.cli", "dlq", "skip", f"{usage}:0:3", "--reason", "poison", "--json"]
    env = {**os.environ, **pipeline.env}
    refused = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "active member" in refused.stderr + refused.stdout
    pipeline.worker.stop()
    # Refused for a message the group has not stopped at:
    wrong = subprocess.run([*cli[:5], f"{usage}:0:4", *cli[6:]], env=env, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "at offset 3" in wrong.stderr + wrong.stdout
    # The operator lets the dead-letter topic take letters again, then skips the message.
    _set_max_message_bytes(admin, pipeline.topics.dead_letter.name, "1048588")
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["skipped"] == f"{usage}:0@3" and result["committed"] == 4
    letters = [json.loads(m.value()) for m in pipeline.read_topic(pipeline.topics.dead_letter.name, 1)]
    assert len(letters) == 1
    assert letters[0]["reason"].startswith("skipped by operator") and letters[0]["reason"].endswith(": poison")
    assert (letters[0]["source_partition"], letters[0]["source_offset"]) == (0, 3)
    assert base64.b64decode(letters[0]["raw"]) == poison.read_bytes()

    pipeline.worker.start(ready_timeout=120)
    deadline = time.monotonic() + 120
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = run_saved_query(pipeline.clickhouse, "month_to_date", period=PERIOD, customer="held-0").dicts()
        if rows and rows[0]["events"] == 6:
            break
        time.sleep(1)
    assert [row["events"] for row in rows] == [6]
    assert pipeline.worker.stats()["held"] == {}
