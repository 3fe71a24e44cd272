"""The package as users install it: a wheel built from this repo, in a clean virtualenv.

`pip install meterstream` is the SDK alone (pydantic, pydantic-settings,
confluent-kafka): a service that only records usage gets tens of MB, not the
worker's engine, Faust or Arrow. The test builds the wheel once, installs it without
extras in a new virtualenv (no source tree on its path), records an event there
against the real broker, and reads it back here.

With the ``server`` extra the same wheel runs the pipeline from a directory outside
the repo: ``meterstream migrate`` (the DDL from the wheel), ``meterstream worker`` rating
an event into its own database on the shared ClickHouse server, ``meterstream usage``
showing it, ``meterstream serve`` answering over HTTP, and ``meterstream services``
finding Kafka's and ClickHouse's service files in the package (a private ClickHouse
server is started and stopped from them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from meterstream.schemas.events import UsageEvent
from meterstream.topics import ensure_topics
from meterstream.web.tokens import new_token, token_hash

from .conftest import Pipeline, free_port

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
#: What the SDK alone may weigh on disk, site-packages included ("tens of MB, not a GB").
SDK_BUDGET_MB = 80


def _run(args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-4000:])
    return result


#: What is not source: a checkout's build/ (an in-tree build leaves modules since moved or removed
#: there, and the next in-tree build would ship them), virtualenvs, local state, caches.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".local", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis", "artifacts", "results")  # fmt: skip


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once per session from a copy of the source (links kept, as Docker's COPY does)."""
    source = tmp_path_factory.mktemp("source") / "meterstream"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(source)])
    [built] = out.glob("meterstream-*.whl")
    return built


def test_the_wheel_carries_the_ddl_saved_queries_and_price_data(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    ddl = {f"meterstream/sql/{p.name}" for p in (ROOT / "sql").glob("*.sql")}
    queries = {f"meterstream/sql/queries/{p.name}" for p in (ROOT / "sql" / "queries").glob("*.sql")}
    assert ddl and queries and ddl | queries <= names
    assert {"meterstream/data/price_book.yaml", "meterstream/data/plans.yaml"} <= names
    services = {f"meterstream/services/files/{p.relative_to(ROOT / 'services')}"
                for p in (ROOT / "services").rglob("*") if p.is_file()}  # fmt: skip
    assert {"meterstream/services/files/kafka/pom.xml", "meterstream/services/files/clickhouse/users.xml"} <= services
    assert services <= names
    # Every module of the package, and nothing else (no leftover of an earlier build).
    modules = {f"meterstream/{p.relative_to(ROOT / 'meterstream')}" for p in (ROOT / "meterstream").rglob("*.py")}
    assert {name for name in names if name.endswith(".py")} == modules


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
        # record_many checks a batch as columns (orjson; without pyarrow, Python's re does the matching)
        import sys
        from meterstream.schemas import columnar
        assert "pyarrow" not in sys.modules and columnar.pc is None
        with MeterClient() as meter:
            queued = meter.record_many([{{"customer_id": "sdk-only", "event_id": f"{event_id}-{{i}}", "model": "gpt-4o",
                                         "occurred_at": "2026-03-14T09:26:53Z", "input_tokens": i}} for i in range(40)])
        assert queued == 40 and (meter.delivered, meter.failed) == (40, 0), (queued, meter.delivered, meter.failed)
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


# -- the server extra: the pipeline from an installed wheel ----------------------------------------


@pytest.fixture(scope="session")
def server_venv(wheel: Path, tmp_path_factory) -> Path:
    """A clean virtualenv with ``meterstream[server]`` from the wheel.

    Installed by uv (the dev extra's installer), which reads the same wheel metadata as pip
    (the SDK test above installs with pip itself): ~10 s where pip took 75-80 s, most of
    this file's time. The virtualenv has no pip and nothing of the dev environment.
    """
    venv = tmp_path_factory.mktemp("server") / "venv"
    uv = str(Path(sys.executable).with_name("uv"))
    _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)])
    _run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), f"{wheel}[server]"],
         timeout=1500)  # fmt: skip
    return venv


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(10)


@pytest.fixture
def outside(base_settings, clickhouse_server_dsn: str, tmp_path: Path) -> Iterator[Pipeline]:
    """Topics and a database of this test alone (the worker itself is started from the venv)."""
    pipeline = Pipeline(base_settings, tmp_path, clickhouse_server_dsn, budgets=None)
    yield pipeline
    pipeline.stop()


# The first of these installs the server extra (chDB, Arrow, Faust: minutes, even from pip's cache).
@pytest.mark.timeout(1800)
def test_the_wheel_with_the_server_extra_runs_migrate_worker_usage_and_serve(
    server_venv: Path, outside: Pipeline, tmp_path: Path
):
    bin_dir = server_venv / "bin"
    site_packages = Path(_run([str(bin_dir / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())  # fmt: skip
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **outside.env,
           "METERSTREAM_SERVICES__STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    cwd = tmp_path / "elsewhere"  # outside the repo: nothing of the source tree can be imported
    cwd.mkdir()

    def meterstream(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(bin_dir / "meterstream"), *args], capture_output=True, text=True,
                                env=env, cwd=cwd, timeout=timeout)  # fmt: skip
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-4000:])
        return result

    # The package, not a checkout, is what runs.
    where = _run([str(bin_dir / "python"), "-c", "import meterstream; print(meterstream.__file__)"], cwd=cwd, env=env)
    assert where.stdout.strip().startswith(str(site_packages))

    migrated = meterstream("migrate")
    assert "applied 001_events_raw.sql" in migrated.stdout

    worker_log = tmp_path / "worker.log"
    with worker_log.open("ab") as log:
        worker = subprocess.Popen([str(bin_dir / "meterstream"), "worker"], env=env, cwd=cwd, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _wait_http(f"http://127.0.0.1:{outside.web_port}/stats/", worker, worker_log).json()["ready"]:
            assert time.monotonic() < deadline, worker_log.read_text()[-4000:]
            time.sleep(0.5)
        script = textwrap.dedent(
            """
            from meterstream.producers import MeterClient
            with MeterClient() as meter:
                meter.record_llm_call("wheel-co", "gpt-4o", input_tokens=10_000, output_tokens=0, event_id="wheel-1")
            assert (meter.delivered, meter.failed) == (1, 0)
            """
        )
        _run([str(bin_dir / "python"), "-c", script], env=env, cwd=cwd)
        deadline = time.monotonic() + 120
        while (stats := _wait_http(f"http://127.0.0.1:{outside.web_port}/stats/", worker, worker_log).json())["rated"] < 1:
            assert time.monotonic() < deadline, worker_log.read_text()[-4000:]
            time.sleep(0.5)
        assert (stats["messages"], stats["dead_letters"]) == (1, 0)
    finally:
        assert _stop(worker) == 0, worker_log.read_text()[-4000:]

    # gpt-4o input: 0.5 credits per 1K tokens (the shipped price book, read from the wheel).
    [row] = json.loads(meterstream("usage", "top-customers", "--json").stdout)
    assert (row["customer_id"], int(row["events"]), Decimal(row["usage_credits"])) == ("wheel-co", 1, Decimal(5))

    token = new_token()
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(f'"{token_hash(token)}": wheel-co\n')
    port = free_port()
    serve_log = tmp_path / "serve.log"
    with serve_log.open("ab") as log:
        server = subprocess.Popen([str(bin_dir / "meterstream"), "serve", "--port", str(port)],
                                  env={**env, "METERSTREAM_WEB__TOKENS_FILE": str(tokens_file)}, cwd=cwd, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", server, serve_log, timeout=60)
        headers = {"Authorization": f"Bearer {token}"}
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()  # web/static/ from the wheel
        usage = httpx.get(f"http://127.0.0.1:{port}/api/v1/customers/wheel-co/usage", headers=headers, timeout=30)
        assert usage.status_code == 200, usage.text
        assert usage.json()["totals"]["events"] == 1
    finally:
        _stop(server)


@pytest.mark.timeout(1800)
def test_services_run_from_the_files_in_the_wheel(server_venv: Path, tmp_path: Path):
    """`meterstream services` finds Kafka's pom and ClickHouse's config/users in the installed package;
    a private ClickHouse server (free ports, own state dir) starts from them and stops again."""
    bin_dir = server_venv / "bin"
    http_port, tcp_port = free_port(), free_port()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "METERSTREAM_SERVICES__STATE_DIR": str(tmp_path / "state"),
           "METERSTREAM_SERVICES__CLICKHOUSE_HTTP_PORT": str(http_port),
           "METERSTREAM_SERVICES__CLICKHOUSE_TCP_PORT": str(tcp_port)}  # fmt: skip
    found = _run([str(bin_dir / "python"), "-c", textwrap.dedent(
        """
        from meterstream.config import LocalServicesSettings
        from meterstream.services.clickhouse import ClickHouseServer
        from meterstream.services.kafka import KafkaBroker
        broker, server = KafkaBroker(LocalServicesSettings()), ClickHouseServer(LocalServicesSettings())
        for path in (broker.pom, broker.log_config, server.template, server.users_xml):
            assert path.is_file(), path
            print(path)
        """)], env=env, cwd=tmp_path)  # fmt: skip
    assert "site-packages/meterstream/services/files/kafka/pom.xml" in found.stdout

    def meterstream(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir / "meterstream"), "services", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)  # fmt: skip

    up = meterstream("up", "clickhouse")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        answer = httpx.get(f"http://127.0.0.1:{http_port}/", params={"query": "SELECT 1"},
                           auth=("meterstream", "meterstream"), timeout=10)  # fmt: skip
        assert answer.status_code == 200 and answer.text.strip() == "1"
    finally:
        down = meterstream("down", "clickhouse")
    assert down.returncode == 0, down.stdout + down.stderr
