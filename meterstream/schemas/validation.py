"""Limits and error text shared by everything that validates events: the worker's decoder,
the SDK, ``import`` and ``rate`` read bad input the same way and say the same about it."""

from __future__ import annotations

from pydantic import ValidationError

#: Larger messages are rejected unread: no legitimate event is this big.
MAX_EVENT_BYTES = 64 * 1024


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
