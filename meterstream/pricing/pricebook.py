"""The price book: what each unit of usage is worth in credits, and what it costs to serve.

A price book is data (YAML), validated by pydantic with errors that name the
bad field. It carries a ``version`` that every rated row records. Prices are
``Decimal``; YAML floats are re-read through ``str`` so ``0.1`` stays ``0.1``.

Shape::

    version: "2026-11-01"
    currency: USD
    models:
      gpt-4o:
        provider: openai
        credits_per_1k: {input: "0.25", cached_input: "0.125", output: "1.0"}
        cost_per_1m:    {input: "2.50", cached_input: "1.25",  output: "10.00"}
    meters:
      requests: {credits_per_unit: "0.01", cost_per_unit: "0"}
    outcomes:
      resolved_ticket: {ai_only: "90", human_assisted: "0", cost_per_outcome: "0"}
"""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from meterstream.pricing.money import to_decimal
from meterstream.schemas.events import Meter

MILLION = Decimal(1_000_000)


def _decimal(value: Any) -> Decimal:
    return to_decimal(value)


Price = Annotated[Decimal, BeforeValidator(_decimal), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenRates(_Strict):
    """Rates for the three token classes. ``cached_input`` defaults to ``input``."""

    input: Price
    output: Price
    cached_input: Price | None = None

    @property
    def cached_input_rate(self) -> Decimal:
        return self.input if self.cached_input is None else self.cached_input


class ModelPrice(_Strict):
    provider: str
    #: Customer-facing credits per 1,000 tokens.
    credits_per_1k: TokenRates
    #: Provider list price (cost to serve) per 1,000,000 tokens, in the book's currency.
    cost_per_1m: TokenRates


class MeterPrice(_Strict):
    credits_per_unit: Price
    cost_per_unit: Price = Decimal(0)


class OutcomePrice(_Strict):
    """Credits per outcome by attribution; a reversal credits back what was charged."""

    ai_only: Price
    human_assisted: Price = Decimal(0)
    cost_per_outcome: Price = Decimal(0)


class PriceBook(_Strict):
    version: str = Field(min_length=1, max_length=64)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    meters: dict[str, MeterPrice] = Field(default_factory=dict)
    outcomes: dict[str, OutcomePrice] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _meters_known(self) -> PriceBook:
        allowed = {m.value for m in Meter} - {Meter.TOKENS.value}
        unknown = set(self.meters) - allowed
        if unknown:
            raise ValueError(f"meters: unknown meter(s) {sorted(unknown)}; known: {sorted(allowed)}")
        return self


class PriceBookError(ValueError):
    """The price file is missing or invalid; the message names the file and field."""


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"invalid price book {source}:"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_price_book(data: Any, *, source: str = "<data>") -> PriceBook:
    try:
        return PriceBook.model_validate(data)
    except ValidationError as exc:
        raise PriceBookError(_format_errors(source, exc)) from None


def load_price_book(path: Path | None = None) -> PriceBook:
    """Load a price file; ``None`` loads the curated default shipped with meterstream."""
    if path is None:
        text = resources.files("meterstream.data").joinpath("price_book.yaml").read_text()
        source = "meterstream/data/price_book.yaml"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PriceBookError(f"cannot read price book {path}: {exc.strerror}") from None
        source = str(path)
    try:
        # BaseLoader keeps every scalar a string: no float ever touches a price.
        data = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        raise PriceBookError(f"price book {source} is not valid YAML: {exc}") from None
    return parse_price_book(data, source=source)


def costs_from_litellm(path: Path, model_names: list[str]) -> dict[str, tuple[str, TokenRates]]:
    """Provider costs per 1M tokens for the given models, from LiteLLM's price table.

    LiteLLM stores USD per token as JSON floats; each is read through ``str``
    to ``Decimal`` and scaled by 10^6 exactly, so refreshing costs needs no code change.
    """
    table = json.loads(Path(path).read_text())
    out: dict[str, tuple[str, TokenRates]] = {}
    for name in model_names:
        entry = table.get(name)
        if entry is None:
            raise PriceBookError(f"model {name!r} is not in {path}")
        per_token_in = to_decimal(entry.get("input_cost_per_token", 0), field=f"{name}.input_cost_per_token")
        per_token_out = to_decimal(entry.get("output_cost_per_token", 0), field=f"{name}.output_cost_per_token")
        cached = entry.get("cache_read_input_token_cost")
        rates = TokenRates(
            input=per_token_in * MILLION,
            output=per_token_out * MILLION,
            cached_input=None if cached is None else to_decimal(cached, field=f"{name}.cache_read") * MILLION,
        )
        out[name] = (str(entry.get("litellm_provider", "unknown")), rates)
    return out
