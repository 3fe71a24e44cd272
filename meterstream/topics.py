"""Topic names, partitions and value types, declared once.

The SDK, the worker, the CLI and the tests all take names from here. Every
topic is keyed by ``customer_id`` so one customer's events stay in order on one
partition and several workers can share the load by partition.
"""

from __future__ import annotations

from dataclasses import dataclass

from meterstream.config import KafkaSettings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    value_type: str
    compacted: bool = False


@dataclass(frozen=True)
class Topics:
    usage: TopicSpec
    outcomes: TopicSpec
    budget_alerts: TopicSpec
    dead_letter: TopicSpec
    enforcement: TopicSpec

    @classmethod
    def from_settings(cls, kafka: KafkaSettings) -> Topics:
        return cls(
            usage=TopicSpec(kafka.topic("usage.events"), "UsageEvent (JSON)"),
            outcomes=TopicSpec(kafka.topic("outcome.events"), "OutcomeEvent (JSON)"),
            budget_alerts=TopicSpec(kafka.topic("budget-alerts"), "BudgetAlert (JSON)"),
            dead_letter=TopicSpec(kafka.topic("meterstream.dead-letter"), "DeadLetter (JSON)"),
            # Compacted: the latest decision per customer (or customer|run) is all a guard needs.
            enforcement=TopicSpec(kafka.topic("enforcement-state"), "EnforcementState (JSON)", compacted=True),
        )

    def all(self) -> list[TopicSpec]:
        return [self.usage, self.outcomes, self.budget_alerts, self.dead_letter, self.enforcement]


class TopicError(RuntimeError):
    pass


def ensure_topics(kafka: KafkaSettings, timeout: float = 30.0) -> Topics:
    """Create missing topics with the configured partitions; refuse a partition mismatch.

    The worker's tables are partitioned like the source topics (by customer), so
    an existing topic with another partition count is an error, not a warning.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    topics = Topics.from_settings(kafka)
    admin = AdminClient(kafka.confluent_config())
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except Exception as exc:
        raise TopicError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
    missing = []
    for spec in topics.all():
        if spec.name in existing:
            have = len(existing[spec.name].partitions)
            if spec.name in (topics.usage.name, topics.outcomes.name) and have != kafka.partitions:
                raise TopicError(
                    f"topic {spec.name} has {have} partitions but settings say {kafka.partitions}; "
                    "set METERSTREAM_KAFKA__PARTITIONS to match"
                )
            continue
        config = {"cleanup.policy": "compact"} if spec.compacted else {}
        missing.append(NewTopic(spec.name, kafka.partitions, kafka.replication_factor, config=config))
    if missing:
        for name, future in admin.create_topics(missing, request_timeout=timeout).items():
            try:
                future.result(timeout=timeout)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise TopicError(f"cannot create topic {name}: {exc}") from exc
    return topics


def customer_partition(customer_id: str, partitions: int) -> int:
    """The partition of ``customer_id``'s events: murmur2 of the UTF-8 key, as every meterstream
    producer partitions (the Java client's, aiokafka's and librdkafka's ``murmur2_random``)."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(customer_id.encode()) & 0x7FFFFFFF) % partitions
