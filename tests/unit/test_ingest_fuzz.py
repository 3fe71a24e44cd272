"""Differential fuzzing of the batch ingestion paths against the per-event models they replace.

The oracle is the per-event path: building the model alone (``UsageEvent(**fields)`` /
``OutcomeEvent(**fields)``, what ``record_usage``/``record`` do) and pydantic's serializer
(``model_dump_json(exclude_none=True)``). The new paths must agree with it on every input:

- ``MeterClient.record_many`` validates a batch as columns (``meterstream.schemas.columnar``,
  Python values included: UTC datetimes, Decimals, enum members), the rest in one pydantic-core
  call per kind: the same inputs accepted, the same messages (topic, key, bytes, order), and
  for a refused batch the same error (type and text) as the first invalid item built alone;
- ``meterstream import`` of CSV spools the wire bytes during the scan: the same bytes as the
  old send (validate the row again, then ``wire_bytes``) for every valid first-seen row.

Inputs are generated (valid events from every meter and outcomes) and hostile: oversized and
nested values, bytes and non-UTF-8, lone surrogates, huge and non-finite numbers, naive,
far-past and far-future timestamps, unknown fields. The main test checks that at least
100,000 inputs went through the comparison (400 draws of 6-10 inputs, each expanded to 250
by crossing: one field of one input in another). The comparisons run at one instant each,
so the future-time limit (read from the clock by the validator both paths share) cannot
make them disagree.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from meterstream.producers import backfill
from meterstream.producers import client as sdk
from meterstream.producers.client import _wire_many
from meterstream.schemas.events import Attribution, Meter, OutcomeEvent, UsageEvent

COUNT = {"inputs": 0, "valid": 0}
#: The instant every comparison runs at: the clock is stopped there for each test (below), so the
#: future-time limit reads the same "now" in both paths however long the run takes, and on any day
#: (the fixed timestamps here, 2026-11-27, and test_engine.py's, 2026-03, are before it).
NOW = datetime(2026, 12, 1, 12, 30, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def _clock_stopped_at_now() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield

ids = st.one_of(
    st.sampled_from(["acme", "cust-0001", "a.b:c@d/e-f", "gpt-4o", "x" * 128]),
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@/\-]{0,20}\Z"),
)
hostile_text = st.one_of(
    st.text(max_size=40),  # lone surrogates included (not valid UTF-8)
    st.sampled_from(["", " ", "x" * 129, "x" * 300, "a b", "\x00", "é", "\ud800", "-lead", "😀" * 70]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    hostile_text, st.binary(max_size=20), st.sampled_from([b"\xff\xfe", b"\xc3\x28", 2**63, -(2**63) - 1, 2**64]),
)  # fmt: skip
nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
                      max_leaves=8)  # fmt: skip
times = st.one_of(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(timezone.utc)),
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.timezones()),
    st.datetimes(),  # naive
    st.sampled_from([NOW, NOW + timedelta(minutes=4), NOW + timedelta(minutes=6), NOW + timedelta(days=3650),
                     NOW + timedelta(minutes=5), NOW + timedelta(minutes=5, microseconds=1), NOW - timedelta(microseconds=1),
                     datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(1999, 12, 31, 23, 59, 59, 999999, timezone.utc),
                     NOW.replace(tzinfo=timezone(timedelta(0), "UTC")), NOW.astimezone(timezone(timedelta(hours=2))),
                     "2026-11-27T10:15:00Z", "2026-11-27T10:15:00.123Z", "2026-11-27T10:15:00+05:30",
                     "2026-11-27T10:15:00.123456Z", "2026-11-27T10:15:00.000000Z", "2026-11-27T10:15:00.120000Z",
                     "2026-11-27T10:15:00.12345Z", "2026-11-27T10:15:00.1234567Z",
                     "2026-11-27T10:15:00", "1999-12-31T23:59:59Z", "9999-12-31T23:59:59Z", "2026-02-30T00:00:00Z",
                     "0001-01-01T00:30:00+01:00", 1764000000, 1.5e9, True]),
    hostile_text,
)
attribute_values = st.one_of(st.text(max_size=20), st.booleans(), st.integers(-(10**25), 10**25),
                             st.sampled_from(["x" * 257, "\ud83d", "\x7f\u2028\"\\/"]), nested)  # fmt: skip
attributes = st.one_of(
    st.dictionaries(st.text(min_size=0, max_size=70), attribute_values, max_size=5),
    st.just({f"k{i}": i for i in range(33)}),
    nested,
)
counts = st.one_of(st.integers(0, 5000), st.integers(-5, 10**9), st.sampled_from([True, "12", 1.0, 10**20]), nested)
quantities = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True), st.floats(), st.integers(-10, 10**13),
    st.sampled_from(["1", "0.5", "1e3", "1E+3", "-1", "abc", "0.0000000001", "1" * 30, True]), nested,
    st.integers(0, 10**12 + 1).map(Decimal),  # Python callers' Decimals: plain digits, and around the limit
    st.sampled_from([Decimal("40"), Decimal("40.0"), Decimal("4E+1"), Decimal("-0"), Decimal("0"), Decimal("007"),
                     Decimal(10**12), Decimal(10**12 + 1), Decimal("1e12"), Decimal("12.000000000")]),
)  # fmt: skip

common = {"event_id": ids, "customer_id": ids, "occurred_at": times}
optional_common = {"workflow_id": st.one_of(ids, hostile_text, nested), "run_id": ids, "attributes": attributes,
                   "schema_version": st.sampled_from([1, 2, "1"]), "unexpected": scalars}  # fmt: skip
token_event = st.fixed_dictionaries(
    {**common, "model": ids, "input_tokens": st.integers(0, 5000), "output_tokens": st.integers(0, 5000)},
    optional={**optional_common, "cached_input_tokens": st.integers(0, 6000), "provider": ids,
              "meter": st.sampled_from(["tokens", "requests", "nope", Meter.TOKENS, Meter.SEATS, Attribution.AI_ONLY]),
              "quantity": quantities, "type": st.just("usage")},
)  # fmt: skip
quantity_event = st.fixed_dictionaries(
    {**common, "meter": st.sampled_from(["requests", "actions", "documents", "seats", Meter.DOCUMENTS, Meter.SEATS]),
     "quantity": quantities},
    optional={**optional_common, "unit": st.one_of(st.sampled_from(["page", "x" * 33]), hostile_text),
              "input_tokens": counts, "model": ids},
)  # fmt: skip
outcome_event = st.fixed_dictionaries(
    {**common, "type": st.just("outcome"), "outcome_type": ids,
     "attribution": st.sampled_from(["ai_only", "human_assisted", "robot", Attribution.HUMAN_ASSISTED, Meter.TOKENS])},
    optional={**optional_common, "reversal_of": st.one_of(ids, hostile_text), "model": ids},
)  # fmt: skip
anything = st.dictionaries(st.sampled_from(list(UsageEvent.model_fields) + ["type", "bogus"]), nested, max_size=8)
inputs = st.one_of(token_event, token_event, quantity_event, outcome_event, anything)


def oracle(fields: dict[str, Any]) -> UsageEvent | OutcomeEvent | ValidationError:
    """The old per-event path: the model built alone."""
    model = OutcomeEvent if fields.get("type") == "outcome" else UsageEvent
    try:
        return model(**fields)
    except ValidationError as exc:
        return exc


def _errors(exc: ValidationError) -> list[tuple[Any, ...]]:
    return [(e["type"], e["loc"], e["msg"], repr(e["input"])) for e in exc.errors(include_url=False)]


def pydantic_wire(event: UsageEvent | OutcomeEvent) -> bytes:
    return event.__pydantic_serializer__.to_json(event, exclude_none=True)


def with_defaults(fields: dict[str, Any]) -> dict[str, Any]:
    """What record_usage fills in (a new id, now), fixed here so both paths see the same fields."""
    out = dict(fields)
    out.setdefault("event_id", "fuzz-default-id")
    out.setdefault("occurred_at", NOW)
    return out


def crossed(drawn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The drawn inputs, then each with one field taken from another (a hostile value in an
    otherwise valid event, or the reverse), 250 in all: many inputs per draw (drawing is the slow part)."""
    out = list(drawn)
    pairs = [(a, b, key) for a in drawn for b in drawn if a is not b for key in b]
    step = max(1, len(pairs) // 250)
    for a, b, key in pairs[::step]:
        out.append({**a, key: b[key]})
    while len(out) < 250:
        out.extend(out[: 250 - len(out)])
    return out[:250]


def sent_by_record(event: UsageEvent | OutcomeEvent) -> tuple[bool, bytes, bytes]:
    """What ``record(event)`` produced before: topic kind, key, pydantic's wire bytes."""
    return type(event) is OutcomeEvent, event.customer_id.encode(), pydantic_wire(event)


def unwritable(event: UsageEvent | OutcomeEvent) -> str | None:
    """pydantic's error when it cannot write the event (a lone surrogate in an attribute), else None.

    The models accept such a str; ``record(event)`` then raised this error, and so must
    ``record_many`` (the same exception and text), and ``wire_bytes``.
    """
    try:
        pydantic_wire(event)
    except PydanticSerializationError as exc:
        return str(exc)
    return None


def check_one(fields: dict[str, Any]) -> UsageEvent | OutcomeEvent | ValidationError:
    expected = oracle(fields)
    if not isinstance(expected, ValidationError) and (error := unwritable(expected)) is not None:
        with pytest.raises(PydanticSerializationError) as caught:
            _wire_many([fields])
        assert str(caught.value) == error
        with pytest.raises(PydanticSerializationError):
            expected.wire_bytes()
        return expected
    try:
        [got] = _wire_many([fields])
    except ValidationError as exc:
        assert isinstance(expected, ValidationError), f"record_many refused what the model accepts: {exc}"
        assert str(exc) == str(expected)
        assert _errors(exc) == _errors(expected)
        return expected
    assert not isinstance(expected, ValidationError), f"record_many accepted what the model refuses: {expected}"
    assert got == sent_by_record(expected)
    return expected


@settings(max_examples=int(os.environ.get("INGEST_FUZZ_BATCHES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(drawn=st.lists(inputs, min_size=6, max_size=10))
def _differential(drawn: list[dict[str, Any]]) -> None:
    batch = [with_defaults(fields) for fields in crossed(drawn)]
    results = [check_one(fields) for fields in batch]
    COUNT["inputs"] += len(batch)
    COUNT["valid"] += sum(not isinstance(r, ValidationError) for r in results)
    # The whole batch at once: accepted iff every item is (the same messages, in order), else
    # the error of the first invalid item in batch order.
    first_bad = next((r for r in results if isinstance(r, ValidationError)), None)
    first_unwritable = next((e for r in results if not isinstance(r, ValidationError)
                             and (e := unwritable(r)) is not None), None)  # fmt: skip
    try:
        got = _wire_many(batch)
    except ValidationError as exc:
        assert first_bad is not None
        assert str(exc) == str(first_bad)
        return
    except PydanticSerializationError as exc:
        assert first_bad is None and str(exc) == first_unwritable
        return
    assert first_bad is None and first_unwritable is None
    assert got == [sent_by_record(r) for r in results]  # type: ignore[arg-type]


@pytest.mark.timeout(1200)  # 100,000 inputs: 7 min at a load average of ~10 on 2 cores
def test_record_many_agrees_with_the_models_on_generated_and_hostile_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every item goes through the column-wise check (key layouts of any size, single items
    included), counted: the comparison is about the fast path as much as the model path."""
    from meterstream.schemas import columnar

    real = columnar.accept
    fast = {"offered": 0, "accepted": 0}

    def counted(columns: Any, n: int, **kw: Any) -> Any:
        got = real(columns, n, **kw)
        fast["offered"] += n
        fast["accepted"] += len(got.rows)
        return got

    monkeypatch.setattr(sdk, "_MIN_GROUP", 1)
    monkeypatch.setattr(sdk.columnar, "accept", counted)
    COUNT.update(inputs=0, valid=0)
    _differential()
    assert COUNT["inputs"] >= min(100_000, 250 * int(os.environ.get("INGEST_FUZZ_BATCHES", "400"))), COUNT
    assert fast["offered"] >= COUNT["inputs"], (fast, COUNT)
    # the fast path accepted a good share of the valid inputs (the rest: the model's, e.g. mixed columns)
    assert fast["accepted"] >= COUNT["valid"] // 3, (fast, COUNT)


def test_record_many_sends_python_values_through_the_columns_as_the_models_would() -> None:
    """Field dicts as an application builds them (UTC datetimes with microseconds, Decimal quantities,
    enum members, defaults filled in): all accepted column-wise, the bytes and order of ``record``."""
    from meterstream.schemas import columnar

    rows: list[dict[str, Any]] = []
    for i in range(60):
        at = NOW - timedelta(seconds=i, microseconds=i * 997)
        if i % 3 == 0:
            rows.append({"event_id": f"t{i}", "customer_id": f"c{i % 7}", "occurred_at": at, "model": "gpt-4o",
                         "input_tokens": i, "cached_input_tokens": i // 2, "output_tokens": 3,
                         "attributes": {"feature": "triage", "n": i, "b": True}})  # fmt: skip
        elif i % 3 == 1:
            rows.append({"event_id": f"d{i}", "customer_id": f"c{i % 7}", "occurred_at": at, "meter": Meter.DOCUMENTS,
                         "quantity": Decimal(i + 1), "unit": "page"})  # fmt: skip
        else:
            rows.append({"event_id": f"o{i}", "customer_id": f"c{i % 7}", "occurred_at": at, "type": "outcome",
                         "outcome_type": "resolved_ticket", "attribution": Attribution.AI_ONLY})  # fmt: skip
    rows += [{"customer_id": "acme", "model": "gpt-4o", "input_tokens": 1}] * 20  # event_id and occurred_at filled in
    with pytest.MonkeyPatch.context() as patch:
        accepted = []
        real = columnar.accept
        patch.setattr(sdk.columnar, "accept", lambda c, n, **kw: accepted.append(got := real(c, n, **kw)) or got)
        sent = _wire_many(rows)
    assert sum(len(got.rows) for got in accepted) == len(rows)
    assert sent[:60] == [sent_by_record(oracle(r)) for r in rows[:60]]  # type: ignore[arg-type]
    for (_, key, value) in sent[60:]:
        event = UsageEvent.model_validate_json(value)
        assert key == b"acme" and event.occurred_at == NOW and sent_by_record(event)[2] == value


def test_record_many_fills_in_a_new_id_and_now_like_record_usage() -> None:
    before = datetime.now(timezone.utc)
    (_, _, first_wire), (_, _, second_wire) = _wire_many([{"customer_id": "acme", "model": "gpt-4o", "input_tokens": 1},
                                    {"customer_id": "acme", "model": "gpt-4o", "input_tokens": 1}])  # fmt: skip
    first, second = UsageEvent.model_validate_json(first_wire), UsageEvent.model_validate_json(second_wire)
    assert first.event_id != second.event_id
    assert before <= first.occurred_at <= datetime.now(timezone.utc)
    given_at = {"customer_id": "acme", "type": "outcome", "outcome_type": "x", "attribution": "ai_only",
                "event_id": "e-1", "occurred_at": "2026-11-27T10:15:00Z"}  # fmt: skip
    assert _wire_many([given_at]) == [sent_by_record(OutcomeEvent(**given_at))]


def test_record_many_reports_the_first_invalid_item_with_its_position() -> None:
    good = {"customer_id": "acme", "model": "gpt-4o", "input_tokens": 1}
    bad = {"customer_id": "acme", "model": "gpt-4o", "input_tokens": "12"}
    with pytest.raises(ValidationError) as caught:
        _wire_many([good, good, bad, good])
    alone = oracle({**bad, "event_id": "e", "occurred_at": NOW})
    assert str(caught.value) == str(alone)
    assert "item 2 of the batch" in " ".join(caught.value.__notes__)
    # the first invalid item in batch order, whichever key layout (column group) it is in
    goods = [{**good, "event_id": f"e{i}", "occurred_at": NOW} for i in range(20)]
    batch: list[Any] = [*goods[:3], {"type": "outcome", "event_id": "o", "occurred_at": NOW}, *goods[3:]]
    batch[6] = {**batch[6], "input_tokens": "12"}
    with pytest.raises(ValidationError) as caught:
        _wire_many(batch)
    assert str(caught.value) == str(oracle(batch[3]))
    assert "item 3 of the batch" in " ".join(caught.value.__notes__)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=st.lists(st.one_of(token_event, quantity_event, outcome_event), min_size=1, max_size=30))
def test_csv_import_spools_the_bytes_the_old_send_produced(tmp_path_factory: pytest.TempPathFactory,
                                                           rows: list[dict[str, Any]]) -> None:  # fmt: skip
    path = tmp_path_factory.mktemp("csv") / "events.csv"
    columns = sorted({k for r in rows for k in r})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(v) for k, v in r.items()})
    try:
        path.write_text(buffer.getvalue(), encoding="utf-8")
    except UnicodeEncodeError:
        return  # a lone surrogate cannot be written to a UTF-8 file
    try:
        scanned = backfill.scan(path, "csv")
    except (UnicodeDecodeError, ValueError):
        return
    skip = scanned.bad_lines | scanned.repeated_lines
    # The old send: validate every row again and write its wire bytes with pydantic.
    old = [pydantic_wire(item) for number, item in backfill.iter_events(path, "csv")
           if number not in skip and not isinstance(item, backfill.BadRecord)]  # fmt: skip
    assert [value for _, _, _, value in scanned.spooled()] == old
    assert len(old) == scanned.valid
    scanned.discard_spool()


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return _time_text(value)
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value, default=str)
    if isinstance(value, (bytes, Decimal)):
        return str(value)
    return "" if value is None else str(value)


# -- meterstream import: the column-wise scan against the per-event scan ------------------------------
#
# ``backfill.scan`` validates as columns (``meterstream.schemas.columnar``: fast accept of the rows it
# can prove valid, everything else through the model); ``scan(columns=False)`` is the per-event path
# (every record through the model, as before). For every file both must give the same records, bad
# lines with the same reasons, repeats, periods, customers, first and last instants, and for CSV and
# Parquet the same spooled wire bytes, which are those pydantic writes for each valid first-seen record.
# For JSON Lines the lines are sent as written, so equal verdicts mean equal messages.

FAST = {"offered": 0, "accepted": 0}

#: Lines no generator writes: repeated keys, spacing, numbers and timestamps in odd forms, not objects.
HOSTILE_LINES = [
    b'{"event_id":"d1","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","input_tokens":"x","input_tokens":3}',
    b'{"event_id":"d2","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","input_tokens":3,"input_tokens":"x"}',
    b'{"event_id":"d3","event_id":"d3b","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m"}',
    b'{ "event_id" : "s1", "customer_id": "acme",\t"occurred_at": "2026-11-27T10:15:00.000Z", "model": "m" }',
    b'{"event_id":"n1","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","input_tokens":1.0}',
    b'{"event_id":"n2","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","input_tokens":1e2}',
    b'{"event_id":"n3","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","input_tokens":-0}',
    b'{"event_id":"n4","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","input_tokens":18446744073709551616}',
    b'{"event_id":"n5","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","meter":"seats","quantity":NaN}',
    b'{"event_id":"n6","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","meter":"seats","quantity":"007"}',
    b'{"event_id":"n7","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","meter":"seats","quantity":"12"}',
    b'{"event_id":"t1","customer_id":"acme","occurred_at":"2026-11-27T10:15:00+00:00","model":"m"}',
    b'{"event_id":"t2","customer_id":"acme","occurred_at":"2026-11-27T10:15:00.123456Z","model":"m"}',
    b'{"event_id":"t3","customer_id":"acme","occurred_at":"2026-11-27t10:15:00z","model":"m"}',
    b'{"event_id":"t4","customer_id":"acme","occurred_at":"2026-11-27T23:59:60Z","model":"m"}',
    b'{"event_id":"t5","customer_id":"acme","occurred_at":"2026-02-29T10:15:00Z","model":"m"}',
    b'{"event_id":"t6","customer_id":"acme","occurred_at":"\\u0032026-11-27T10:15:00Z","model":"m"}',
    b'{"event_id":"t7","customer_id":"acme","occurred_at":"2026-11-27T10:15:00.000Z","model":"m"}',
    b'{"event_id":"t8","customer_id":"acme","occurred_at":"1999-12-31T23:59:59.999Z","model":"m"}',
    b'{"event_id":"u1","customer_id":"ac\\u006de","occurred_at":"2026-11-27T10:15:00Z","model":"m"}',
    b'{"event_id":"u2","customer_id":"acme\\n","occurred_at":"2026-11-27T10:15:00Z","model":"m"}',
    b'{"event_id":"u3","customer_id":"\xff\xfe","occurred_at":"2026-11-27T10:15:00Z","model":"m"}',
    b'{"event_id":"u4","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","attributes":{"a":"\\ud800"}}',
    b'{"event_id":"u5","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","attributes":{"a":1,"a":"x"}}',
    b'{"event_id":"u6","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","attributes":{"k/\\"q":"v"}}',
    b'{"event_id":"o1","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","type":"outcome","outcome_type":"t","attribution":"ai_only"}',
    b'{"event_id":"o2","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","outcome_type":"t","attribution":"ai_only","workflow_id":"type"}',
    b'{"event_id":"o3","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"outcome","attributes":{"type":"x"}}',
    b'{"event_id":"z1","customer_id":"acme","occurred_at":null,"model":"m"}',
    b'{"event_id":"z2","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","meter":null}',
    b'{"event_id":"z3","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","attributes":null}',
    b'{"event_id":"z4","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","schema_version":true}',
    *[b'{"event_id":"f%d","customer_id":"acme","occurred_at":"%s","model":"m"}' % (i, at.encode()) for i, at in enumerate(
        f"{(NOW + delta).strftime('%Y-%m-%dT%H:%M:%S')}{fraction}Z" for delta in
        (timedelta(minutes=4, seconds=59), timedelta(minutes=5), timedelta(minutes=5, seconds=1), timedelta(days=1))
        for fraction in ("", ".001"))],  # around the future-time limit, on the fast path's form
    b'[1, 2]', b'"just a string"', b"42", b"{", b'{"event_id":"x"} trailing', b"\xef\xbb\xbf{}", b"   ", b"",
    b'{"event_id":"big","customer_id":"acme","occurred_at":"2026-11-27T10:15:00Z","model":"m","attributes":{"k":"'
    + b"x" * 70_000 + b'"}}',
]


def _time_text(value: datetime) -> str:
    """Mostly the canonical UTC forms the fast path takes (...:SSZ, ...:SS.mmmZ, ...:SS.ffffffZ), else isoformat."""
    if value.tzinfo is not None and value.utcoffset() == timedelta(0) and value.microsecond % 7:
        at = value.strftime("%Y-%m-%dT%H:%M:%S")
        if value.microsecond % 3 == 0:
            return at + f".{value.microsecond:06d}Z"  # what the SDK writes
        return at + (f".{value.microsecond // 1000:03d}Z" if value.microsecond % 2 else "Z")
    return value.isoformat()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _time_text(value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, Decimal):
        return str(value) if not value.is_finite() else float(value) if "." in str(value) else int(value)
    raise TypeError(type(value))


def _jsonl_line(fields: dict[str, Any], style: int) -> bytes:
    import json

    if style == 0:
        return json.dumps(fields, default=_json_default, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if style == 1:
        return json.dumps(fields, default=_json_default, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(fields, default=_json_default).encode()


def _scans_agree(path: Any, fmt: str) -> int:
    """The column-wise scan and the per-event scan of ``path`` agree in everything the import uses (valid records)."""
    try:
        old = backfill.scan(path, fmt, columns=False, workers=1)  # type: ignore[arg-type]
    except Exception as exc:  # an unreadable file: the column-wise scan fails the same way
        with pytest.raises(type(exc)):
            backfill.scan(path, fmt, workers=1)  # type: ignore[arg-type]
        return 0
    new = backfill.scan(path, fmt, workers=1)  # type: ignore[arg-type]
    try:
        assert (new.records, new.valid) == (old.records, old.valid)
        assert [(b.line, b.reason) for b in new.bad] == [(b.line, b.reason) for b in old.bad]
        assert new.repeated_lines == old.repeated_lines
        assert dict(new.customers_by_period) == dict(old.customers_by_period)
        assert (new.first_at, new.last_at) == (old.first_at, old.last_at)
        if new.first_at is not None:
            assert new.first_at.tzinfo is old.first_at.tzinfo  # type: ignore[union-attr]
        # the messages the send produces: (customer key, event id, topic kind, value), in order
        assert list(new.spooled()) == _messages(old)
    finally:
        new.discard_spool()
        old.discard_spool()
    return old.valid


def _messages(scanned: backfill.Scan) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """What the send produces for a per-event scan: its spool (CSV, Parquet: the model's wire bytes),
    or for JSON Lines the valid first-seen lines as written, routed as the send routed them before
    (``customer_id`` and ``type`` read back with orjson)."""
    if scanned.spools:
        return list(scanned.spooled())
    import orjson

    skip, out = scanned.bad_lines | scanned.repeated_lines, []
    for number, raw in enumerate(scanned.path.read_bytes().split(b"\n"), 1):
        raw = raw.strip()
        if raw and number not in skip:
            obj = orjson.loads(raw)
            kind = b"o" if obj.get("type") == "outcome" else b"u"
            out.append((obj["customer_id"].encode(), obj["event_id"].encode(), kind, raw))
    return out


@pytest.fixture
def count_fast_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Every key layout of a JSON Lines file goes to the column-wise check (not only groups of 16+), counted."""
    from meterstream.schemas import columnar

    real = columnar.accept

    def counted(columns: Any, n: int, **kw: Any) -> Any:
        got = real(columns, n, **kw)
        FAST["offered"] += n
        FAST["accepted"] += len(got.rows)
        return got

    monkeypatch.setattr(backfill, "_MIN_GROUP", 1)
    monkeypatch.setattr(backfill.columnar, "accept", counted)
    FAST.update(offered=0, accepted=0)
    yield FAST


def _rows_for_files(drawn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = crossed(drawn)
    # repeats of an earlier (customer_id, event_id), some with another time: sent once, the first
    return rows + [dict(rows[i], occurred_at="2026-11-27T10:15:00Z") for i in range(0, len(rows), 37)]


FILE_DRAWS = int(os.environ.get("INGEST_FUZZ_FILE_BATCHES", "400"))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_import_scan_as_columns_agrees_with_the_per_event_scan(fmt: str, tmp_path_factory: pytest.TempPathFactory,
                                                               count_fast_path: dict[str, int]) -> None:  # fmt: skip
    total = {"records": 0, "valid": 0}

    @settings(max_examples=FILE_DRAWS, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(drawn=st.lists(inputs, min_size=6, max_size=10), style=st.integers(0, 2), hostile=st.booleans())
    def run(drawn: list[dict[str, Any]], style: int, hostile: bool) -> None:
        rows = _rows_for_files(drawn)
        path = tmp_path_factory.mktemp(fmt) / f"events.{fmt}"
        if fmt == "jsonl":
            lines = []
            for r in rows:
                try:
                    lines.append(_jsonl_line(r, style))
                except (TypeError, ValueError):
                    lines.append(repr(r).encode("utf-8", "surrogatepass"))
            if hostile:
                lines[3:3] = HOSTILE_LINES
            path.write_bytes(b"\n".join(lines) + b"\n")
        elif fmt == "csv":
            columns = sorted({k for r in rows for k in r})
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(columns)
            for i, r in enumerate(rows):
                cells = [_cell(r.get(k)) for k in columns]
                if hostile and i % 50 == 7:
                    cells = cells + ["extra"] if i % 100 == 7 else cells[:-1]  # too many, too few cells
                writer.writerow(cells)
                if hostile and i % 60 == 5:
                    buffer.write("\r\n")  # a blank line
            path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            columns = sorted({k for r in rows for k in r})
            arrays = {}
            for k in columns:
                values = [r.get(k) for r in rows]
                try:
                    arrays[k] = pa.array(values) if not hostile else pa.array([_cell(v) or None for v in values])
                except (pa.ArrowException, TypeError, ValueError, OverflowError):
                    arrays[k] = pa.array([_cell(v).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                                          if v is not None else None for v in values])  # fmt: skip
            try:
                pq.write_table(pa.table(arrays), path)
            except pa.ArrowException:  # e.g. an empty struct: the same cells as text
                pq.write_table(pa.table({k: pa.array([None if v is None else _cell(v).encode("utf-8", "surrogatepass")
                                                      .decode("utf-8", "replace") for v in (r.get(k) for r in rows)],
                                                     pa.string()) for k in columns}), path)  # fmt: skip
        total["valid"] += _scans_agree(path, fmt)
        total["records"] += len(rows)

    run()
    assert total["records"] >= min(100_000, 250 * FILE_DRAWS), total
    # the comparison is about the fast path: it accepted a good share of the valid records
    assert count_fast_path["accepted"] >= total["valid"] // 3, (count_fast_path, total)


def test_the_fast_path_writes_what_pydantic_writes_for_every_shape_it_accepts() -> None:
    """Accepted rows of each shape (optional fields present or not, .000/.123/.123456 fractions, attributes,
    quantities, outcomes) carry exactly the model's ``wire_bytes()``."""
    from meterstream.schemas import columnar

    rows = [
        {"event_id": "e1", "customer_id": "acme", "occurred_at": "2026-11-27T10:15:00Z", "model": "gpt-4o",
         "input_tokens": 5, "output_tokens": 2, "cached_input_tokens": 1, "workflow_id": "w", "provider": "openai"},
        {"event_id": "e2", "customer_id": "acme", "occurred_at": "2026-11-27T10:15:00.000Z", "model": "gpt-4o",
         "run_id": "r", "attributes": {"k": "v", "n": -3, "b": True}, "unit": "tok", "quantity": 0},
        {"event_id": "e3", "customer_id": "b", "occurred_at": "2026-11-27T10:15:00.120Z", "meter": "seats",
         "quantity": "12", "unit": "seat"},
        {"event_id": "e4", "customer_id": "b", "occurred_at": "2026-11-27T10:15:00Z", "meter": "pages"
         if False else "documents", "quantity": 10**12 - 1, "schema_version": 1, "type": "usage"},
        {"event_id": "e5", "customer_id": "c", "occurred_at": "2026-11-27T10:15:00Z", "type": "outcome",
         "outcome_type": "ticket", "attribution": "human_assisted", "reversal_of": "e0"},
        {"event_id": "e6", "customer_id": "c", "occurred_at": "2026-11-27T10:15:00.123456Z", "model": "m"},
        {"event_id": "e7", "customer_id": "c", "occurred_at": "2026-11-27T10:15:00.000000Z", "model": "m"},
        {"event_id": "e8", "customer_id": "c", "occurred_at": "2026-11-27T10:15:00.100000Z", "model": "m"},
    ]  # fmt: skip
    names = sorted({k for r in rows for k in r})
    columns = {k: [r.get(k) for r in rows] for k in names}
    got = columnar.accept(columns, len(rows), none_is_absent=True, now=NOW, wire=True)
    assert got.rows == list(range(len(rows)))
    assert got.wire == [oracle(r).wire_bytes() for r in rows]  # type: ignore[union-attr]
    assert got.occurred_at == [oracle(r).occurred_at for r in rows]  # type: ignore[union-attr]


def test_the_fast_path_reads_the_future_limit_from_the_clock_the_model_reads(tmp_path: Any) -> None:
    """At the stopped clock NOW: 5 minutes ahead is accepted, a millisecond more is the model's rejection."""
    rows = [{"event_id": f"e{i}", "customer_id": "acme", "model": "m", "occurred_at": at}
            for i, at in enumerate([(NOW + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                    (NOW + timedelta(minutes=5, milliseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"]
                                   * 10)]  # fmt: skip
    path = tmp_path / "future.jsonl"
    path.write_bytes(b"".join(orjson_dumps(r) + b"\n" for r in rows))
    scanned = backfill.scan(path, "jsonl", workers=1)
    assert scanned.valid == 10
    assert [b.line for b in scanned.bad] == list(range(2, 21, 2))
    assert "in the future" in scanned.bad[0].reason
    _scans_agree(path, "jsonl")


def orjson_dumps(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.one_of(ids, hostile_text, st.sampled_from(["2026-11-27T10:15:00Z", "2026-11-27T10:15:00.123Z",
                                                                     "007", "12", "0", "a\nb", "x" * 128, "page"])),
                       min_size=1, max_size=30))  # fmt: skip
def test_small_columns_are_matched_by_python_re_as_by_re2(values: list[str]) -> None:
    """Columns under ``_RE2_FROM`` values are matched with Python's ``re`` (RE2 through Arrow compiles the
    pattern per call): both engines give the same verdicts for every pattern of the rule."""
    from meterstream.schemas import columnar

    patterns = [columnar._IDENTIFIER, columnar._CANONICAL_UTC, columnar._QUANTITY_DIGITS, columnar._PLAIN_UNIT]
    values = [v for v in values if not any("\ud800" <= c <= "\udfff" for c in v)]  # Arrow needs UTF-8
    if not values:
        return
    with pytest.MonkeyPatch.context() as patch:
        python = [(columnar._all_match(values, p), columnar._each_match(values, p)) for p in patterns]
        patch.setattr(columnar, "_RE2_FROM", 0)
        re2 = [(columnar._all_match(values, p), columnar._each_match(values, p)) for p in patterns]
    assert python == re2
