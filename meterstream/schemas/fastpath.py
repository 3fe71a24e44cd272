"""Wire bytes of token usage events straight from their fields, for what the models certainly accept.

``MeterClient.record_many`` sends batches of field mappings. Building a pydantic
``UsageEvent`` per item and serializing it costs more than producing it to Kafka;
most items of a batch are plain token events whose fields have exactly the types
the model expects. For those, :func:`token_event_wire` checks the same constraints
(``meterstream.schemas.events``) with cheap type and regex checks and writes the
bytes ``UsageEvent(**fields).wire_bytes()`` would write, without the model.

It only ever *accepts*: any item it is not certain of (another meter, an outcome,
a string timestamp, a non-UTC timezone, an unknown field, a value out of range, a
subclass of a builtin type) returns ``None`` and goes through the model, which
accepts it or raises its own error, text and all. So an item is refused only by
the model. ``tests/unit/test_ingest_fuzz.py`` checks over 100,000 generated and
hostile inputs that whatever this accepts the model accepts, with the same bytes.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from time import time
from typing import Any

import orjson

from meterstream.clock import utc_now
from meterstream.schemas.events import (
    EARLIEST_OCCURRED_AT,
    MAX_ATTRIBUTE_KEY_LENGTH,
    MAX_ATTRIBUTE_VALUE_LENGTH,
    MAX_ATTRIBUTES,
    MAX_FUTURE_SKEW,
    Meter,
)

#: The Identifier constraint (events.py): 1..128 characters, ASCII letters/digits first, then also ._:@/-
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/\-]{0,127}").fullmatch
_FIELDS = frozenset({"schema_version", "event_id", "customer_id", "occurred_at", "workflow_id", "run_id",
                     "attributes", "type", "meter", "model", "provider", "input_tokens", "output_tokens",
                     "cached_input_tokens"})  # fmt: skip
_MAX_TOKENS = 100_000_000
_UTC = timezone.utc
_TOKENS = Meter.TOKENS
_OPTIONS = orjson.OPT_UTC_Z
_dumps = orjson.dumps
_MAX_FUTURE_SKEW_S = MAX_FUTURE_SKEW.total_seconds()


def token_event_wire(items: list[Any]) -> list[bytes | None]:
    """Per item: the wire bytes of the token usage event it certainly is, else None (the model decides)."""
    out: list[bytes | None] = []
    append = out.append
    good_ids: set[str] = set()  # ids seen valid in this batch (customers, workflows, models repeat)
    latest: datetime | None = None
    for item in items:
        wire = _one(item, good_ids)
        if wire is not None:
            at = item["occurred_at"]
            if latest is None or at > latest:
                latest = at
        append(wire)
    # The future-time limit, checked once on the latest timestamp as the validator checks each one
    # (both of its conditions grow with the timestamp, so the latest passing means all pass).
    if latest is not None and latest.timestamp() - time() > _MAX_FUTURE_SKEW_S - 1 and latest - utc_now() > MAX_FUTURE_SKEW:
        return [None] * len(items)
    return out


def _known(value: Any, good: set[str]) -> bool:
    # type first: an unhashable value cannot be looked up, and a str subclass is not a str here
    return type(value) is str and (value in good or _id(value, good))


def _id(value: Any, good: set[str]) -> bool:
    """``value`` is an Identifier (remembered in ``good``, which only ever holds valid str ids)."""
    if type(value) is not str:
        return False
    if _IDENTIFIER(value):
        good.add(value)
        return True
    return False


def _one(item: Any, good: set[str]) -> bytes | None:
    if type(item) is not dict or not item.keys() <= _FIELDS:
        return None
    get = item.get
    event_id, customer, at, model = get("event_id"), get("customer_id"), get("occurred_at"), get("model")
    if type(event_id) is not str or not _IDENTIFIER(event_id):  # unique per event: not kept in ``good``
        return None
    if not (_known(customer, good) and _known(model, good)):
        return None
    if type(at) is not datetime or at.tzinfo is not _UTC or at < EARLIEST_OCCURRED_AT:
        return None
    meter = get("meter", _TOKENS)
    if meter is not _TOKENS and not (type(meter) is str and meter == "tokens"):
        return None
    kind = get("type", "usage")
    if type(kind) is not str or kind != "usage":
        return None
    version = get("schema_version", 1)
    if type(version) is not int or version != 1:
        return None
    input_tokens, output_tokens = get("input_tokens", 0), get("output_tokens", 0)
    cached = get("cached_input_tokens", 0)
    if not (type(input_tokens) is int and type(output_tokens) is int and type(cached) is int
            and 0 <= input_tokens <= _MAX_TOKENS and 0 <= output_tokens <= _MAX_TOKENS
            and 0 <= cached <= input_tokens):  # fmt: skip
        return None
    workflow, run, provider = get("workflow_id"), get("run_id"), get("provider")
    if workflow is not None and not _known(workflow, good):
        return None
    if run is not None and not _known(run, good):
        return None
    if provider is not None and not _known(provider, good):
        return None
    attributes = get("attributes")
    if attributes is None:
        if "attributes" in item:
            return None  # None is not a dict: the model refuses it
        attributes = {}
    elif type(attributes) is not dict or len(attributes) > MAX_ATTRIBUTES:
        return None
    else:
        for key, value in attributes.items():
            if type(key) is not str or not 0 < len(key) <= MAX_ATTRIBUTE_KEY_LENGTH:
                return None
            kind_of = type(value)
            if kind_of is str:
                if len(value) > MAX_ATTRIBUTE_VALUE_LENGTH:
                    return None
            elif kind_of is not bool and kind_of is not int:
                return None
    fields: dict[str, Any] = {"schema_version": 1, "event_id": event_id, "customer_id": customer, "occurred_at": at}
    if workflow is not None:
        fields["workflow_id"] = workflow
    if run is not None:
        fields["run_id"] = run
    fields["attributes"] = attributes
    fields["type"] = "usage"
    fields["meter"] = "tokens"
    fields["model"] = model
    if provider is not None:
        fields["provider"] = provider
    fields["input_tokens"] = input_tokens
    fields["output_tokens"] = output_tokens
    fields["cached_input_tokens"] = cached
    fields["quantity"] = "0"
    try:
        return _dumps(fields, None, _OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        return None  # e.g. a lone surrogate or an integer beyond 64 bits: the model's serializer decides
