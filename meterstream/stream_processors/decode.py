"""Decode a Kafka message into an event or a rejection. Never raises.

A worker that raises on one message would stop the whole batch, so every failure
here becomes data: a :class:`Rejection` with the raw bytes and a reason that
the worker sends to the dead-letter topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from meterstream.schemas.events import OutcomeEvent, UsageEvent

#: Larger messages are rejected unread: no legitimate event is this big.
MAX_EVENT_BYTES = 64 * 1024

_MODEL_FOR_TOPIC: dict[str, type[UsageEvent] | type[OutcomeEvent]] = {
    "usage": UsageEvent,
    "outcome": OutcomeEvent,
}


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """One line per problem, field first: ``input_tokens: Input should be a valid integer``."""
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def decode_event(raw: bytes | None, kind: Literal["usage", "outcome"]) -> UsageEvent | OutcomeEvent | Rejection:
    """Parse and validate one message value from the ``kind`` topic.

    The topic decides the model, so ``type`` may be omitted; a present ``type``
    that does not match the topic is rejected ("type: Input should be 'usage'").
    """
    if raw is None:
        return Rejection("empty message (null value)")
    if len(raw) > MAX_EVENT_BYTES:
        return Rejection(f"message is {len(raw)} bytes; the limit is {MAX_EVENT_BYTES}")
    try:
        return _MODEL_FOR_TOPIC[kind].model_validate_json(raw)
    except ValidationError as exc:
        return Rejection(f"invalid event: {describe_validation_error(exc)}")
    except (ValueError, RecursionError) as exc:  # defensive: pydantic-core reports most as ValidationError
        return Rejection(f"undecodable message: {exc}")
