"""Money, price books and rating: exact Decimal arithmetic, the worked examples of PRICING.md."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.pricing.money import minor_unit_exponent, round_money, to_decimal
from meterstream.pricing.pricebook import (
    PriceBook,
    PriceBookError,
    TokenRates,
    costs_from_litellm,
    load_price_book,
    parse_price_book,
)
from meterstream.pricing.rating import RatingError, rate_event
from meterstream.schemas.events import OutcomeEvent, UsageEvent

# The default price book's models, copied verbatim from LiteLLM's table (see tests/fixtures/README.md).
LITELLM_PRICES = Path(__file__).resolve().parents[1] / "fixtures" / "litellm-sample.json"


def valid_book_data() -> dict[str, Any]:
    return {
        "version": "v1",
        "models": {
            "gpt-4o": {
                "provider": "openai",
                "credits_per_1k": {"input": "0.5", "output": "2"},
                "cost_per_1m": {"input": "2.5", "output": "10"},
            }
        },
    }


# -- money ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("0.005", "USD", "0.01"),
        ("0.0049", "USD", "0.00"),
        ("0.015", "USD", "0.02"),  # half-up, not banker's rounding (which gives 0.02 here too)
        ("0.025", "USD", "0.03"),  # banker's rounding would give 0.02
        ("-0.005", "USD", "-0.01"),  # half away from zero for credits given back
        ("1234.5678", "EUR", "1234.57"),
        ("7", "USD", "7.00"),
        ("2.5", "JPY", "3"),
        ("1234.4999", "JPY", "1234"),
        ("0.0005", "KWD", "0.001"),
        ("0.005", "usd", "0.01"),  # currency codes are case-insensitive
    ],
)
def test_round_money_half_up_to_minor_unit(amount: str, currency: str, expected: str) -> None:
    result = round_money(Decimal(amount), currency)
    # Compare the string: the number of places is part of the contract, not just the value.
    assert str(result) == expected


def test_minor_units() -> None:
    assert minor_unit_exponent("USD") == Decimal("0.01")
    assert minor_unit_exponent("JPY") == Decimal("1")
    assert minor_unit_exponent("BHD") == Decimal("0.001")


@pytest.mark.parametrize("amount", [0.005, 1, "0.005", None])
def test_round_money_refuses_non_decimals(amount: Any) -> None:
    with pytest.raises(TypeError, match="money must be Decimal"):
        round_money(amount)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.1, Decimal("0.1")), (1e-7, Decimal("1E-7")), (3, Decimal(3)), ("2.50", Decimal("2.50")), (Decimal("9.99"), Decimal("9.99"))],
)
def test_to_decimal_is_exact(value: Any, expected: Decimal) -> None:
    result = to_decimal(value)
    assert result == expected
    assert str(result) == str(expected)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(True, "boolean"), ("abc", "is not a number"), ("NaN", "finite"), (float("inf"), "finite"), ([1], "expected a number")],
)
def test_to_decimal_rejects_with_field_name(value: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        to_decimal(value, field="models.x.input")
    assert str(info.value).startswith("models.x.input:")


# -- rating: the worked examples ------------------------------------------------------------------


def test_credits_conversion_worked_example(book: PriceBook, make_usage: Callable[..., UsageEvent]) -> None:
    # PRICING.md, "Credits conversion": 12,000 input + 3,000 output of large-model.
    row = rate_event(make_usage(input_tokens=12_000, output_tokens=3_000), book)
    assert row.credits == Decimal("6")
    assert row.cost_to_serve == Decimal("0.06")
    assert isinstance(row.credits, Decimal) and isinstance(row.cost_to_serve, Decimal)
    assert round_money(row.cost_to_serve) == Decimal("0.06")
    assert row.kind == "usage"
    assert row.meter == "tokens"
    assert row.model == "large-model"
    assert row.provider == "example"  # from the price book when the event names none
    assert row.rule == "tokens:large-model"
    assert row.price_book_version == "test-book-1"
    assert row.period == "2025-03"
    assert row.currency == "USD"
    assert (row.input_tokens, row.output_tokens, row.cached_input_tokens) == (12_000, 3_000, 0)


def test_cached_tokens_are_priced_at_the_cached_rate(book: PriceBook, make_usage: Callable[..., UsageEvent]) -> None:
    # 10,000 input of which 4,000 cached: cost 6,000 x 2.50/1M + 4,000 x 1.25/1M = 0.015 + 0.005.
    row = rate_event(make_usage(input_tokens=10_000, cached_input_tokens=4_000, output_tokens=0), book)
    assert row.cost_to_serve == Decimal("0.02")
    # large-model has no cached credits rate, so cached input is charged like input.
    assert row.credits == Decimal("2.5")
    assert row.cached_input_tokens == 4_000


def test_cached_credits_rate_when_the_book_has_one(book: PriceBook, make_usage: Callable[..., UsageEvent]) -> None:
    # small-model: input 0.02, cached 0.01, output 0.08 credits per 1K.
    row = rate_event(make_usage(model="small-model", input_tokens=5_000, cached_input_tokens=2_000,
                                output_tokens=1_000), book)
    assert row.credits == Decimal("0.06") + Decimal("0.02") + Decimal("0.08")
    assert row.cost_to_serve == Decimal("0.00045") + Decimal("0.00015") + Decimal("0.0006")


def test_provider_on_the_event_wins(book: PriceBook, make_usage: Callable[..., UsageEvent]) -> None:
    assert rate_event(make_usage(provider="azure"), book).provider == "azure"


def test_meter_event_is_quantity_times_price(book: PriceBook, make_usage: Callable[..., UsageEvent]) -> None:
    event = make_usage(meter="documents", model=None, input_tokens=0, output_tokens=0, quantity=Decimal("2.5"),
                       unit="pages")
    row = rate_event(event, book)
    assert row.credits == Decimal("5")
    assert row.cost_to_serve == Decimal("0.01")
    assert row.rule == "meter:documents"
    assert row.quantity == Decimal("2.5")
    assert row.unit == "pages"
    assert row.model == ""


def test_meter_cost_defaults_to_zero(book: PriceBook, make_usage: Callable[..., UsageEvent]) -> None:
    event = make_usage(meter="requests", model=None, input_tokens=0, output_tokens=0, quantity=300)
    row = rate_event(event, book)
    assert row.credits == Decimal("3")
    assert row.cost_to_serve == 0


@pytest.mark.parametrize(
    ("outcome_type", "attribution", "credits", "cost"),
    [
        ("verified_application", "ai_only", Decimal("150"), Decimal("0.40")),
        ("verified_application", "human_assisted", Decimal("50"), Decimal("0.40")),
        ("resolved_ticket", "ai_only", Decimal("90"), Decimal("0")),
        ("resolved_ticket", "human_assisted", Decimal("0"), Decimal("0")),
    ],
)
def test_outcome_price_depends_on_attribution(
    book: PriceBook, make_outcome: Callable[..., OutcomeEvent], outcome_type: str, attribution: str,
    credits: Decimal, cost: Decimal,
) -> None:
    row = rate_event(make_outcome(outcome_type=outcome_type, attribution=attribution), book)
    assert row.credits == credits
    assert row.cost_to_serve == cost
    assert row.kind == "outcome"
    assert row.meter == "outcome"
    assert row.quantity == Decimal(1)
    assert row.attribution == attribution
    assert row.rule == f"outcome:{outcome_type}:{attribution}"


def test_outcome_reversal_is_credited_back(book: PriceBook, make_outcome: Callable[..., OutcomeEvent]) -> None:
    original = rate_event(make_outcome(event_id="out-1"), book)
    reversal = rate_event(make_outcome(event_id="out-2", reversal_of="out-1"), book)
    assert reversal.credits == Decimal("-150")
    assert reversal.cost_to_serve == Decimal("-0.40")
    assert reversal.rule.endswith(":reversal")
    assert original.credits + reversal.credits == 0
    assert original.cost_to_serve + reversal.cost_to_serve == 0


def test_unknown_model_is_a_rating_error_naming_it(book: PriceBook, make_usage: Callable[..., UsageEvent]) -> None:
    with pytest.raises(RatingError, match=r"'no-such-model'.*test-book-1"):
        rate_event(make_usage(model="no-such-model"), book)


def test_unknown_outcome_is_a_rating_error_naming_it(book: PriceBook, make_outcome: Callable[..., OutcomeEvent]) -> None:
    with pytest.raises(RatingError, match=r"'unknown_outcome'"):
        rate_event(make_outcome(outcome_type="unknown_outcome"), book)


def test_unpriced_meter_is_a_rating_error_naming_it(book: PriceBook, make_usage: Callable[..., UsageEvent]) -> None:
    event = make_usage(meter="seats", model=None, input_tokens=0, output_tokens=0, quantity=1)
    with pytest.raises(RatingError, match=r"'seats'"):
        rate_event(event, book)


# -- price book validation ------------------------------------------------------------------------


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *path, last = dotted.split(".")
    node = data
    for part in path:
        node = node[part]
    node[last] = value
    return data


@pytest.mark.parametrize(
    ("dotted", "value", "where"),
    [
        ("models.gpt-4o.cost_per_1m.input", "abc", "models.gpt-4o.cost_per_1m.input"),
        ("models.gpt-4o.cost_per_1m.input", "-1", "models.gpt-4o.cost_per_1m.input"),
        ("models.gpt-4o.credits_per_1k.output", "NaN", "models.gpt-4o.credits_per_1k.output"),
        ("models.gpt-4o.credits_per_1k.cached_input", True, "models.gpt-4o.credits_per_1k.cached_input"),
        ("models.gpt-4o.credits_per_1k.inptu", "1", "models.gpt-4o.credits_per_1k.inptu"),
        ("models.gpt-4o.provider", None, "models.gpt-4o.provider"),
        ("currency", "usd", "currency"),
        ("version", "", "version"),
        ("meters", {"widgets": {"credits_per_unit": "1"}}, "meters: unknown meter(s) ['widgets']"),
        ("meters", {"tokens": {"credits_per_unit": "1"}}, "unknown meter(s) ['tokens']"),
        ("outcomes", {"resolved": {"human_assisted": "1"}}, "outcomes.resolved.ai_only"),
    ],
)
def test_price_book_errors_name_the_field(dotted: str, value: Any, where: str) -> None:
    with pytest.raises(PriceBookError) as info:
        parse_price_book(_set(valid_book_data(), dotted, value), source="prices.yaml")
    message = str(info.value)
    assert message.startswith("invalid price book prices.yaml:")
    assert where in message


def test_missing_output_rate_is_named() -> None:
    data = valid_book_data()
    del data["models"]["gpt-4o"]["cost_per_1m"]["output"]
    with pytest.raises(PriceBookError, match=r"models\.gpt-4o\.cost_per_1m\.output: Field required"):
        parse_price_book(data)


def test_load_price_book_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("version: v1\nmodels:\n  m:\n    provider: p\n    credits_per_1k: {input: x, output: 1}\n"
                    "    cost_per_1m: {input: 1, output: 1}\n")
    with pytest.raises(PriceBookError) as info:
        load_price_book(path)
    assert str(path) in str(info.value)
    assert "models.m.credits_per_1k.input" in str(info.value)


def test_load_price_book_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PriceBookError, match="cannot read price book .*nope.yaml"):
        load_price_book(tmp_path / "nope.yaml")


def test_load_price_book_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: [unclosed\n")
    with pytest.raises(PriceBookError, match="not valid YAML"):
        load_price_book(path)


def test_yaml_floats_never_become_binary_floats(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "version: floats\n"
        "models:\n"
        "  m:\n"
        "    provider: p\n"
        "    credits_per_1k: {input: 0.1, output: 0.3}\n"  # unquoted YAML floats
        "    cost_per_1m: {input: 0.1, output: 3e-7, cached_input: 0.12345678901234567891}\n"
        "meters:\n"
        "  requests: {credits_per_unit: 0.1}\n"
    )
    loaded = load_price_book(path)
    rates = loaded.models["m"].credits_per_1k
    assert rates.input == Decimal("0.1")
    assert str(rates.input) == "0.1"
    assert str(rates.output) == "0.3"
    assert loaded.models["m"].cost_per_1m.output == Decimal("3E-7")
    # More digits than a binary float holds: only a parser that never makes a float keeps them all.
    assert loaded.models["m"].cost_per_1m.cached_input == Decimal("0.12345678901234567891")
    assert loaded.meters["requests"].credits_per_unit == Decimal("0.1")
    # With binary floats, 0.1 + 0.2-style sums drift; here 10,000 x 0.1 / 1K + 1,000 x 0.3 / 1K is exactly 1.3.
    event = UsageEvent(event_id="e", customer_id="c", occurred_at="2025-03-15T12:00:00Z", model="m",
                       input_tokens=10_000, output_tokens=1_000)
    assert rate_event(event, loaded).credits == Decimal("1.3")


def test_default_price_book_loads() -> None:
    default = load_price_book()
    assert default.version
    assert default.currency == "USD"
    assert {"gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5"} <= set(default.models)
    assert default.models["gpt-4o"].cost_per_1m.input == Decimal("2.5")
    assert {"requests", "actions", "documents", "seats"} == set(default.meters)


def test_default_price_book_charges_twice_the_cost_to_serve() -> None:
    # The shipped file's stated rule: at $0.01 per credit, credits are twice the cost to serve,
    # i.e. credits_per_1k = cost_per_1m / 5 for every token class of every model.
    default = load_price_book()
    for name, model in default.models.items():
        credits, cost = model.credits_per_1k, model.cost_per_1m
        for rate in ("input", "output", "cached_input_rate"):
            assert getattr(credits, rate) * 5 == getattr(cost, rate), f"{name}.{rate}"


# -- LiteLLM import -------------------------------------------------------------------------------


def test_costs_from_litellm_reads_gpt_4o_exactly() -> None:
    provider, rates = costs_from_litellm(LITELLM_PRICES, ["gpt-4o"])["gpt-4o"]
    assert provider == "openai"
    assert rates.input == Decimal("2.5")
    assert rates.output == Decimal("10")
    assert rates.cached_input == Decimal("1.25")


def test_default_price_book_costs_match_the_litellm_table() -> None:
    default = load_price_book()
    imported = costs_from_litellm(LITELLM_PRICES, list(default.models))
    for name, model in default.models.items():
        provider, rates = imported[name]
        assert provider == model.provider, name
        for rate in ("input", "output", "cached_input_rate"):
            assert getattr(rates, rate) == getattr(model.cost_per_1m, rate), f"{name}.{rate}"


def test_costs_from_litellm_unknown_model() -> None:
    with pytest.raises(PriceBookError, match="'no-such-model-xyz'"):
        costs_from_litellm(LITELLM_PRICES, ["no-such-model-xyz"])


def test_costs_from_litellm_scales_floats_exactly(tmp_path: Path) -> None:
    # 3.3e-06 * 1e6 is 3.3000000000000003 in binary floats; the import must give exactly 3.3.
    assert 3.3e-06 * 1e6 != 3.3
    table = {"m": {"input_cost_per_token": 3.3e-06, "output_cost_per_token": 1.1e-06, "litellm_provider": "acme-ai"},
             "n": {"input_cost_per_token": 1e-06}}
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(table))
    out = costs_from_litellm(path, ["m", "n"])
    provider, rates = out["m"]
    assert provider == "acme-ai"
    assert rates == TokenRates(input=Decimal("3.3"), output=Decimal("1.1"), cached_input=None)
    assert rates.cached_input_rate == Decimal("3.3")
    assert out["n"][0] == "unknown"
    assert out["n"][1].output == 0


# -- properties -----------------------------------------------------------------------------------

token_counts = st.integers(min_value=0, max_value=50_000_000)
prices = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@st.composite
def token_split(draw: st.DrawFn) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two token events (input, cached, output) with cached <= input in each."""

    def one() -> tuple[int, int, int]:
        inp = draw(token_counts)
        return inp, draw(st.integers(min_value=0, max_value=inp)), draw(token_counts)

    return one(), one()


def _rates(draw_prices: tuple[Decimal, Decimal, Decimal]) -> dict[str, str]:
    return {"input": str(draw_prices[0]), "cached_input": str(draw_prices[1]), "output": str(draw_prices[2])}


def _book(credits: tuple[Decimal, Decimal, Decimal], cost: tuple[Decimal, Decimal, Decimal]) -> PriceBook:
    return parse_price_book({"version": "prop", "models": {"m": {
        "provider": "p", "credits_per_1k": _rates(credits), "cost_per_1m": _rates(cost)}}})


def _event(event_id: str, tokens: tuple[int, int, int]) -> UsageEvent:
    return UsageEvent(event_id=event_id, customer_id="c", occurred_at="2025-03-15T12:00:00Z", model="m",
                      input_tokens=tokens[0], cached_input_tokens=tokens[1], output_tokens=tokens[2])


@given(split=token_split(), credits=st.tuples(prices, prices, prices), cost=st.tuples(prices, prices, prices))
def test_rating_is_additive(
    split: tuple[tuple[int, int, int], tuple[int, int, int]],
    credits: tuple[Decimal, Decimal, Decimal],
    cost: tuple[Decimal, Decimal, Decimal],
) -> None:
    """Splitting one call's tokens over two events never changes the total, to the last digit."""
    price_book = _book(credits, cost)
    a, b = split
    whole = rate_event(_event("whole", (a[0] + b[0], a[1] + b[1], a[2] + b[2])), price_book)
    part_a = rate_event(_event("a", a), price_book)
    part_b = rate_event(_event("b", b), price_book)
    assert part_a.credits + part_b.credits == whole.credits
    assert part_a.cost_to_serve + part_b.cost_to_serve == whole.cost_to_serve


@given(tokens=token_split(), credits=st.tuples(prices, prices, prices), cost=st.tuples(prices, prices, prices),
       quantity=st.decimals(min_value=Decimal("0.000000001"), max_value=10**9, places=9))
def test_usage_is_never_negative(
    tokens: tuple[tuple[int, int, int], tuple[int, int, int]],
    credits: tuple[Decimal, Decimal, Decimal],
    cost: tuple[Decimal, Decimal, Decimal],
    quantity: Decimal,
) -> None:
    price_book = _book(credits, cost)
    token_row = rate_event(_event("t", tokens[0]), price_book)
    assert token_row.credits >= 0
    assert token_row.cost_to_serve >= 0
    meter_book = parse_price_book({"version": "prop", "meters": {"actions": {
        "credits_per_unit": str(credits[0]), "cost_per_unit": str(cost[0])}}})
    meter_event = UsageEvent(event_id="q", customer_id="c", occurred_at="2025-03-15T12:00:00Z", meter="actions",
                             quantity=quantity)
    meter_row = rate_event(meter_event, meter_book)
    assert meter_row.credits >= 0
    assert meter_row.cost_to_serve >= 0


@pytest.mark.parametrize(
    "event",
    [
        UsageEvent(event_id="t1", customer_id="acme", occurred_at="2026-11-02T10:00:00+01:00", model="gpt-4o",
                   input_tokens=1200, cached_input_tokens=200, output_tokens=300, workflow_id="wf", run_id="r1"),
        UsageEvent(event_id="t2", customer_id="acme", occurred_at="2026-11-02T10:00:00Z", meter="documents",
                   quantity="2.5", unit="page"),
        OutcomeEvent(event_id="t3", customer_id="acme", occurred_at="2026-11-02T10:00:00Z",
                     outcome_type="resolved_ticket", attribution="ai_only", reversal_of="t0"),
    ],
)  # fmt: skip
def test_a_rated_row_built_without_validation_equals_the_validated_one(event):
    """rate_event builds rows with RatedUsage.trusted (no validation): the same row, field for field."""
    from meterstream.schemas.records import RatedUsage

    book = load_price_book(None)
    row = rate_event(event, book)  # the default book prices all three: tokens, documents, outcomes
    validated = RatedUsage(**row.model_dump())
    assert row == validated
    assert row.model_dump() == validated.model_dump()
    assert row.model_dump_json() == validated.model_dump_json()
    assert row.model_fields_set <= set(RatedUsage.model_fields)
    assert row.model_copy(update={"billed_in": "2026-12"}).billed_in == "2026-12"
