"""The SDK services use to publish usage and outcome events."""

from meterstream.producers.client import DeliveryFailure, MeterClient, ProducerClosed
from meterstream.producers.llm import TokenUsage, usage_from_anthropic, usage_from_openai

__all__ = [
    "DeliveryFailure",
    "MeterClient",
    "ProducerClosed",
    "TokenUsage",
    "usage_from_anthropic",
    "usage_from_openai",
]
