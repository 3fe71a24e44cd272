"""Decode a Kafka message into an event or a rejection. Never raises.

A worker that raises on one message would stop the whole batch, so every failure
here becomes data: a :class:`Rejection` with the raw bytes and a reason that
the worker sends to the dead-letter topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from pydantic import ValidationError

from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.schemas.validation import MAX_EVENT_BYTES, describe_validation_error

__all__ = ["MAX_EVENT_BYTES", "Rejection", "decode_event", "describe_validation_error", "received_at"]


_MODEL_FOR_TOPIC: dict[str, type[UsageEvent] | type[OutcomeEvent]] = {
    "usage": UsageEvent,
    "outcome": OutcomeEvent,
}


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str


def received_at(timestamp_ms: int | None, now: datetime | None = None) -> datetime | None:
    """A message's broker timestamp as the time it was received, never later than ``now``.

    A producer chooses CreateTime timestamps, so one set ahead of the worker's clock counts as now.
    None without a timestamp (the wall clock decides then).
    """
    if timestamp_ms is None or timestamp_ms < 0:
        return None
    try:
        at = datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return min(at, now) if now is not None else at


def decode_event(
    raw: bytes | None, kind: Literal["usage", "outcome"], received: datetime | None = None
) -> UsageEvent | OutcomeEvent | Rejection:
    """Parse and validate one message value from the ``kind`` topic.

    The topic decides the model, so ``type`` may be omitted; a present ``type``
    that does not match the topic is rejected ("type: Input should be 'usage'").
    ``received`` (the message's broker timestamp, see :func:`received_at`) is what the
    future-time limit is checked against; without it, the wall clock.
    """
    if raw is None:
        return Rejection("empty message (null value)")
    if len(raw) > MAX_EVENT_BYTES:
        return Rejection(f"message is {len(raw)} bytes; the limit is {MAX_EVENT_BYTES}")
    try:
        context = {"received_at": received} if received is not None else None
        return _MODEL_FOR_TOPIC[kind].model_validate_json(raw, context=context)
    except ValidationError as exc:
        return Rejection(f"invalid event: {describe_validation_error(exc)}")
    except (ValueError, RecursionError) as exc:  # defensive: pydantic-core reports most as ValidationError
        return Rejection(f"undecodable message: {str(exc)[:500]}")
    except Exception as exc:
        return Rejection(f"undecodable message ({type(exc).__name__}): {str(exc)[:500]}")
