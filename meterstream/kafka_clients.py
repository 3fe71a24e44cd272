"""The worker's and the alert forwarder's Kafka clients: one family (Faust, and aiokafka under it).

Credentials are translated once, here: :func:`faust_credentials` turns the
configured security settings (the SASL password is a ``SecretStr``, unwrapped
here only) into Faust's credentials object, which Faust's own producer and
consumer take as ``broker_credentials``; the aiokafka clients the worker runs
beside Faust (the batch consumer, the alert outbox's reader) get their
arguments from the same object through Faust's own translation
(:func:`aiokafka_client_args`), so both speak to the broker identically.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import faust
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from meterstream.config import KafkaSettings


def faust_credentials(kafka: KafkaSettings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """Faust's ``broker_credentials`` for the configured security protocol (None: PLAINTEXT)."""
    protocol = kafka.security_protocol
    context = ssl.create_default_context(cafile=kafka.ssl_cafile) if protocol in ("SSL", "SASL_SSL") else None
    if protocol.startswith("SASL_"):
        if not (kafka.sasl_mechanism and kafka.sasl_username and kafka.sasl_password is not None):
            raise ValueError(f"kafka.security_protocol {protocol} needs sasl_mechanism, sasl_username and sasl_password")
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def aiokafka_client_args(kafka: KafkaSettings) -> dict[str, Any]:
    """``bootstrap_servers`` and the security arguments of an aiokafka client, as Faust builds its own."""
    auth: Mapping[str, Any] = credentials_to_aiokafka_auth(faust_credentials(kafka))
    return {"bootstrap_servers": kafka.bootstrap_servers, **auth}


def faust_broker(kafka: KafkaSettings) -> list[str]:
    """Faust's ``broker`` setting: one ``kafka://host:port`` URL per bootstrap server."""
    return [f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")]
