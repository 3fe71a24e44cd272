"""Money: Decimal only, and the one rounding rule for invoice lines.

Rule: per-event credits and costs keep the store's precision, 18 fractional
digits (the rating engine's integers, cut toward zero beyond them, as the
Decimal(38, 18) columns hold them; meterstream/pricing/engine.py);
an amount shown on an invoice line is rounded once, half-up (ROUND_HALF_UP),
to the currency's minor unit. Totals are sums of rounded lines, so the lines
always add up to the total a customer sees.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

#: Minor units per ISO 4217 currency; anything absent uses 2.
_MINOR_UNITS = {"JPY": 0, "KRW": 0, "BHD": 3, "KWD": 3}


def minor_unit_exponent(currency: str) -> Decimal:
    return Decimal(1).scaleb(-_MINOR_UNITS.get(currency.upper(), 2))


def round_money(amount: Decimal, currency: str = "USD") -> Decimal:
    """Round an invoice line half-up to the currency's minor unit."""
    if not isinstance(amount, Decimal):
        raise TypeError(f"money must be Decimal, got {type(amount).__name__}")
    return amount.quantize(minor_unit_exponent(currency), rounding=ROUND_HALF_UP)


def to_decimal(value: object, *, field: str = "value") -> Decimal:
    """Read a price from a file without float arithmetic (floats go through ``str``)."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a number, got a boolean")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, (int, str)):
        try:
            result = Decimal(value)
        except InvalidOperation as exc:
            raise ValueError(f"{field}: {value!r} is not a number") from exc
    elif isinstance(value, float):
        result = Decimal(repr(value))
    else:
        raise ValueError(f"{field}: expected a number, got {type(value).__name__}")
    if not result.is_finite():
        raise ValueError(f"{field}: must be finite, got {value!r}")
    return result
