"""Settings from the environment: prefix, nesting, secrets kept out of logs, validation at start-up."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from meterstream.config import ClickHouseSettings, KafkaSettings, Settings

KAFKA_PASSWORD = "kafka-pw-8f3a1c"
CLICKHOUSE_PASSWORD = "ch-pw-51d0e7"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No METERSTREAM_ variables from the outer environment, and no stray .env file."""
    for name in list(os.environ):
        if name.upper().startswith("METERSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


def test_defaults() -> None:
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.partitions == 3
    # The local server of `meterstream services up`, every process connecting to it over HTTP.
    assert settings.clickhouse.dsn.get_secret_value() == "http://meterstream:meterstream@127.0.0.1:8123/"
    assert settings.clickhouse.embedded is False
    assert (settings.services.clickhouse_http_port, settings.services.clickhouse_tcp_port) == (8123, 9000)
    assert settings.worker.batch_size == 5000


def test_env_vars_with_prefix_and_nested_delimiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERSTREAM_KAFKA__BOOTSTRAP_SERVERS", "broker1:9092,broker2:9092")
    monkeypatch.setenv("METERSTREAM_KAFKA__PARTITIONS", "12")
    monkeypatch.setenv("METERSTREAM_KAFKA__TOPIC_PREFIX", "staging.")
    monkeypatch.setenv("METERSTREAM_WORKER__BATCH_SIZE", "2000")
    monkeypatch.setenv("METERSTREAM_WORKER__PLANS_FILE", "/etc/meterstream/plans.yaml")
    monkeypatch.setenv("METERSTREAM_CLICKHOUSE__DSN", "http://default:secret@clickhouse:8123/meterstream")
    monkeypatch.setenv("METERSTREAM_SERVICES__KAFKA_PORT", "29092")
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "broker1:9092,broker2:9092"
    assert settings.kafka.partitions == 12
    assert settings.kafka.topic("usage.events") == "staging.usage.events"
    assert settings.worker.batch_size == 2000
    assert settings.worker.plans_file == Path("/etc/meterstream/plans.yaml")
    assert settings.clickhouse.embedded is False
    assert settings.services.kafka_port == 29092


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA__BOOTSTRAP_SERVERS", "elsewhere:9092")
    assert Settings().kafka.bootstrap_servers == "127.0.0.1:9092"


def test_dotenv_file_is_read_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("METERSTREAM_WORKER__APP_ID=from-file\nMETERSTREAM_KAFKA__PARTITIONS=5\n")
    monkeypatch.setenv("METERSTREAM_KAFKA__PARTITIONS", "7")
    settings = Settings()
    assert settings.worker.app_id == "from-file"
    assert settings.kafka.partitions == 7


@pytest.mark.parametrize(
    ("name", "value", "loc"),
    [
        ("METERSTREAM_KAFKA__PARTITIONS", "0", ("kafka", "partitions")),
        ("METERSTREAM_KAFKA__PARTITIONS", "many", ("kafka", "partitions")),
        ("METERSTREAM_KAFKA__SECURITY_PROTOCOL", "TLS", ("kafka", "security_protocol")),
        ("METERSTREAM_WORKER__BATCH_SIZE", "0", ("worker", "batch_size")),
        ("METERSTREAM_KAFKA__BOOTSTRAP_SERVRS", "x:9092", ("kafka", "bootstrap_servrs")),  # a typo is an error
    ],
)
def test_invalid_values_are_rejected_at_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, loc: tuple[str, ...]
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert [tuple(e["loc"]) for e in info.value.errors()] == [loc]


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.kafka.partitions = 9  # type: ignore[misc]


# -- secrets --------------------------------------------------------------------------------------


@pytest.fixture()
def with_secrets(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("METERSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("METERSTREAM_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("METERSTREAM_KAFKA__SASL_USERNAME", "meter")
    monkeypatch.setenv("METERSTREAM_KAFKA__SASL_PASSWORD", KAFKA_PASSWORD)
    monkeypatch.setenv("METERSTREAM_CLICKHOUSE__DSN", f"https://default:{CLICKHOUSE_PASSWORD}@ch.example:8443/m")
    return Settings()


def test_secrets_are_secret_str(with_secrets: Settings) -> None:
    assert isinstance(with_secrets.kafka.sasl_password, SecretStr)
    assert isinstance(with_secrets.clickhouse.dsn, SecretStr)
    assert with_secrets.kafka.sasl_password.get_secret_value() == KAFKA_PASSWORD
    assert CLICKHOUSE_PASSWORD in with_secrets.clickhouse.dsn.get_secret_value()


@pytest.mark.parametrize("render", [repr, str, lambda s: s.model_dump_json(), lambda s: str(s.model_dump())],
                         ids=["repr", "str", "json", "dump"])
def test_secrets_never_appear_when_settings_are_printed(with_secrets: Settings, render: object) -> None:
    text = render(with_secrets)  # type: ignore[operator]
    assert KAFKA_PASSWORD not in text
    assert CLICKHOUSE_PASSWORD not in text
    assert "ch.example" not in text  # the whole DSN is hidden, not just the password
    assert "SCRAM-SHA-512" in text  # non-secret settings are still shown, so the render is not empty


def test_sections_hide_secrets_too(with_secrets: Settings) -> None:
    for section in (with_secrets.kafka, with_secrets.clickhouse):
        assert KAFKA_PASSWORD not in repr(section) and KAFKA_PASSWORD not in str(section)
        assert CLICKHOUSE_PASSWORD not in repr(section) and CLICKHOUSE_PASSWORD not in str(section)


def test_kafka_client_config_is_where_the_secret_is_unwrapped(with_secrets: Settings) -> None:
    conf = with_secrets.kafka.confluent_config()
    assert conf == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "meter",
        "sasl.password": KAFKA_PASSWORD,
    }


def test_plaintext_kafka_config_has_no_sasl_keys() -> None:
    assert KafkaSettings().confluent_config() == {"bootstrap.servers": "127.0.0.1:9092",
                                                  "security.protocol": "PLAINTEXT"}


# -- ClickHouse DSN -------------------------------------------------------------------------------


@pytest.mark.parametrize("dsn", ["postgres://u@h/db", "clickhouse://h:9000", "ch.example:8123", ""])
def test_invalid_dsn_scheme_is_rejected_with_a_message(monkeypatch: pytest.MonkeyPatch, dsn: str) -> None:
    monkeypatch.setenv("METERSTREAM_CLICKHOUSE__DSN", dsn)
    with pytest.raises(ValidationError) as info:
        Settings()
    [error] = info.value.errors()
    assert tuple(error["loc"]) == ("clickhouse", "dsn")
    assert "clickhouse.dsn must start with chdb://, http:// or https://" in error["msg"]


def test_rejected_dsn_does_not_leak_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERSTREAM_CLICKHOUSE__DSN", f"clickhouse://default:{CLICKHOUSE_PASSWORD}@ch:9000/m")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert CLICKHOUSE_PASSWORD not in str(info.value)


def test_chdb_dsn_path() -> None:
    settings = ClickHouseSettings(dsn=SecretStr("chdb:///var/lib/meterstream/ch"))
    assert settings.embedded is True
    assert settings.chdb_path == Path("/var/lib/meterstream/ch")


def test_chdb_path_is_undefined_for_a_server() -> None:
    settings = ClickHouseSettings(dsn=SecretStr("http://ch:8123/m"))
    with pytest.raises(ValueError, match="only defined for a chdb:// DSN"):
        _ = settings.chdb_path
