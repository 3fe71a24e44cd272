"""Decoding Kafka message values: bad input is a Rejection with a reason, never an exception."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.stream_processors.decode import MAX_EVENT_BYTES, Rejection, decode_event

#: When the messages below reached the broker: the future-time limit is measured from it, not from
#: today (decode_event's ``received``), so these verdicts hold whatever day the tests run on.
RECEIVED = datetime(2025, 3, 15, 12, 30, tzinfo=timezone.utc)

USAGE: dict[str, Any] = {
    "event_id": "evt-1",
    "customer_id": "acme",
    "occurred_at": "2025-03-15T12:00:00Z",
    "model": "gpt-4o",
    "input_tokens": 1200,
    "output_tokens": 300,
}
OUTCOME: dict[str, Any] = {
    "event_id": "out-1",
    "customer_id": "acme",
    "occurred_at": "2025-03-15T12:00:00Z",
    "outcome_type": "resolved_ticket",
    "attribution": "ai_only",
}


def encode(data: Any) -> bytes:
    return json.dumps(data).encode()


def test_valid_usage_event() -> None:
    event = decode_event(encode(USAGE), "usage", RECEIVED)
    assert isinstance(event, UsageEvent)
    assert event.input_tokens == 1200
    assert event.occurred_at == datetime(2025, 3, 15, 12, tzinfo=timezone.utc)


def test_valid_outcome_event() -> None:
    event = decode_event(encode(OUTCOME), "outcome", RECEIVED)
    assert isinstance(event, OutcomeEvent)
    assert event.outcome_type == "resolved_ticket"


def test_explicit_matching_type_is_accepted() -> None:
    assert isinstance(decode_event(encode({**USAGE, "type": "usage"}), "usage", RECEIVED), UsageEvent)


def test_event_exactly_at_the_size_limit_is_read() -> None:
    body = encode(USAGE)
    padded = body[:-1] + b" " * (MAX_EVENT_BYTES - len(body)) + b"}"
    assert len(padded) == MAX_EVENT_BYTES
    assert isinstance(decode_event(padded, "usage", RECEIVED), UsageEvent)


NESTED_LISTS = b"[" * 10_000 + b"]" * 10_000
NESTED_IN_EVENT = encode(USAGE)[:-1] + b', "attributes": {"x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}"


@pytest.mark.parametrize(
    ("raw", "kind", "fragment"),
    [
        pytest.param(None, "usage", "empty message", id="none"),
        pytest.param(b"", "usage", "Invalid JSON", id="empty-bytes"),
        pytest.param(b"not json", "usage", "Invalid JSON", id="invalid-json"),
        pytest.param(b'{"event_id": "evt-1",', "usage", "Invalid JSON", id="truncated-json"),
        pytest.param(b"\xff\xfe\x00garbage", "usage", "Invalid JSON", id="invalid-utf8"),
        pytest.param(encode(USAGE).replace(b'"acme"', b'"ac\xffme"'), "usage", "", id="invalid-utf8-in-string"),
        pytest.param(b"[]", "usage", "Input should be an object", id="json-array"),
        pytest.param(b'[{"event_id": "x"}]', "usage", "Input should be an object", id="array-of-event"),
        pytest.param(b"null", "usage", "", id="json-null"),
        pytest.param(b"42", "usage", "", id="json-number"),
        pytest.param(b'"usage"', "usage", "", id="json-string"),
        pytest.param(NESTED_LISTS, "usage", "recursion limit", id="10000-nested-lists"),
        pytest.param(NESTED_IN_EVENT, "usage", "", id="nested-lists-inside-event"),
        pytest.param(b'{"a":' * 5_000 + b"1" + b"}" * 5_000, "usage", "", id="5000-nested-objects"),
        pytest.param(encode(USAGE), "outcome", "model: Extra inputs are not permitted", id="usage-on-outcome-topic"),
        pytest.param(encode(OUTCOME), "usage", "outcome_type: Extra inputs are not permitted",
                     id="outcome-on-usage-topic"),
        pytest.param(encode({**OUTCOME, "type": "outcome"}), "usage", "type: Input should be 'usage'",
                     id="typed-outcome-on-usage-topic"),
        pytest.param(encode({**USAGE, "type": "outcome"}), "usage", "type: Input should be 'usage'",
                     id="type-mismatch"),
        pytest.param(encode({**USAGE, "input_tokens": "12"}), "usage", "input_tokens: Input should be a valid integer",
                     id="string-token-count"),
        pytest.param(encode({**USAGE, "occurred_at": "2025-03-15T12:00:00"}), "usage", "occurred_at:",
                     id="naive-datetime"),
        pytest.param(encode({**USAGE, "occurred_at": "0001-01-01T00:30:00+01:00"}), "usage", "occurred_at:",
                     id="datetime-before-utc-range"),
        pytest.param(encode({**USAGE, "model": None}), "usage", "needs a model", id="tokens-without-model"),
        pytest.param(b'{"quantity": NaN, "meter": "requests"}', "usage", "", id="json-nan"),
    ],
)
def test_bad_input_is_a_rejection_with_a_reason(raw: bytes | None, kind: Any, fragment: str) -> None:
    result = decode_event(raw, kind, RECEIVED)
    assert isinstance(result, Rejection), result
    assert result.reason.strip()
    assert fragment in result.reason


def test_oversized_message_is_rejected_unread() -> None:
    # A valid event padded past the limit: the size alone decides.
    body = encode(USAGE)
    raw = body[:-1] + b" " * (MAX_EVENT_BYTES + 1 - len(body)) + b"}"
    assert len(raw) == MAX_EVENT_BYTES + 1
    result = decode_event(raw, "usage", RECEIVED)
    assert isinstance(result, Rejection)
    assert result.reason == f"message is {MAX_EVENT_BYTES + 1} bytes; the limit is {MAX_EVENT_BYTES}"


def test_many_errors_are_summarised() -> None:
    bad = {"event_id": 1, "customer_id": 2, "occurred_at": "yesterday", "model": 4, "input_tokens": "x", "output_tokens": "y",
           "provider": 5}
    result = decode_event(encode(bad), "usage", RECEIVED)
    assert isinstance(result, Rejection)
    assert result.reason.startswith("invalid event: ")
    assert result.reason.count(";") == 5  # five field errors, then the summary
    assert result.reason.endswith("... and 2 more")


# -- properties -----------------------------------------------------------------------------------


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    for kind in ("usage", "outcome"):
        result = decode_event(raw, kind, RECEIVED)
        assert isinstance(result, Rejection | UsageEvent | OutcomeEvent)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
offsets = st.builds(lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60 - 59, 23 * 60 + 59))
# Both ends of the datetime range on purpose: a non-UTC offset there used to escape as OverflowError.
edge_datetimes = st.datetimes(max_value=datetime(1, 1, 2), timezones=offsets) | st.datetimes(
    min_value=datetime(9999, 12, 30), timezones=offsets
)
timestamps = (st.datetimes(timezones=offsets) | edge_datetimes).map(lambda d: d.isoformat()) | st.text(max_size=30)
event_fields = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.text(max_size=10) | json_values,
        "customer_id": st.sampled_from(["acme", "", "a b"]) | json_values,
        "occurred_at": timestamps | json_values,
        "model": st.sampled_from(["gpt-4o", ""]) | json_values,
        "meter": st.sampled_from(["tokens", "requests", "bogus"]),
        "input_tokens": st.integers() | json_values,
        "output_tokens": st.integers(),
        "cached_input_tokens": st.integers(),
        "quantity": st.integers() | st.floats() | st.text(max_size=12),
        "attributes": json_values,
        "type": st.sampled_from(["usage", "outcome", "x"]),
        "outcome_type": st.text(max_size=10),
        "attribution": st.sampled_from(["ai_only", "human_assisted", "both"]),
    },
)


@given(json_values)
def test_arbitrary_json_never_raises(value: Any) -> None:
    raw = json.dumps(value).encode()
    for kind in ("usage", "outcome"):
        assert isinstance(decode_event(raw, kind), Rejection | UsageEvent | OutcomeEvent)


@given(event_fields)
def test_event_shaped_json_never_raises(fields: dict[str, Any]) -> None:
    # Values that get past JSON parsing and into the validators (dates at the ends of the range, NaN, huge ints).
    raw = json.dumps(fields).encode()
    for kind in ("usage", "outcome"):
        assert isinstance(decode_event(raw, kind), Rejection | UsageEvent | OutcomeEvent)


@given(st.datetimes(timezones=offsets) | edge_datetimes)
def test_any_aware_occurred_at_never_raises(when: datetime) -> None:
    raw = encode({**USAGE, "occurred_at": when.isoformat()})
    result = decode_event(raw, "usage")
    assert isinstance(result, Rejection | UsageEvent)
    if isinstance(result, UsageEvent):
        assert result.occurred_at == when
        assert result.occurred_at.utcoffset() == timedelta(0)
