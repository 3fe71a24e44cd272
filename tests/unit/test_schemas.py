"""The wire format: what a valid event is, and that every rejection names the field."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import time_machine
from pydantic import ValidationError

from meterstream.schemas.events import (
    MAX_ATTRIBUTE_KEY_LENGTH,
    MAX_ATTRIBUTE_VALUE_LENGTH,
    MAX_ATTRIBUTES,
    Attribution,
    Meter,
    OutcomeEvent,
    UsageEvent,
)
from meterstream.schemas.jsonschema import EXPORTED, export_json_schemas
from meterstream.schemas.records import BudgetAlert, DeadLetter

T0 = datetime(2025, 3, 15, 12, 0, 0, tzinfo=timezone.utc)
#: The clock the models' future-time limit reads, stopped: the verdicts on T0 and on the day after
#: NOW hold whatever day the tests run on.
NOW = datetime(2026, 11, 16, 12, 30, tzinfo=timezone.utc)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clock_stopped_at_now() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield

VALID_TOKENS: dict[str, Any] = {
    "event_id": "evt-1",
    "customer_id": "acme",
    "occurred_at": T0,
    "model": "gpt-4o",
    "input_tokens": 1200,
    "output_tokens": 300,
}
VALID_METER: dict[str, Any] = {
    "event_id": "evt-2",
    "customer_id": "acme",
    "occurred_at": T0,
    "meter": "documents",
    "quantity": 3,
}


def errors_of(model: type[UsageEvent] | type[OutcomeEvent], data: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        model(**data)
    return info.value.errors(include_url=False)


def assert_rejected(
    data: dict[str, Any], loc: tuple[str, ...], fragment: str, model: type[UsageEvent] | type[OutcomeEvent] = UsageEvent
) -> None:
    """The event is rejected, and one error sits at ``loc`` with ``fragment`` in its message."""
    errors = errors_of(model, data)
    matching = [e for e in errors if tuple(e["loc"])[: len(loc)] == loc and fragment in e["msg"]]
    assert matching, f"no error at {loc} mentioning {fragment!r}; got {errors}"


# -- valid events ---------------------------------------------------------------------------------


def test_valid_tokens_event_has_defaults_and_derived_fields() -> None:
    event = UsageEvent(**VALID_TOKENS)
    assert event.schema_version == 1
    assert event.type == "usage"
    assert event.meter is Meter.TOKENS
    assert event.cached_input_tokens == 0
    assert event.quantity == Decimal(0)
    assert event.attributes == {}
    assert event.total_tokens == 1500
    assert event.period == "2025-03"


def test_valid_meter_event_quantity_is_decimal() -> None:
    event = UsageEvent(**VALID_METER)
    assert event.meter is Meter.DOCUMENTS
    assert event.quantity == Decimal(3)
    assert isinstance(event.quantity, Decimal)


@pytest.mark.parametrize(
    ("given", "expected"),
    [(0.1, Decimal("0.1")), (2.5, Decimal("2.5")), ("0.3", Decimal("0.3")), (7, Decimal(7)), (Decimal("1.000000001"), Decimal("1.000000001"))],
)
def test_quantity_never_goes_through_binary_float(given: Any, expected: Decimal) -> None:
    event = UsageEvent(**{**VALID_METER, "quantity": given})
    assert event.quantity == expected
    assert str(event.quantity) == str(expected)


def test_quantity_from_json_float_is_exact() -> None:
    raw = json.dumps({**VALID_METER, "occurred_at": T0.isoformat(), "quantity": 0.1}).encode()
    assert UsageEvent.model_validate_json(raw).quantity == Decimal("0.1")


def test_valid_outcome_event() -> None:
    event = OutcomeEvent(event_id="o-1", customer_id="acme", occurred_at=T0, outcome_type="resolved_ticket",
                         attribution="human_assisted", reversal_of="o-0")
    assert event.type == "outcome"
    assert event.attribution is Attribution.HUMAN_ASSISTED
    assert event.reversal_of == "o-0"


def test_occurred_at_is_normalised_to_utc_and_period_is_the_utc_month() -> None:
    # 23:30 on 31 March in UTC-5 is already April in UTC: the billing period follows UTC.
    local = datetime(2025, 3, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    event = UsageEvent(**{**VALID_TOKENS, "occurred_at": local})
    assert event.occurred_at == local
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert event.occurred_at.hour == 4
    assert event.period == "2025-04"


def test_boundaries_are_inclusive() -> None:
    UsageEvent(**{**VALID_TOKENS, "input_tokens": 10, "cached_input_tokens": 10})
    UsageEvent(**{**VALID_TOKENS, "attributes": {f"k{i}": i for i in range(MAX_ATTRIBUTES)}})
    UsageEvent(**{**VALID_TOKENS, "attributes": {"k" * MAX_ATTRIBUTE_KEY_LENGTH: "v" * MAX_ATTRIBUTE_VALUE_LENGTH}})
    UsageEvent(**{**VALID_TOKENS, "input_tokens": 100_000_000})


@pytest.mark.clock
def test_an_event_within_the_future_skew_is_accepted(now: datetime) -> None:
    UsageEvent(**{**VALID_TOKENS, "occurred_at": now + timedelta(minutes=4)})


def test_attribute_values_keep_their_json_types() -> None:
    event = UsageEvent(**{**VALID_TOKENS, "attributes": {"feature": "chat", "beta": True, "tier": 3}})
    assert event.attributes == {"feature": "chat", "beta": True, "tier": 3}
    assert type(event.attributes["beta"]) is bool
    assert type(event.attributes["tier"]) is int


def test_events_are_immutable() -> None:
    event = UsageEvent(**VALID_TOKENS)
    with pytest.raises(ValidationError):
        event.input_tokens = 5  # type: ignore[misc]


# -- invalid events: every error names its field --------------------------------------------------

# A day ahead of the stopped clock: "too far in the future" on any day the tests run.
NOW_PLUS_1_DAY = NOW + timedelta(days=1)


@pytest.mark.parametrize(
    ("overrides", "loc", "fragment"),
    [
        pytest.param({"occurred_at": datetime(2025, 3, 15, 12, 0)}, ("occurred_at",), "timezone", id="naive-datetime"),
        pytest.param({"input_tokens": "12"}, ("input_tokens",), "valid integer", id="string-token-count"),
        pytest.param({"output_tokens": True}, ("output_tokens",), "valid integer", id="bool-token-count"),
        pytest.param({"input_tokens": 12.0}, ("input_tokens",), "valid integer", id="float-token-count"),
        pytest.param({"input_tokens": -1}, ("input_tokens",), "greater than or equal to 0", id="negative-tokens"),
        pytest.param({"input_tokens": 100_000_001}, ("input_tokens",), "less than or equal", id="too-many-tokens"),
        pytest.param({"model": None}, (), "needs a model", id="tokens-without-model"),
        pytest.param({"input_tokens": 10, "cached_input_tokens": 11}, (), "cached_input_tokens cannot exceed input_tokens",
                     id="cached-more-than-input"),
        pytest.param({"quantity": 1}, (), "carries token counts, not quantity", id="tokens-with-quantity"),
        pytest.param({"attributes": {f"k{i}": i for i in range(MAX_ATTRIBUTES + 1)}}, ("attributes",),
                     f"at most {MAX_ATTRIBUTES} attributes", id="too-many-attributes"),
        pytest.param({"attributes": {"k" * (MAX_ATTRIBUTE_KEY_LENGTH + 1): 1}}, ("attributes",),
                     "attribute keys must be", id="attribute-key-too-long"),
        pytest.param({"attributes": {"": 1}}, ("attributes",), "attribute keys must be", id="empty-attribute-key"),
        pytest.param({"attributes": {"note": "v" * (MAX_ATTRIBUTE_VALUE_LENGTH + 1)}}, ("attributes",),
                     "attribute 'note' is 257 characters", id="attribute-value-too-long"),
        pytest.param({"attributes": {"ratio": 0.5}}, ("attributes", "ratio"), "", id="float-attribute-value"),
        pytest.param({"bogus": 1}, ("bogus",), "Extra inputs are not permitted", id="unknown-top-level-field"),
        pytest.param({"occurred_at": NOW_PLUS_1_DAY}, ("occurred_at",), "in the future", id="too-far-in-future"),
        pytest.param({"event_id": 7}, ("event_id",), "valid string", id="int-event-id"),
        pytest.param({"event_id": "has space"}, ("event_id",), "pattern", id="event-id-with-space"),
        pytest.param({"customer_id": ""}, ("customer_id",), "at least 1 character", id="empty-customer"),
        pytest.param({"schema_version": 2}, ("schema_version",), "1", id="unknown-schema-version"),
        pytest.param({"meter": "widgets"}, ("meter",), "Input should be", id="unknown-meter"),
        pytest.param({"type": "outcome"}, ("type",), "usage", id="wrong-type"),
    ],
)
def test_invalid_tokens_event_names_the_field(overrides: dict[str, Any], loc: tuple[str, ...], fragment: str) -> None:
    assert_rejected({**VALID_TOKENS, **overrides}, loc, fragment)


@pytest.mark.parametrize(
    ("overrides", "loc", "fragment"),
    [
        pytest.param({"quantity": -1}, ("quantity",), "greater than or equal to 0", id="negative-quantity"),
        pytest.param({"quantity": float("nan")}, ("quantity",), "finite", id="nan-float-quantity"),
        pytest.param({"quantity": float("inf")}, ("quantity",), "finite", id="inf-float-quantity"),
        pytest.param({"quantity": Decimal("NaN")}, ("quantity",), "finite", id="nan-decimal-quantity"),
        pytest.param({"quantity": "NaN"}, ("quantity",), "finite", id="nan-string-quantity"),
        pytest.param({"quantity": True}, ("quantity",), "not a boolean", id="bool-quantity"),
        pytest.param({"quantity": 0}, (), "needs a positive quantity", id="zero-quantity"),
        pytest.param({"quantity": Decimal("0.0000000001")}, ("quantity",), "decimal places", id="too-many-decimals"),
        pytest.param({"input_tokens": 5}, (), "documents event carries quantity, not token counts",
                     id="non-token-meter-with-tokens"),
        pytest.param({"cached_input_tokens": 1}, (), "carries quantity, not token counts",
                     id="non-token-meter-with-cached-tokens"),
    ],
)
def test_invalid_meter_event_names_the_field(overrides: dict[str, Any], loc: tuple[str, ...], fragment: str) -> None:
    assert_rejected({**VALID_METER, **overrides}, loc, fragment)


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"attribution": "robot"}, ("attribution",)),
        ({"outcome_type": None}, ("outcome_type",)),
        ({"input_tokens": 1}, ("input_tokens",)),  # usage fields are unknown on an outcome
    ],
)
def test_invalid_outcome_event_names_the_field(overrides: dict[str, Any], loc: tuple[str, ...]) -> None:
    data = {"event_id": "o-1", "customer_id": "acme", "occurred_at": T0, "outcome_type": "resolved_ticket",
            "attribution": "ai_only", **overrides}
    assert_rejected(data, loc, "", model=OutcomeEvent)


@pytest.mark.parametrize(
    ("field", "json_value"),
    [("input_tokens", '"12"'), ("output_tokens", "true"), ("input_tokens", "1.5"), ("customer_id", "7")],
)
def test_json_wire_format_is_strict_too(field: str, json_value: str) -> None:
    body = {**VALID_TOKENS, "occurred_at": "2025-03-15T12:00:00Z"}
    body.pop(field, None)
    raw = json.dumps(body)[:-1] + f', "{field}": {json_value}}}'
    with pytest.raises(ValidationError) as info:
        UsageEvent.model_validate_json(raw)
    assert [tuple(e["loc"]) for e in info.value.errors()] == [(field,)]


class _Moment(datetime):
    """A datetime subclass: not the SDK's own timestamps, so it takes pydantic's full path."""


@pytest.mark.parametrize(
    "tz", [timezone.utc, timezone(timedelta(hours=-5)), timezone(timedelta(0))], ids=["utc", "utc-5", "other-utc-object"]
)
@pytest.mark.clock
def test_occurred_at_rules_hold_for_every_timezone(tz: timezone) -> None:
    # UTC datetimes skip pydantic's datetime validator; every rule must hold on both paths.
    now = datetime.now(timezone.utc)
    for moment in (now.astimezone(tz), _Moment.fromtimestamp(now.timestamp(), tz)):
        event = UsageEvent(**{**VALID_TOKENS, "occurred_at": moment})
        assert event.occurred_at == moment and event.occurred_at.tzinfo is timezone.utc
    UsageEvent(**{**VALID_TOKENS, "occurred_at": (now + timedelta(minutes=5) - timedelta(seconds=2)).astimezone(tz)})
    assert_rejected({**VALID_TOKENS, "occurred_at": (now + timedelta(minutes=5, seconds=2)).astimezone(tz)},
                    ("occurred_at",), "more than 300 s in the future")
    UsageEvent(**{**VALID_TOKENS, "occurred_at": datetime(2000, 1, 1, tzinfo=timezone.utc).astimezone(tz)})
    assert_rejected({**VALID_TOKENS, "occurred_at": datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc).astimezone(tz)},
                    ("occurred_at",), "is before 2000-01-01")
    assert_rejected({**VALID_TOKENS, "occurred_at": T0.replace(tzinfo=None)}, ("occurred_at",), "timezone")


@pytest.mark.parametrize("number", [1_700_000_000, 1_700_000_000.5])
def test_occurred_at_is_never_read_from_a_number(number: float) -> None:
    assert_rejected({**VALID_TOKENS, "occurred_at": number}, ("occurred_at",), "RFC 3339 date-time string")
    raw = json.dumps({**VALID_TOKENS, "occurred_at": number})
    with pytest.raises(ValidationError, match="RFC 3339 date-time string"):
        UsageEvent.model_validate_json(raw)


def test_wire_bytes_are_the_json_dump_without_nulls(make_usage: Callable[..., UsageEvent]) -> None:
    events = [
        make_usage(),
        make_usage(provider="openai", workflow_id="wf-1", attributes={"feature": "chat", "beta": True, "tier": 3}),
        UsageEvent(**{**VALID_METER, "quantity": Decimal("123456789.000000001"), "unit": "pages"}),
        OutcomeEvent(event_id="o-1", customer_id="acme", occurred_at=T0, outcome_type="resolved_ticket",
                     attribution="ai_only"),
    ]
    for event in events:
        assert event.wire_bytes() == event.model_dump_json(exclude_none=True).encode()
        assert type(event).model_validate_json(event.wire_bytes()) == event


def test_occurred_at_before_utc_range_is_a_validation_error_not_an_overflow() -> None:
    # 00:30 on 1 Jan year 1 at UTC+1 is before datetime.min in UTC. It used to escape as
    # OverflowError (crashing the decoder); it must be an ordinary field error.
    raw = json.dumps({**VALID_TOKENS, "occurred_at": "0001-01-01T00:30:00+01:00"})
    with pytest.raises(ValidationError) as info:
        UsageEvent.model_validate_json(raw)
    assert [tuple(e["loc"]) for e in info.value.errors()] == [("occurred_at",)]
    assert "out of range" in info.value.errors()[0]["msg"]


# -- JSON round trip ------------------------------------------------------------------------------


def test_usage_event_json_round_trip(make_usage: Callable[..., UsageEvent]) -> None:
    event = make_usage(cached_input_tokens=500, provider="openai", workflow_id="wf-1", run_id="run:9",
                       attributes={"feature": "chat", "beta": True, "tier": 3})
    again = UsageEvent.model_validate_json(event.model_dump_json())
    assert again == event


def test_meter_event_json_round_trip_keeps_decimal_exact() -> None:
    event = UsageEvent(**{**VALID_METER, "quantity": Decimal("123456789.000000001"), "unit": "pages"})
    wire = event.model_dump_json()
    # Decimals travel as JSON strings, so no consumer ever parses them as a binary float.
    assert json.loads(wire)["quantity"] == "123456789.000000001"
    assert UsageEvent.model_validate_json(wire).quantity == Decimal("123456789.000000001")


def test_outcome_event_json_round_trip(make_outcome: Callable[..., OutcomeEvent]) -> None:
    event = make_outcome(reversal_of="out-0", workflow_id="wf-1")
    assert OutcomeEvent.model_validate_json(event.model_dump_json()) == event


def test_json_occurred_at_is_utc_rfc3339() -> None:
    local = datetime(2025, 3, 15, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    wire = json.loads(UsageEvent(**{**VALID_TOKENS, "occurred_at": local}).model_dump_json())
    assert wire["occurred_at"] == "2025-03-15T12:00:00Z"


# -- records --------------------------------------------------------------------------------------


def test_budget_alert_id_is_deterministic_and_pinned() -> None:
    first = BudgetAlert.make_id("acme", "2025-03", 50)
    assert first == BudgetAlert.make_id("acme", "2025-03", 50)
    # Pinned: consumers dedupe on this id, so it must not change between releases.
    assert first == "alert-d6f22762cbcd396ad576326e"
    others = {
        BudgetAlert.make_id("acme", "2025-03", 80),
        BudgetAlert.make_id("acme", "2025-04", 50),
        BudgetAlert.make_id("globex", "2025-03", 50),
    }
    assert first not in others
    assert len(others) == 3


def test_dead_letter_json_keeps_raw_bytes_exactly() -> None:
    # Every byte value, invalid UTF-8, and a length whose base64 needs padding and contains + and /.
    raw = bytes(range(256)) + b"\xff\xfe not utf-8 \x00\xfb\xff"
    letter = DeadLetter(reason="invalid event: x", raw=raw, source_topic="usage.events", source_partition=2,
                        source_offset=41, rejected_at=T0)
    wire = letter.model_dump_json()
    encoded = json.loads(wire)["raw"]
    assert isinstance(encoded, str)
    # Standard, padded base64 (RFC 4648 section 4), so any language's default decoder reads it.
    assert base64.b64decode(encoded, validate=True) == raw
    assert DeadLetter.model_validate_json(wire).raw == raw
    assert DeadLetter.model_validate_json(wire) == letter


def test_dead_letter_python_mode_keeps_bytes() -> None:
    letter = DeadLetter(reason="r", raw=b"\x00\x01", rejected_at=T0)
    assert letter.model_dump()["raw"] == b"\x00\x01"


def test_dead_letter_json_with_invalid_base64_is_rejected() -> None:
    wire = json.dumps({"reason": "r", "raw": "not base64!", "rejected_at": "2025-03-15T12:00:00Z"})
    with pytest.raises(ValidationError) as info:
        DeadLetter.model_validate_json(wire)
    assert [tuple(e["loc"]) for e in info.value.errors()] == [("raw",)]


# -- exported JSON Schema -------------------------------------------------------------------------


def test_committed_json_schemas_are_current(tmp_path: Path) -> None:
    written = export_json_schemas(tmp_path / "schemas")
    committed_dir = REPO / "docs" / "schemas"
    assert sorted(p.name for p in written) == sorted(f"{name}.schema.json" for name in EXPORTED)
    assert sorted(p.name for p in committed_dir.glob("*.schema.json")) == sorted(p.name for p in written), (
        "docs/schemas has a different set of files than export_json_schemas writes"
    )
    stale = [p.name for p in written if p.read_text() != (committed_dir / p.name).read_text()]
    assert not stale, f"docs/schemas is stale for {stale}; run `meterstream schemas export`"


def test_exported_usage_schema_forbids_unknown_fields(tmp_path: Path) -> None:
    export_json_schemas(tmp_path)
    schema = json.loads((tmp_path / "usage_event.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert {"event_id", "customer_id", "occurred_at"} <= set(schema["required"])
    assert schema["$id"].endswith("/usage_event.schema.json")


@pytest.mark.parametrize(
    ("fast", "slow"),
    [
        ("2026-09-05T10:00:00Z", "2026-09-05T10:00:00+00:00"),
        ("2026-09-05T10:00:00.123Z", "2026-09-05T12:00:00.123+02:00"),
        ("2000-01-01T00:00:00Z", "2000-01-01T00:00:00.000+00:00"),
    ],
)
def test_the_canonical_utc_fast_path_reads_what_pydantic_reads(fast, slow):
    base = {"event_id": "e", "customer_id": "c", "model": "gpt-4o"}
    a = UsageEvent.model_validate_json(json.dumps({**base, "occurred_at": fast}))
    b = UsageEvent.model_validate_json(json.dumps({**base, "occurred_at": slow}))
    assert a.occurred_at == b.occurred_at and a.occurred_at.tzinfo is timezone.utc
    assert UsageEvent(**base, occurred_at=fast) == a  # python mode (CSV, Parquet) too


@pytest.mark.parametrize("bad", ["2026-13-05T10:00:00Z", "2026-02-30T10:00:00Z", "2026-09-05T24:00:00Z",
                                 "1999-12-31T23:59:59Z", "2999-01-01T00:00:00Z"])  # fmt: skip
def test_the_canonical_utc_fast_path_refuses_what_pydantic_refuses(bad):
    with pytest.raises(ValidationError, match="occurred_at"):
        UsageEvent.model_validate_json(json.dumps({"event_id": "e", "customer_id": "c", "model": "gpt-4o",
                                                   "occurred_at": bad}))  # fmt: skip
