"""meterstream: usage metering for AI products (SDK -> Kafka -> Faust -> ClickHouse)."""

__version__ = "0.1.0"
