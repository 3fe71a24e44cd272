"""Settings: one object per concern, validated at start-up.

Every value comes from the environment (prefix ``METERSTREAM_``, nested with
``__``) or a ``.env`` file, never from module constants. ``config.example.env``
at the repository root comments every key.

Examples::

    METERSTREAM_KAFKA__BOOTSTRAP_SERVERS=broker1:9092,broker2:9092
    METERSTREAM_CLICKHOUSE__DSN=http://default:secret@clickhouse:8123/meterstream
    METERSTREAM_WORKER__BATCH_SIZE=2000
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where local, git-ignored state lives (broker data, chDB files, logs).
DEFAULT_STATE_DIR = Path(".local")


#: What every meterstream producer guarantees: idempotent, acknowledged by all replicas, and
#: keys partitioned with murmur2 (the Java client's and aiokafka's default, not librdkafka's
#: CRC32): the worker's side topics come from aiokafka, and one key must land on one
#: partition whoever produces it, or a compacted topic holds two "latest" values for it.
PRODUCER_GUARANTEES: dict[str, str | bool] = {
    "enable.idempotence": True,
    "acks": "all",
    "partitioner": "murmur2_random",
}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """How clients reach Kafka. Security settings are optional (SASL/TLS)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    #: Prefix for every topic name, so tests and tenants can share a broker.
    topic_prefix: str = ""
    #: Partitions for topics that meterstream creates; keyed by customer.
    partitions: int = Field(default=3, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def producer_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka producer properties every meterstream producer uses (see PRODUCER_GUARANTEES)."""
        return {**self.confluent_config(), **PRODUCER_GUARANTEES}

    def confluent_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka properties for confluent-kafka clients (secrets unwrapped here only)."""
        conf: dict[str, str | int | float | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_cafile:
            conf["ssl.ca.location"] = str(self.ssl_cafile)
        return conf


class ClickHouseSettings(_Section):
    """Where rated usage is stored: a ClickHouse server every process shares.

    The default is the local server of ``meterstream services up`` (its pipeline
    user, services/clickhouse/users.xml); production sets
    ``http(s)://user:password@host:8123/`` for its own server or Cloud.
    ``chdb://PATH`` runs the engine inside one process (one process per data
    directory): only for single-process tools such as ``bench/invoice.py``.
    """

    dsn: SecretStr = SecretStr("http://meterstream:meterstream@127.0.0.1:8123/")
    #: The reporting commands (``usage …``, ``audit``, ``margin``, ``profile``, ``advise``,
    #: ``invoice``, ``rerate``, ``alerts list``) connect with this DSN when set: a read-only
    #: user such as the shipped ``cs_reader`` (role ``customer_success``,
    #: services/clickhouse/users.xml). Unset: they use ``dsn``.
    cs_dsn: SecretStr | None = None
    database: str = "meterstream"
    #: Seconds between insert retries while the store is unavailable (doubles, capped).
    retry_backoff_initial: float = Field(default=0.5, gt=0)
    retry_backoff_max: float = Field(default=10.0, gt=0)
    #: A worker started while the store is unavailable waits this long (seconds) before giving up.
    start_wait_seconds: float = Field(default=120.0, ge=0)

    @field_validator("dsn", "cs_dsn")
    @classmethod
    def _known_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        raw = value.get_secret_value()
        if not raw.startswith(("chdb://", "http://", "https://")):
            raise ValueError("clickhouse.dsn must start with chdb://, http:// or https://")
        return value

    def for_reports(self) -> ClickHouseSettings:
        """These settings with the customer-success DSN, when one is configured."""
        return self if self.cs_dsn is None else self.model_copy(update={"dsn": self.cs_dsn})

    @property
    def embedded(self) -> bool:
        return self.dsn.get_secret_value().startswith("chdb://")

    @property
    def chdb_path(self) -> Path:
        if not self.embedded:
            raise ValueError("chdb_path is only defined for a chdb:// DSN")
        return Path(self.dsn.get_secret_value().removeprefix("chdb://"))


class LocalServicesSettings(_Section):
    """The local, Docker-free services started by ``meterstream services``."""

    state_dir: Path = DEFAULT_STATE_DIR
    kafka_port: int = Field(default=9092, ge=1, le=65535)
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    kafka_heap: str = "768m"
    #: Also listen with SASL/SCRAM-SHA-512 on this port (credentials below); the PLAINTEXT
    #: listener stays for local tools, as on any dev box. None: PLAINTEXT only.
    kafka_sasl_port: int | None = Field(default=None, ge=1, le=65535)
    kafka_sasl_username: str = "meterstream"
    kafka_sasl_password: SecretStr | None = None
    start_timeout: float = Field(default=90.0, gt=0)
    #: The local ClickHouse server (meterstream/services/clickhouse.py), loopback only. The
    #: default DSN (clickhouse.dsn) points at the HTTP port: change both together.
    clickhouse_http_port: int = Field(default=8123, ge=1, le=65535)
    clickhouse_tcp_port: int = Field(default=9000, ge=1, le=65535)

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def clickhouse_dir(self) -> Path:
        return self.state_dir / "clickhouse-server"


class WorkerSettings(_Section):
    """The Faust worker: identity, batching and the price file."""

    app_id: str = "meterstream"
    #: Max events per batch (a batch is what has arrived: it never waits to fill), and how
    #: long the consumer waits for anything when nothing has arrived.
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    batch_timeout: float = Field(default=0.5, gt=0)
    #: Batches rated (their decisions and alerts published) but not yet stored, at most: the
    #: rating keeps up with the topic while a slow store write catches up, and a store that
    #: stays slow holds the reading back after this many (memory: up to this × batch_size events).
    writes_in_hand: int = Field(default=3, ge=1, le=16)
    #: A store write waits until its oldest batch was rated this long ago (or until
    #: ``writes_in_hand`` batches or ``batch_size`` events wait), and writes every batch waiting
    #: as one insert: ClickHouse pays a fixed cost per insert (60-100 ms of server CPU on the local
    #: server here, whatever its size: bench/insert_size.py), so a trickle of small batches costs
    #: more than the events.
    #: Decisions and alerts do not wait for it; offsets are committed after it.
    insert_linger_seconds: float = Field(default=0.25, ge=0, le=10)
    #: Python's cyclic garbage collector in the worker process. Above 0: what start-up built is
    #: frozen (never scanned again), the automatic collector is off, and a full collection runs
    #: every this many seconds. A batch holds ~20 objects per event until it is stored, and the
    #: automatic collector (a pass every 700 new objects) scanned each of them several times:
    #: without it the worker made 1.27-1.45x the events/s (BENCHMARKS.md). 0: Python's automatic collector.
    gc_collect_seconds: float = Field(default=30.0, ge=0, le=3600)
    #: Tumbling window for the real-time per-customer counters.
    window_seconds: int = Field(default=60, ge=1)
    #: How long windowed counters are kept before the worker drops them (checked every 60 s).
    window_expires_seconds: int = Field(default=3600, ge=60)
    #: The real-time counters skip a client's resend of an event stored within this many
    #: seconds (reloaded from the store after a restart), remembering at most
    #: ``recent_ids`` ids (~200 bytes each). Replays after a crash are always checked
    #: against the store, and invoices dedupe in ClickHouse with no horizon at all.
    dedupe_horizon_seconds: int = Field(default=3600, ge=0)
    recent_ids: int = Field(default=1_000_000, ge=1_000)
    #: A billing period closes this many seconds after it ends. Later events for it are
    #: kept in their own period and billed on the next open invoice as a flagged adjustment.
    late_grace_seconds: int = Field(default=3 * 86_400, ge=0)
    #: On shutdown, how long to let the batch in hand finish before exiting without committing it.
    shutdown_drain_seconds: float = Field(default=30.0, gt=0)
    #: How often acknowledged offsets are committed (seconds); a crash replays at most this much.
    commit_interval: float = Field(default=1.0, gt=0, le=60)
    #: A worker that stops heartbeating for this long is dropped from the group and its
    #: partitions move; short enough that a crashed worker's partitions resume quickly.
    session_timeout: float = Field(default=10.0, ge=6, le=300)
    #: How often the worker settles closed days for invoices (meterstream/storage/settle.py).
    settle_interval_seconds: float = Field(default=600.0, ge=10)
    web_port: int = Field(default=6066, ge=1, le=65535)
    #: The worker's HTTP endpoint (/stats/) listens here only.
    web_bind: str = "127.0.0.1"
    #: Plan catalog (YAML: plans, versions, their price books, customer assignments);
    #: empty means the shipped default (pay as you go on the default price book).
    plans_file: Path | None = None
    #: Budgets file (YAML); empty means no budgets (no alerts).
    budgets_file: Path | None = None
    data_dir: Path = DEFAULT_STATE_DIR / "worker"


class WebSettings(_Section):
    """``meterstream serve``: the customer-visible usage page and its read-only JSON API."""

    #: YAML mapping ``sha256:<hex of the token's SHA-256>`` -> customer_id (see meterstream/web/tokens.py).
    #: Required by ``serve``; plaintext tokens are refused.
    tokens_file: Path | None = None
    port: int = Field(default=8088, ge=1, le=65535)
    bind: str = "127.0.0.1"
    #: Usage-over-time window: the default, the longest, and the longest in hourly buckets (days).
    default_days: int = Field(default=30, ge=1, le=366)
    max_days: int = Field(default=92, ge=1, le=366)
    max_hourly_days: int = Field(default=14, ge=1, le=92)
    #: Whether customers see the provider cost of their usage (cost to serve) beside credits.
    #: Off by default: with credits and cost side by side a customer can read our margin.
    show_cost_to_serve: bool = False
    #: Seconds each saved query of the customer web server may run (the server's ``max_execution_time``:
    #: a slower one ends and the request answers 503); an invoice request waits no longer for one.
    query_timeout: float = Field(default=30.0, gt=0)


class AlertForwarderSettings(_Section):
    """``meterstream alerts forward``: budget alerts POSTed to a webhook (rules in meterstream/alerting/)."""

    #: Where alerts are POSTed (http:// or https://); ``--url`` overrides it. A secret, since webhook
    #: URLs often carry a token in their path: logs and reprs show only the origin, or nothing.
    url: SecretStr | None = None
    #: The NAME of the environment variable holding the HMAC-SHA256 signing secret (never the
    #: secret itself); unset means bodies are not signed. ``--secret-env`` overrides it.
    secret_env: str | None = None
    #: Consumer group; also names the delivery ledger and the dead-letter file. ``--group`` overrides it.
    group_id: str = Field(default="meterstream-alert-forwarder", pattern=r"^[A-Za-z0-9._-]{1,200}$")
    #: Where a group with no committed offsets starts; earliest forwards every alert still on the topic.
    start_at: Literal["earliest", "latest"] = "earliest"
    #: Attempts per alert, and the waits between them: doubling from initial, capped at max (seconds).
    #: The defaults retry one alert for about 3 minutes before it goes to the dead-letter file.
    max_attempts: int = Field(default=10, ge=1, le=100)
    backoff_initial: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=60.0, gt=0)
    #: Seconds one POST may take (connect, send, answer).
    request_timeout: float = Field(default=10.0, gt=0)
    #: A forwarder silent this long leaves its group; a restart after a crash waits up to this long.
    session_timeout: float = Field(default=10.0, ge=6, le=300)
    #: Delivery ledger ``<group>.sqlite3`` and dead-letter file ``<group>.dead-letters.jsonl``.
    state_dir: Path = DEFAULT_STATE_DIR / "alert-forwarder"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("alert_forwarder.url must start with http:// or https://")
        return value


class LedgerSettings(_Section):
    """The shared reservation ledger of hard caps (meterstream/producers/ledger.py), on Redis."""

    #: ``redis://[:password@]host:port/db``; unset: each guard keeps its reservations in its own
    #: process (a hard cap then holds within one process only). A secret: it may carry a password.
    redis_url: SecretStr | None = None
    #: A reservation of a caller that never settles nor releases (it died) is freed after this long.
    reservation_ttl_seconds: float = Field(default=60.0, gt=0, le=3600)
    #: A settled call the worker has not counted yet is held this long at most.
    settled_ttl_seconds: float = Field(default=3600.0, gt=0)
    #: Seconds a ledger call may take before the ledger counts as unreachable.
    timeout_seconds: float = Field(default=0.5, gt=0, le=30)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERSTREAM_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # A rejected value may be a DSN with a password in it: errors name the field, not the input.
        hide_input_in_errors=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    services: LocalServicesSettings = LocalServicesSettings()
    worker: WorkerSettings = WorkerSettings()
    web: WebSettings = WebSettings()
    alert_forwarder: AlertForwarderSettings = AlertForwarderSettings()
    ledger: LedgerSettings = LedgerSettings()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
