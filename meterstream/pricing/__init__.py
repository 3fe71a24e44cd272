"""Pricing rules in one place, free of Kafka and ClickHouse imports."""

from meterstream.pricing.money import round_money, to_decimal
from meterstream.pricing.pricebook import PriceBook, PriceBookError, load_price_book
from meterstream.pricing.rating import RatingError, rate_event

__all__ = [
    "PriceBook",
    "PriceBookError",
    "RatingError",
    "load_price_book",
    "rate_event",
    "round_money",
    "to_decimal",
]
