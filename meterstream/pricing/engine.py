"""The rating engine: a batch of events in, their prices out, as columns. Pure: no Kafka, no ClickHouse.

Every path that prices an event goes through :func:`rate_rows`: the worker with a whole
batch, :meth:`Catalog.rate <meterstream.pricing.plans.Catalog.rate>` (``meterstream rate``,
``rerate``, ``advise``, the invoice, guards) with a batch of one. The per-event
:func:`~meterstream.pricing.rating.rate_event` is kept as the oracle the property tests
compare this engine with, to the last digit (tests/unit/test_engine.py).

**Exact fixed point.** An amount is an ``int`` of 10⁻¹⁸ (:data:`SCALE`): the store's
``Decimal(38, 18)`` exactly. Rows are grouped by what prices them (price book and model,
meter or outcome); each group's rates become integers once, and an amount is an integer
sum of products:

``credits = (uncached × input + cached × cached_input + output × output_rate) / 1,000``

(and ``/ 1,000,000`` for the cost per 1M tokens; ``quantity × per_unit`` for the other
meters; the price itself for an outcome, with the sign turned for a reversal). Where a
price has more fractional digits than the division leaves room for, the amount is cut
toward zero at 18 digits, as the store cuts a longer value on insert: what the engine
holds in memory is what the store holds. (The per-event ``Decimal`` path rounds at 28
significant digits; the integers here do not round at all before that cut.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Context, Decimal
from itertools import compress, repeat
from math import gcd
from operator import is_, itemgetter
from typing import Any, NamedTuple

from meterstream.pricing.pricebook import PriceBook, TokenRates
from meterstream.pricing.rating import RatingError
from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.schemas.records import RatedUsage, RowColumns

#: One unit of the store's money columns (Decimal(38, 18)) is 10**-18.
SCALE = 10**18
_DIGITS = 18
_ZERO = Decimal(0)
_TOKENS = "tokens"


class EventRow(NamedTuple):
    """One valid event as the engine reads it: the models' fields, ``""`` for an absent text."""

    kind: str  # "usage" | "outcome"
    event_id: str
    customer_id: str
    occurred_at: datetime  # UTC
    workflow_id: str = ""
    run_id: str = ""
    meter: str = _TOKENS
    model: str = ""
    provider: str = ""
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    quantity: Decimal = _ZERO
    unit: str = ""
    outcome_type: str = ""
    attribution: str = ""
    reversal_of: str = ""


#: ``rows_of_columns(zip(*columns))``: engine rows from columns in EventRow's field order, made in
#: C (a NamedTuple's own constructor is a Python function: a third more per row).
rows_of_columns = functools.partial(map, functools.partial(tuple.__new__, EventRow))


def row_of(event: UsageEvent | OutcomeEvent) -> EventRow:
    """A validated model as the engine's row."""
    at = event.occurred_at
    if at.tzinfo is not timezone.utc:
        at = at.astimezone(timezone.utc)
    if isinstance(event, OutcomeEvent):
        return EventRow(
            "outcome", event.event_id, event.customer_id, at, event.workflow_id or "", event.run_id or "",
            "outcome", outcome_type=event.outcome_type, attribution=event.attribution.value,
            reversal_of=event.reversal_of or "",
        )  # fmt: skip
    return EventRow(
        "usage", event.event_id, event.customer_id, at, event.workflow_id or "", event.run_id or "",
        event.meter.value, event.model or "", event.provider or "", event.input_tokens,
        event.cached_input_tokens, event.output_tokens, event.quantity, event.unit or "",
    )  # fmt: skip


#: Wide enough for every amount of Decimal(38, 18) and beyond: nothing is rounded in :func:`money`.
_EXACT = Context(prec=80)


def money(units: int) -> Decimal:
    """An amount in 10⁻¹⁸ as a Decimal, exactly, without trailing zeros (``150``, ``0.0308625``)."""
    if units % SCALE:
        # The exponent moved and the trailing zeros dropped, in C (no string: half the time).
        return Decimal(units).scaleb(-_DIGITS, _EXACT).normalize(_EXACT)
    return Decimal(units // SCALE)


def units(amount: Decimal) -> int:
    """A Decimal as an amount in 10⁻¹⁸, cut toward zero beyond 18 fractional digits (as the store does)."""
    numerator, denominator = amount.as_integer_ratio()
    scaled = abs(numerator) * SCALE // denominator
    return -scaled if numerator < 0 else scaled


class _Fixed(NamedTuple):
    """Rates as integers: an amount is ``(Σ count × rate) × multiply // divide`` in 10⁻¹⁸."""

    rates: tuple[int, ...]
    multiply: int
    divide: int

    def amount(self, weighted: int) -> int:
        return weighted * self.multiply // self.divide if self.divide != 1 else weighted * self.multiply


def _fixed(rates: Sequence[Decimal], per: int) -> _Fixed:
    """``rates`` (per ``per`` units) as integers over one power of ten, the fraction reduced."""
    places = max(0, *(-int(r.as_tuple().exponent) for r in rates))
    whole = [r.as_integer_ratio() for r in rates]
    power = 10**places
    ints = tuple(n * power // d for n, d in whole)  # exact: each rate has at most `places` digits
    multiply, divide = SCALE, power * per
    common = gcd(multiply, divide)
    return _Fixed(ints, multiply // common, divide // common)


@dataclass(eq=False)
class RatedBatch(RowColumns[RatedUsage]):
    """Rated rows as columns, in the order of the events; a :class:`RatedUsage` per row on demand.

    ``credits`` and ``cost`` are amounts in 10⁻¹⁸ (:func:`money` makes one a Decimal). The
    worker inserts the columns as they are (storage/columns.py); iterating or indexing
    builds the row models (tests, and the rare paths that need one).
    """

    events: list[EventRow] = field(default_factory=list)
    period: list[str] = field(default_factory=list)
    credits: list[int] = field(default_factory=list)
    cost: list[int] = field(default_factory=list)
    provider: list[str] = field(default_factory=list)
    currency: list[str] = field(default_factory=list)
    price_book_version: list[str] = field(default_factory=list)
    rule: list[str] = field(default_factory=list)
    billed_in: list[str] = field(default_factory=list)

    _COLUMNS = ("events", "period", "credits", "cost", "provider", "currency", "price_book_version", "rule",
                "billed_in")  # fmt: skip

    def __len__(self) -> int:
        return len(self.events)

    def row(self, i: int) -> RatedUsage:
        """Row ``i`` as the model the rest of the code reads."""
        e = self.events[i]
        common: dict[str, Any] = {
            "event_id": e.event_id, "customer_id": e.customer_id, "occurred_at": e.occurred_at,
            "period": self.period[i], "workflow_id": e.workflow_id, "run_id": e.run_id,
            "credits": money(self.credits[i]), "cost_to_serve": money(self.cost[i]),
            "currency": self.currency[i], "price_book_version": self.price_book_version[i],
            "rule": self.rule[i], "billed_in": self.billed_in[i],
        }  # fmt: skip
        if e.kind == "outcome":
            return RatedUsage.trusted(kind="outcome", meter="outcome", quantity=Decimal(1),
                                      outcome_type=e.outcome_type, attribution=e.attribution, **common)  # fmt: skip
        return RatedUsage.trusted(
            kind="usage", meter=e.meter, model=e.model, provider=self.provider[i], input_tokens=e.input_tokens,
            cached_input_tokens=e.cached_input_tokens, output_tokens=e.output_tokens, quantity=e.quantity,
            unit=e.unit, **common,
        )  # fmt: skip

    def take(self, indices: Sequence[int]) -> RatedBatch:
        """The rows at ``indices``, in that order."""
        if len(indices) == len(self) and all(i == j for i, j in enumerate(indices)):
            return RatedBatch(*(list(getattr(self, name)) for name in self._COLUMNS))
        pick: Callable[[list[Any]], list[Any]]
        if not indices:
            pick = lambda column: []  # noqa: E731
        elif len(indices) == 1:
            pick = lambda column: [column[indices[0]]]  # noqa: E731
        else:
            get = itemgetter(*indices)
            pick = lambda column: list(get(column))  # noqa: E731
        return RatedBatch(*(pick(getattr(self, name)) for name in self._COLUMNS))

    def set_row(self, i: int, row: RatedUsage) -> None:
        """Replace row ``i`` by ``row`` (a reversal at the price of the outcome it reverses)."""
        self.events[i] = _event_of(row, self.events[i].reversal_of)
        self.period[i] = row.period
        self.credits[i] = units(row.credits)
        self.cost[i] = units(row.cost_to_serve)
        self.provider[i] = row.provider
        self.currency[i] = row.currency
        self.price_book_version[i] = row.price_book_version
        self.rule[i] = row.rule
        self.billed_in[i] = row.billed_in

    @classmethod
    def of(cls, rows: Sequence[RatedUsage]) -> RatedBatch:
        """Rated row models as a batch (a store insert of rows that did not come from the engine)."""
        batch = cls()
        for r in rows:
            batch.events.append(_event_of(r))
            batch.period.append(r.period)
            batch.credits.append(units(r.credits))
            batch.cost.append(units(r.cost_to_serve))
            batch.provider.append(r.provider)
            batch.currency.append(r.currency)
            batch.price_book_version.append(r.price_book_version)
            batch.rule.append(r.rule)
            batch.billed_in.append(r.billed_in)
        return batch


def _event_of(row: RatedUsage, reversal_of: str = "") -> EventRow:
    return EventRow(
        row.kind, row.event_id, row.customer_id, row.occurred_at, row.workflow_id, row.run_id, row.meter, row.model,
        row.provider, row.input_tokens, row.cached_input_tokens, row.output_tokens, row.quantity, row.unit,
        row.outcome_type, row.attribution, reversal_of,
    )  # fmt: skip


class Rating(NamedTuple):
    """:func:`rate_rows`' answer: every row rated, or the reason it cannot be (a dead letter)."""

    rated: RatedBatch
    #: Per row: None, or why the row has no price (a RatingError, or the PlanError of ``book_of``).
    errors: list[ValueError | None]


#: What :func:`rate_rows` may be given beside ``book_of``: the book and period label of every row
#: it can tell at once (``None`` where it cannot), so that ``book_of`` is asked only for the rest.
BooksAtOnce = Callable[[Sequence[EventRow]], tuple[list[PriceBook | None], list[str]]]


def rate_rows(rows: Sequence[EventRow], book_of: Callable[[str, datetime], tuple[PriceBook, str]],
              books_at_once: BooksAtOnce | None = None) -> Rating:  # fmt: skip
    """Price ``rows``; ``book_of(customer, occurred_at)`` gives the price book and the period label.

    ``book_of`` raises ``ValueError`` (a PlanError) when the customer has no plan version then:
    that row gets the error. A row the book has no price for gets a :class:`RatingError`.
    ``books_at_once`` (:data:`BooksAtOnce`) answers for whole groups of rows first; it must
    give, for every row it answers, what ``book_of`` would.
    """
    n = len(rows)
    books: list[PriceBook | None]
    periods: list[str]
    if books_at_once is not None:
        books, periods = books_at_once(rows)
        if len(books) != n or len(periods) != n:
            raise ValueError(f"books_at_once answered {len(books)} books for {n} rows")
    else:
        books, periods = [None] * n, [""] * n
    errors: list[ValueError | None] = [None] * n
    unanswered = compress(range(n), map(is_, books, repeat(None))) if books_at_once is not None else range(n)
    for i in unanswered:
        row = rows[i]
        try:
            books[i], periods[i] = book_of(row.customer_id, row.occurred_at)
        except ValueError as exc:
            errors[i] = exc
    credits = [0] * n
    cost = [0] * n
    provider = [""] * n
    rule = [""] * n
    # Group the rows by what prices them, (book, kind of price, item), then one integer pass per group.
    groups: dict[tuple[int, str, str], list[int]] = {}
    for i, (row, book) in enumerate(zip(rows, books, strict=True)):
        if book is None:
            continue
        if row.kind == "outcome":
            key = (id(book), "outcome", row.outcome_type)
        elif row.meter == _TOKENS:
            key = (id(book), _TOKENS, row.model)
        else:
            key = (id(book), "meter", row.meter)
        groups.setdefault(key, []).append(i)
    for (_, kind, item), members in groups.items():
        book = books[members[0]]
        assert book is not None
        if kind == "outcome":
            _rate_outcomes(rows, members, book, item, credits, cost, rule, errors)
        elif kind == _TOKENS:
            _rate_tokens(rows, members, book, item, credits, cost, provider, rule, errors)
        else:
            _rate_meter(rows, members, book, item, credits, cost, provider, rule, errors)
    rated = RatedBatch(
        events=list(rows),
        period=periods,
        credits=credits,
        cost=cost,
        provider=provider,
        currency=[b.currency if b is not None else "" for b in books],
        price_book_version=[b.version if b is not None else "" for b in books],
        rule=rule,
        billed_in=[""] * n,
    )
    return Rating(rated, errors)


def _rate_tokens(rows: Sequence[EventRow], members: list[int], book: PriceBook, model: str, credits: list[int],
                 cost: list[int], provider: list[str], rule: list[str], errors: list[ValueError | None]) -> None:  # fmt: skip
    prices = book.models.get(model)
    if prices is None:
        return _refuse(members, errors, f"no price for model {model!r} in price book {book.version}")
    by_credits, by_cost = _token_rates(prices.credits_per_1k, 1000), _token_rates(prices.cost_per_1m, 1_000_000)
    ci, cc, co = by_credits.rates
    ki, kc, ko = by_cost.rates
    name = f"tokens:{model}"
    for i in members:
        row = rows[i]
        cached = row.cached_input_tokens
        uncached = row.input_tokens - cached
        out = row.output_tokens
        credits[i] = by_credits.amount(uncached * ci + cached * cc + out * co)
        cost[i] = by_cost.amount(uncached * ki + cached * kc + out * ko)
        provider[i] = row.provider or prices.provider
        rule[i] = name


def _refuse(members: list[int], errors: list[ValueError | None], reason: str) -> None:
    """The group has no price in its book: each of its rows gets the same RatingError."""
    error = RatingError(reason)
    for i in members:
        errors[i] = error


def _token_rates(rates: TokenRates, per: int) -> _Fixed:
    return _fixed((rates.input, rates.cached_input_rate, rates.output), per)


def _rate_meter(rows: Sequence[EventRow], members: list[int], book: PriceBook, meter: str, credits: list[int],
                cost: list[int], provider: list[str], rule: list[str], errors: list[ValueError | None]) -> None:  # fmt: skip
    price = book.meters.get(meter)
    if price is None:
        return _refuse(members, errors, f"no price for meter {meter!r} in price book {book.version}")
    # quantity has at most 9 fractional digits (the model's rule): an integer of 10**-9 units.
    by_credits = _fixed((price.credits_per_unit,), 10**9)
    by_cost = _fixed((price.cost_per_unit,), 10**9)
    name = f"meter:{meter}"
    for i in members:
        row = rows[i]
        nanos = units(row.quantity) // 10**9
        credits[i] = by_credits.amount(nanos * by_credits.rates[0])
        cost[i] = by_cost.amount(nanos * by_cost.rates[0])
        provider[i] = row.provider
        rule[i] = name


def _rate_outcomes(rows: Sequence[EventRow], members: list[int], book: PriceBook, outcome_type: str,
                   credits: list[int], cost: list[int], rule: list[str], errors: list[ValueError | None]) -> None:  # fmt: skip
    price = book.outcomes.get(outcome_type)
    if price is None:
        return _refuse(members, errors, f"no outcome price for {outcome_type!r} in price book {book.version}")
    ai_only, assisted, per_outcome = units(price.ai_only), units(price.human_assisted), units(price.cost_per_outcome)
    for i in members:
        row = rows[i]
        amount = ai_only if row.attribution == "ai_only" else assisted
        name = f"outcome:{outcome_type}:{row.attribution}"
        if row.reversal_of:
            # A reversal credits back the outcome it reverses (the worker then prices it at the billed price).
            credits[i], cost[i], rule[i] = -amount, -per_outcome, f"{name}:reversal"
        else:
            credits[i], cost[i], rule[i] = amount, per_outcome, name
