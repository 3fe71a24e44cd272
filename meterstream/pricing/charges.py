"""Charge models: how a quantity of units becomes money. Pure tier maths, ``Decimal`` only.

One function per model (docs/pricing.md, "Prices and plans"):

* :func:`per_unit` — quantity × price;
* :func:`graduated` — each unit at the price of the tier it falls in;
* :func:`volume` — every unit at the price of the tier the total reaches;
* :func:`package` — price per *started* package;
* :func:`flat` — a fixed fee.

Each returns a :class:`Charge`: the exact (unrounded) amount and the bands it
is made of, so an invoice can show overage band by band. Rounding happens
later, once per invoice line (see :mod:`meterstream.pricing.invoice`).

Tiers are ``(lower, up_to]`` intervals: ``up_to`` is inclusive, the next tier
starts just above it, and the last tier -- only the last -- has ``up_to: None``
("no upper bound"), so every unit has a price. With tiers 0–1,000 / 1,001–5,000 / above 5,000, exactly 1,000
units are all in the first tier and 1,000.5 units reach the second. Quantities
may be fractional (credits usually are), so a tier boundary is a real number,
not an integer count.

:class:`ChargeModel` is the same choice as data (a plan's ``overage:`` block).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meterstream.pricing.money import to_decimal

ZERO = Decimal(0)

#: Spellings of "no upper bound" a YAML file read with ``yaml.BaseLoader`` can produce.
_UNBOUNDED = {"null", "Null", "NULL", "~", ""}


def _price(value: Any) -> Decimal:
    try:
        return to_decimal(value)
    except ValueError as exc:
        # The error's location already names the field.
        raise ValueError(str(exc).removeprefix("value: ")) from None


def null_to_none(value: Any) -> Any:
    """YAML read with ``BaseLoader`` spells null as a string; make it ``None``."""
    if isinstance(value, str) and value.strip() in _UNBOUNDED:
        return None
    return value


def _bound(value: Any) -> Any:
    value = null_to_none(value)
    return None if value is None else _price(value)


Price = Annotated[Decimal, BeforeValidator(_price), Field(ge=0)]
"""A non-negative money amount (or quantity) read without float arithmetic."""

PositiveDecimal = Annotated[Decimal, BeforeValidator(_price), Field(gt=0)]


class Tier(BaseModel):
    """One tier: units up to ``up_to`` (inclusive; ``None`` = no bound) at ``unit_price`` each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    up_to: Annotated[Annotated[Decimal, Field(gt=0)] | None, BeforeValidator(_bound)] = None
    unit_price: Price
    #: A fixed amount for reaching this tier (Lago's flat_amount, Orb's tiered package fee):
    #: graduated adds the flat fee of every tier reached, volume that of the tier reached.
    flat_fee: Price = ZERO


def _check_tiers(tiers: tuple[Tier, ...]) -> tuple[Tier, ...]:
    # Errors carry ``at`` (a path inside the tier list) so a file's error message
    # can name the exact tier, e.g. ``...overage.tiers[1].up_to``.
    if not tiers:
        raise PydanticCustomError("tiers", "at least one tier is needed", {"at": ()})
    previous: Decimal = ZERO
    for index, tier in enumerate(tiers):
        last = index == len(tiers) - 1
        if tier.up_to is None:
            if not last:
                raise PydanticCustomError(
                    "tiers",
                    "only the last tier may be unbounded (up_to: null)",
                    {"at": (index, "up_to")},
                )
            continue
        if last:
            # A bounded last tier would leave the units above it without a price.
            raise PydanticCustomError(
                "tiers",
                "the last tier must be unbounded (up_to: null) so every unit has a price",
                {"at": (index, "up_to")},
            )
        if tier.up_to <= previous:
            raise PydanticCustomError(
                "tiers",
                "tier bounds must increase strictly: {up_to} is not above the previous bound {previous}",
                {"at": (index, "up_to"), "up_to": str(tier.up_to), "previous": str(previous)},
            )
        previous = tier.up_to
    return tiers


Tiers = Annotated[tuple[Tier, ...], AfterValidator(_check_tiers)]
"""A validated tier list: at least one tier, strictly increasing bounds, the last (only) unbounded."""

_TIERS = TypeAdapter(Tiers)


def make_tiers(tiers: Iterable[Tier | Mapping[str, Any]]) -> tuple[Tier, ...]:
    """Validate tiers given as :class:`Tier` objects or ``{up_to, unit_price}`` mappings."""
    return _TIERS.validate_python(tuple(tiers))


@dataclass(frozen=True)
class Band:
    """A slice of a charge: ``quantity`` units (``start``, ``end``] at ``unit_price``.

    ``start``/``end`` are positions in the charged quantity (not tier bounds), so
    a graduated charge of 6,000 units has bands 0–1,000, 1,000–5,000, 5,000–6,000.
    For :func:`package` the ``quantity`` counts packages, and ``unit_price`` is the
    package price; ``start``/``end`` are still in units.
    """

    start: Decimal
    end: Decimal
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal
    #: "" for units or a tier's flat fee; "floor" for a volume floor's top-up (see :func:`volume`).
    label: str = ""


@dataclass(frozen=True)
class Charge:
    """An exact, unrounded amount and the bands that make it up."""

    amount: Decimal
    bands: tuple[Band, ...] = ()


def _check_quantity(quantity: Decimal) -> Decimal:
    if not isinstance(quantity, Decimal):
        raise TypeError(f"quantity must be Decimal, got {type(quantity).__name__}")
    if not quantity.is_finite() or quantity < 0:
        raise ValueError(f"quantity must be a finite non-negative Decimal, got {quantity}")
    return quantity


def _band(start: Decimal, end: Decimal, quantity: Decimal, unit_price: Decimal) -> Band:
    return Band(start=start, end=end, quantity=quantity, unit_price=unit_price, amount=quantity * unit_price)


def _flat_band(at: Decimal, fee: Decimal) -> Band:
    """A tier's flat fee: one band of quantity 1 at ``at`` (start == end marks it as a fee)."""
    return Band(start=at, end=at, quantity=Decimal(1), unit_price=fee, amount=fee)


def _charge(bands: Iterable[Band]) -> Charge:
    kept = tuple(b for b in bands if b.quantity)
    return Charge(amount=sum((b.amount for b in kept), ZERO), bands=kept)


def per_unit(quantity: Decimal, unit_price: Decimal) -> Charge:
    """Every unit at one price."""
    _check_quantity(quantity)
    return _charge([_band(ZERO, quantity, quantity, unit_price)])


def graduated_slice(lower: Decimal, upper: Decimal, tiers: Iterable[Tier | Mapping[str, Any]]) -> Charge:
    """The graduated charge for unit positions (``lower``, ``upper``] only.

    ``graduated(q) == graduated_slice(0, q)``, and for ``a <= b``
    ``graduated(b).amount - graduated(a).amount == graduated_slice(a, b).amount``:
    this is how an invoice says which overage bands a credit grant displaced.
    """
    _check_quantity(lower)
    _check_quantity(upper)
    if upper < lower:
        raise ValueError(f"upper ({upper}) must not be below lower ({lower})")
    bands: list[Band] = []
    tier_start = ZERO
    for tier in make_tiers(tiers):
        tier_end = tier.up_to
        start = max(lower, tier_start)
        end = upper if tier_end is None else min(upper, tier_end)
        if end > start:
            bands.append(_band(start, end, end - start, tier.unit_price))
            if tier.flat_fee and lower <= tier_start < end:  # the first unit of the tier is in the slice
                bands.append(_flat_band(tier_start, tier.flat_fee))
        if tier_end is None or tier_end >= upper:
            break
        tier_start = tier_end
    return _charge(bands)


def graduated(quantity: Decimal, tiers: Iterable[Tier | Mapping[str, Any]]) -> Charge:
    """Each unit at the price of the tier it falls in (one band per tier reached)."""
    return graduated_slice(ZERO, quantity, tiers)


def volume(quantity: Decimal, tiers: Iterable[Tier | Mapping[str, Any]], *, floor: bool = False) -> Charge:
    """Every unit at the price of the tier the total reaches (a single band).

    By definition this can fall when the total crosses into a cheaper tier (PRICING.md:
    6,000 units cost $300 where 5,000 cost $400). With ``floor`` (opt-in, a plan's
    ``volume_floor: true``) the charge is never less than the top of a tier below: what
    the largest quantity of any lower tier costs (its ``up_to`` at its price, plus its flat
    fee). Then more units never cost less. The charge is then one band labelled
    ``"floor"`` (quantity 1, the amount as its price), so an invoice rounds it once and
    the rounded charge is monotone too.
    """
    _check_quantity(quantity)
    validated = make_tiers(tiers)
    reached = next(t for t in validated if t.up_to is None or quantity <= t.up_to)
    bands = [_band(ZERO, quantity, quantity, reached.unit_price)]
    if reached.flat_fee and quantity:
        bands.append(_flat_band(ZERO, reached.flat_fee))
    charge = _charge(bands)
    if floor and quantity:
        tops = [t.up_to * t.unit_price + t.flat_fee for t in validated if t.up_to is not None and t.up_to < quantity]
        amount = max([charge.amount, *tops])
        return Charge(amount=amount, bands=(Band(ZERO, quantity, Decimal(1), amount, amount, label="floor"),))
    return charge


def package(quantity: Decimal, package_size: Decimal, package_price: Decimal) -> Charge:
    """``package_price`` per started package of ``package_size`` units; the band counts packages."""
    _check_quantity(quantity)
    if package_size <= 0:
        raise ValueError(f"package_size must be positive, got {package_size}")
    whole, remainder = divmod(quantity, package_size)
    packages = whole + (1 if remainder else 0)
    return _charge([_band(ZERO, quantity, packages, package_price)])


def flat(fee: Decimal) -> Charge:
    """A fixed fee (one band of quantity 1)."""
    return _charge([_band(ZERO, Decimal(1), Decimal(1), fee)])


ChargeModelName = Literal["per_unit", "graduated", "volume", "package"]

#: The fields each model needs; any other price field is a mistake in the file.
_FIELDS: dict[str, set[str]] = {
    "per_unit": {"unit_price"},
    "graduated": {"tiers"},
    "volume": {"tiers"},
    "package": {"package_size", "package_price"},
}


class ChargeModel(BaseModel):
    """A charge model as data, e.g. a plan's ``overage:`` block::

        model: graduated            # per_unit | graduated | volume | package
        tiers: [{up_to: "100000", unit_price: "0.012"}, {up_to: null, unit_price: "0.010", flat_fee: "25"}]
        free_units: "0"             # optional, any model: units given free before the model applies

    ``per_unit`` takes ``unit_price``; ``package`` takes ``package_size`` and ``package_price``;
    a tier's optional ``flat_fee`` is charged once when the tier is reached (graduated: every
    tier reached; volume: the tier reached).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ChargeModelName
    unit_price: Annotated[Price | None, BeforeValidator(null_to_none)] = None
    tiers: Annotated[Tiers | None, BeforeValidator(null_to_none)] = None
    package_size: Annotated[PositiveDecimal | None, BeforeValidator(null_to_none)] = None
    package_price: Annotated[Price | None, BeforeValidator(null_to_none)] = None
    #: Units given free before the model applies (any model), e.g. the first 200 documents.
    free_units: Price = ZERO
    #: Volume only, opt-in: never less than the top of a tier below, so more units never cost less.
    volume_floor: bool = False

    @model_validator(mode="after")
    def _fields_match_model(self) -> ChargeModel:
        needed = _FIELDS[self.model]
        for name in sorted(needed):
            if getattr(self, name) is None:
                raise PydanticCustomError(
                    "charge_model", "required for model {model}", {"at": (name,), "model": self.model}
                )
        for name in sorted(set().union(*_FIELDS.values()) - needed):
            if getattr(self, name) is not None:
                raise PydanticCustomError(
                    "charge_model", "not used by model {model}", {"at": (name,), "model": self.model}
                )
        if self.volume_floor and self.model != "volume":
            raise PydanticCustomError(
                "charge_model", "volume_floor is for model volume, not {model}", {"at": ("volume_floor",), "model": self.model}
            )
        return self

    @property
    def is_positional(self) -> bool:
        """True when each unit's price depends only on its position (per_unit, graduated).

        Only then can the value of a slice of units be shown as bands with a unit price.
        """
        return self.model in ("per_unit", "graduated")

    def charge(self, quantity: Decimal) -> Charge:
        """The charge for ``quantity`` units: the model applied to the units above ``free_units``."""
        if self.free_units:
            _check_quantity(quantity)
            return self._charge(max(quantity - self.free_units, ZERO))
        return self._charge(quantity)

    def _charge(self, quantity: Decimal) -> Charge:
        if self.model == "per_unit":
            assert self.unit_price is not None
            return per_unit(quantity, self.unit_price)
        if self.model == "graduated":
            assert self.tiers is not None
            return graduated(quantity, self.tiers)
        if self.model == "volume":
            assert self.tiers is not None
            return volume(quantity, self.tiers, floor=self.volume_floor)
        assert self.package_size is not None and self.package_price is not None
        return package(quantity, self.package_size, self.package_price)

    def between(self, lower: Decimal, upper: Decimal) -> Charge:
        """What units (``lower``, ``upper``] add to the charge: ``charge(upper) - charge(lower)``.

        For positional models the bands say which tiers those units were in; for
        volume and package pricing a slice has no unit price of its own, so the
        result has the amount and no bands.
        """
        if self.free_units:
            return Charge(amount=self.charge(upper).amount - self.charge(lower).amount)
        if self.model == "per_unit":
            assert self.unit_price is not None
            _check_quantity(lower)
            if upper < lower:
                raise ValueError(f"upper ({upper}) must not be below lower ({lower})")
            return _charge([_band(lower, upper, upper - lower, self.unit_price)])
        if self.model == "graduated":
            assert self.tiers is not None
            return graduated_slice(lower, upper, self.tiers)
        return Charge(amount=self.charge(upper).amount - self.charge(lower).amount)
