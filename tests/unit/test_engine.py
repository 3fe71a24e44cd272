"""The batch engine against the per-event code it replaced, which stays as the oracle.

- **Rating** (meterstream/pricing/engine.py): ``rate_rows`` over a batch prices every event
  exactly as ``rate_event`` does one at a time, to the last of the store's 18 digits (the
  oracle's Decimal computed without rounding, then cut toward zero at 18 digits as the store
  cuts it), with the same rule, provider, price book version and period, and the same
  error for an event the book has no price for. Price books are generated with rates of up to
  20 fractional digits, token counts up to the schema's limit, quantities with 9 decimals.
- **Decoding** (meterstream/stream_processors/decode.py): ``decode_batch`` over a batch of
  message values gives, message by message, the verdict of ``decode_event``: the same events
  accepted (as the engine's rows) and the same rejection text, for generated and hostile
  values (tests/unit/test_ingest_fuzz.py's generators: oversized, nested, binary, non-UTF-8,
  far-future, wrong topic), written by other JSON writers (compact, spaced, non-ASCII), with
  broker timestamps before, at and after the event.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import ROUND_DOWN, Context, Decimal, localcontext
from typing import Any

import orjson
import pytest
import time_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterstream.pricing.engine import SCALE, EventRow, RatedBatch, money, rate_rows, row_of, units
from meterstream.pricing.plans import load_catalog, parse_catalog
from meterstream.pricing.pricebook import PriceBook
from meterstream.pricing.rating import RatingError, rate_event
from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.stream_processors.decode import (
    MAX_EVENT_BYTES,
    Rejection,
    decode_batch,
    decode_event,
    received_at,
)
from tests.unit.test_ingest_fuzz import NOW, crossed, inputs, with_defaults
from tests.unit.test_ingest_fuzz import _jsonl_line as jsonl_line

T0 = datetime(2026, 3, 14, 9, 26, 53, 589793, tzinfo=timezone.utc)
EXACT = Context(prec=200)


@pytest.fixture(autouse=True)
def _clock_stopped_at_now() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield


# -- rating ------------------------------------------------------------------------------------

rates = st.decimals(min_value=0, max_value=1000, allow_nan=False, allow_infinity=False, places=None).map(
    lambda d: d.quantize(Decimal(1).scaleb(-20), rounding=ROUND_DOWN).normalize()
) | st.sampled_from([Decimal("0"), Decimal("0.25"), Decimal("2.50"), Decimal("0.000000000000000001"),
                     Decimal("0.00000000000000000123"), Decimal("1E+2"), Decimal("999.99999999999999999999")])  # fmt: skip
token_rates = st.fixed_dictionaries({"input": rates, "output": rates}, optional={"cached_input": rates})
book_data = st.fixed_dictionaries({
    "version": st.just("gen-1"),
    "models": st.dictionaries(st.sampled_from(["m1", "m2", "m3"]), st.fixed_dictionaries({
        "provider": st.sampled_from(["openai", "anthropic"]), "credits_per_1k": token_rates, "cost_per_1m": token_rates,
    }), max_size=3),
    "meters": st.dictionaries(st.sampled_from(["requests", "documents", "seats"]),
                              st.fixed_dictionaries({"credits_per_unit": rates, "cost_per_unit": rates}), max_size=3),
    "outcomes": st.dictionaries(st.sampled_from(["ticket", "lead"]), st.fixed_dictionaries(
        {"ai_only": rates, "human_assisted": rates, "cost_per_outcome": rates}), max_size=2),
})  # fmt: skip


@st.composite
def events(draw: st.DrawFn) -> UsageEvent | OutcomeEvent:
    common = {"event_id": draw(st.sampled_from(["e1", "e2", "e3"])), "customer_id": "acme", "occurred_at": T0,
              "run_id": draw(st.none() | st.just("run-1"))}  # fmt: skip
    kind = draw(st.sampled_from(["tokens", "meter", "outcome"]))
    if kind == "tokens":
        tokens = st.integers(0, 100_000_000)
        inp = draw(tokens)
        return UsageEvent(**common, model=draw(st.sampled_from(["m1", "m2", "m3", "m4"])), input_tokens=inp,
                          cached_input_tokens=draw(st.integers(0, inp)), output_tokens=draw(tokens),
                          provider=draw(st.none() | st.just("azure")))  # fmt: skip
    if kind == "meter":
        quantity = draw(st.decimals(min_value=Decimal("0.000000001"), max_value=Decimal("1e12"), places=9))
        return UsageEvent(**common, meter=draw(st.sampled_from(["requests", "documents", "seats", "actions"])),
                          quantity=quantity)  # fmt: skip
    return OutcomeEvent(**common, outcome_type=draw(st.sampled_from(["ticket", "lead", "other"])),
                        attribution=draw(st.sampled_from(["ai_only", "human_assisted"])),
                        reversal_of=draw(st.none() | st.just("e0")))  # fmt: skip


def cut(amount: Decimal) -> int:
    """The oracle's amount as the store holds it: 10**-18 units, cut toward zero."""
    with localcontext(EXACT):
        return int((amount * SCALE).to_integral_value(rounding=ROUND_DOWN))


def exact_oracle(event: UsageEvent | OutcomeEvent, book: PriceBook) -> Any:
    """``rate_event`` with Decimal arithmetic that does not round (the default context rounds at 28 digits)."""
    with localcontext(EXACT):
        try:
            return rate_event(event, book)
        except RatingError as exc:
            return exc


@settings(max_examples=int(os.environ.get("ENGINE_FUZZ_BATCHES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=book_data, batch=st.lists(events(), min_size=1, max_size=30))
def test_the_engine_prices_a_batch_as_the_per_event_oracle_to_the_last_digit(data: dict[str, Any],
                                                                              batch: list[Any]) -> None:  # fmt: skip
    book = PriceBook.model_validate(data)
    rating = rate_rows([row_of(e) for e in batch], lambda customer, at: (book, f"{at:%Y-%m}"))
    for j, event in enumerate(batch):
        expected = exact_oracle(event, book)
        if isinstance(expected, RatingError):
            assert isinstance(rating.errors[j], RatingError)
            assert str(rating.errors[j]) == str(expected)
            continue
        assert rating.errors[j] is None
        assert rating.rated.credits[j] == cut(expected.credits), (event, expected.credits)
        assert rating.rated.cost[j] == cut(expected.cost_to_serve), (event, expected.cost_to_serve)
        got = rating.rated.row(j)
        with localcontext(EXACT):
            truncated = expected.model_copy(update={"credits": money(cut(expected.credits)),
                                                    "cost_to_serve": money(cut(expected.cost_to_serve))})  # fmt: skip
        assert got == truncated


def test_catalog_rate_is_the_engine_for_a_batch_of_one() -> None:
    default_catalog = load_catalog()
    event = UsageEvent(event_id="e", customer_id="acme", occurred_at=T0, model="gpt-4o", input_tokens=1234,
                       cached_input_tokens=1000, output_tokens=56)  # fmt: skip
    book, _ = default_catalog.book_of("acme", T0)
    assert default_catalog.rate(event) == rate_event(event, book)
    with pytest.raises(RatingError, match="no price for model 'nope'"):
        default_catalog.rate(event.model_copy(update={"model": "nope"}))


def _book(version: str, rate: str) -> dict[str, Any]:
    return {"version": version, "models": {"m1": {"provider": "openai", "credits_per_1k": {"input": rate, "output": rate},
                                                   "cost_per_1m": {"input": "1", "output": "1"}}}}  # fmt: skip


def _plan(version: str, effective_from: str, rate: str) -> dict[str, Any]:
    return {"version": version, "effective_from": effective_from, "price_book": _book(f"book-{version}", rate),
            "overage": {"model": "per_unit", "unit_price": "0.01"}}  # fmt: skip


#: A default plan that starts mid-January and changes in mid-March and on 1 April, a listed customer
#: on a plan of its own, one on the default plan billed on anniversary periods, one changing at once.
VERSIONED = {
    "currency": "USD",
    "default_plan": "p",
    "plans": {"p": {"versions": [_plan("p-1", "2026-01-15", "1"), _plan("p-2", "2026-03-15", "2"),
                                 _plan("p-3", "2026-04-01", "3")]},
              "q": {"versions": [_plan("q-1", "2025-06-01", "7")]}},
    "customers": {"listed": {"plan": "q"},
                  "anniv": {"plan": "p", "billing_anchor": "anniversary", "effective_from": "2026-02-10"},
                  "at-once": {"plan": "p", "change_rule": "immediate"}},
}  # fmt: skip
instants = st.datetimes(min_value=datetime(2025, 12, 1), max_value=datetime(2026, 5, 31),
                        timezones=st.sampled_from([timezone.utc, timezone.utc, timezone.utc, timezone(timedelta(hours=2))]))  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(st.tuples(st.sampled_from(["u1", "u2", "listed", "anniv", "at-once"]), instants), max_size=40))
def test_books_found_for_a_whole_batch_are_those_found_row_by_row(batch: list[tuple[str, datetime]]) -> None:
    """Catalog.rate_rows answers unlisted customers' rows a month at a time: the same books, periods,
    prices and errors as asking the catalog row by row, before and after its month caches fill."""
    catalog = parse_catalog(VERSIONED)
    rows = [EventRow("usage", f"e{i}", customer, at, model="m1", input_tokens=1000) for i, (customer, at) in enumerate(batch)]
    expected = rate_rows(rows, catalog._book_finder())
    for _ in range(2):  # the second time, every month this batch touched is cached
        got = catalog.rate_rows(rows)
        assert got.rated == expected.rated
        assert [str(e) if e else None for e in got.errors] == [str(e) if e else None for e in expected.errors]


def test_a_month_one_version_covers_whole_is_answered_at_once() -> None:
    catalog = parse_catalog(VERSIONED)
    april, march = datetime(2026, 4, 3, tzinfo=timezone.utc), datetime(2026, 3, 20, tzinfo=timezone.utc)
    december = datetime(2025, 12, 20, tzinfo=timezone.utc)  # before the plan's first version: no book
    rows = [EventRow("usage", "e", c, at, model="m1") for c in ("u1", "listed") for at in (april, march, december)]
    assert catalog._whole_month_books(rows) == ([None] * 6, [""] * 6)  # nothing cached yet
    rating = catalog.rate_rows(rows)
    assert "no version in effect in 2025-12" in str(rating.errors[2])
    books, periods = catalog._whole_month_books(rows)
    assert [b.version if b else None for b in books] == ["p-3", "p-1", None, None, None, None]
    assert periods == ["2026-04", "2026-03", "", "", "", ""]
    assert catalog.book_of("u1", march)[0].version == "p-1"  # next period: March stays on p-1


@given(st.integers(-(10**37), 10**37))
def test_money_and_units_are_exact_inverses(amount: int) -> None:
    assert units(money(amount)) == amount
    with localcontext(EXACT):  # the default context would round past 28 digits; money does not
        assert money(amount) == Decimal(amount) / SCALE
    # Written the same as the digits of the amount with the trailing zeros dropped (150, 0.0308625).
    whole, fraction = divmod(abs(amount), SCALE)
    digits = f"{fraction:018d}".rstrip("0")
    written = Decimal(f"{'-' if amount < 0 else ''}{whole}.{digits}") if fraction else Decimal(amount // SCALE)
    assert money(amount).as_tuple() == written.as_tuple()


def test_units_cut_toward_zero_as_the_store_does() -> None:
    assert units(Decimal("0.0000000000000000019")) == 1
    assert units(Decimal("-0.0000000000000000019")) == -1
    assert str(money(150 * SCALE)) == "150" and str(money(30862500000000000)) == "0.0308625"


@given(st.lists(st.decimals(min_value=-(10**19), max_value=10**19, allow_nan=False, allow_infinity=False)
                | st.sampled_from([Decimal(0), Decimal(1), Decimal("1.0"), Decimal("2.5000000001"), Decimal("-0.0000000009")]),
                min_size=1, max_size=40))
def test_the_decimal_columns_hold_each_value_cut_toward_zero(values: list[Decimal]) -> None:
    """Quantities go to decimal128(38, 9) as integers: the same as pyarrow's own conversion of the cut value."""
    import pyarrow as pa

    from meterstream.storage.columns import _money, _quantities

    cut = [v.quantize(Decimal(1).scaleb(-9), rounding=ROUND_DOWN, context=EXACT) for v in values]
    assert _quantities(values).equals(pa.array(cut, pa.decimal128(38, 9)))
    assert _quantities(values).to_pylist() == cut
    assert _money([units(v) for v in values]).to_pylist() == [money(units(v)) for v in values]
    with pytest.raises(ValueError, match="not a finite decimal"):
        _quantities([*values, Decimal("NaN")])
    with pytest.raises(ValueError, match="does not fit Decimal"):
        _quantities([*values, Decimal(10) ** 29])


def test_a_rated_batch_is_a_sequence_of_rated_rows() -> None:
    book = PriceBook.model_validate({"version": "v", "models": {"m": {"provider": "p", "credits_per_1k": {
        "input": "1", "output": "2"}, "cost_per_1m": {"input": "3", "output": "4"}}}})  # fmt: skip
    rows = [EventRow("usage", f"e{i}", "acme", T0, model="m", input_tokens=1000 * i) for i in range(3)]
    rated = rate_rows(rows, lambda c, at: (book, "2026-03")).rated
    assert [r.credits for r in rated] == [Decimal(0), Decimal(1), Decimal(2)]
    assert rated[-1].event_id == "e2" and [r.event_id for r in rated[1:]] == ["e1", "e2"]
    assert rated.take([2, 0]) == [rated[2], rated[0]]
    assert RatedBatch.of(list(rated)) == rated


# -- decoding ----------------------------------------------------------------------------------

def oracle_decode(value: bytes | None, kind: str, timestamp_ms: int | None, now: datetime) -> Any:
    decoded = decode_event(value, kind, received_at(timestamp_ms, now))  # type: ignore[arg-type]
    return decoded if isinstance(decoded, Rejection) else row_of(decoded)


COUNT = {"messages": 0, "accepted": 0}


@settings(max_examples=int(os.environ.get("INGEST_FUZZ_BATCHES", "400")) // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(drawn=st.lists(inputs, min_size=6, max_size=10), style=st.integers(0, 2),
       skew=st.sampled_from([None, 0, -400_000, -4_000, 60_000]), data=st.data())  # fmt: skip
def _decode_differential(drawn: list[dict[str, Any]], style: int, skew: int | None, data: st.DataObject) -> None:
    values: list[bytes | None] = []
    for fields in crossed(drawn):
        try:
            values.append(jsonl_line(with_defaults(fields), style))
        except (TypeError, ValueError, UnicodeEncodeError):
            values.append(repr(fields).encode("utf-8", "surrogatepass"))  # not JSON: a non-Python producer's junk
    values += [None, b"", b"\xff\xfe", b"[1, 2]", b"{" * 5000, b'{"a":' * 200 + b"1" + b"}" * 200,
               b" " * (MAX_EVENT_BYTES + 1), b'{"event_id": "e"}']  # fmt: skip
    kinds = [data.draw(st.sampled_from(["usage", "outcome"])) if i % 5 == 0 else
             ("outcome" if b'"outcome"' in (v or b"") else "usage") for i, v in enumerate(values)]  # fmt: skip
    now_ms = int(NOW.timestamp() * 1000)
    stamps = [None if skew is None else now_ms + skew + (i % 3) for i in range(len(values))]
    expected = [oracle_decode(v, k, t, NOW) for v, k, t in zip(values, kinds, stamps, strict=True)]
    # The whole batch (junk included: message by message), then only its JSON objects (the batch
    # a producer usually sends: read in one pass).
    objects = [i for i, v in enumerate(values) if v and len(v) <= MAX_EVENT_BYTES and _is_object(v)]
    for members in (list(range(len(values))), objects):
        got = decode_batch([values[i] for i in members], [kinds[i] for i in members],  # type: ignore[misc]
                           [stamps[i] for i in members], NOW)  # fmt: skip
        verdicts: dict[int, Any] = dict(zip(got.positions, got.rows, strict=True))
        verdicts.update((i, Rejection(reason)) for i, reason in got.rejections)
        assert sorted(verdicts) == list(range(len(members)))
        for j, i in enumerate(members):
            assert verdicts[j] == expected[i], values[i]
        COUNT["messages"] += len(members)
        COUNT["accepted"] += len(got.rows)


def _is_object(value: bytes) -> bool:
    try:
        return type(orjson.loads(value)) is dict
    except orjson.JSONDecodeError:
        return False


def test_decoding_a_batch_agrees_with_the_model_on_generated_and_hostile_messages() -> None:
    _decode_differential()
    assert COUNT["messages"] >= min(50_000, 200 * int(os.environ.get("INGEST_FUZZ_BATCHES", "400")) // 2), COUNT
    assert COUNT["accepted"] > COUNT["messages"] // 20, COUNT  # the column path is exercised, not only the model's


def test_the_column_path_takes_what_the_sdk_writes() -> None:
    """A batch of SDK-written events (microsecond timestamps) is accepted by the column path, not one by one."""
    events = [UsageEvent(event_id=f"e{i}", customer_id="acme", occurred_at=NOW - timedelta(seconds=i, microseconds=7),
                         model="gpt-4o", input_tokens=i) for i in range(50)]  # fmt: skip
    values = [e.wire_bytes() for e in events]
    assert b'.999993Z"' in values[0]
    calls = {"model": 0}
    import meterstream.stream_processors.decode as decode

    original = decode.decode_event

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["model"] += 1
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "decode_event", counted)
        got = decode_batch(values, ["usage"] * 50, [int(NOW.timestamp() * 1000)] * 50, NOW)
    assert calls["model"] == 0
    assert got.rows == [row_of(e) for e in events]


def test_an_outcome_without_type_on_the_outcome_topic_is_the_models_outcome() -> None:
    """The topic decides the model, so ``type`` may be omitted (a producer in another language); on the
    usage topic the same value is the usage model's rejection."""
    values = [orjson.dumps({"event_id": f"o{i}", "customer_id": "acme", "occurred_at": "2026-03-14T09:26:53Z",
                            "outcome_type": "ticket", "attribution": "ai_only"}) for i in range(20)]  # fmt: skip
    stamps = [int(NOW.timestamp() * 1000)] * 20
    got = decode_batch(values, ["outcome"] * 20, stamps, NOW)
    assert got.rejections == [] and got.rows == [oracle_decode(v, "outcome", s, NOW) for v, s in zip(values, stamps, strict=True)]
    refused = decode_batch(values, ["usage"] * 20, stamps, NOW)
    assert refused.rows == [] and [r for _, r in refused.rejections] == [
        oracle_decode(v, "usage", s, NOW).reason for v, s in zip(values, stamps, strict=True)
    ]
