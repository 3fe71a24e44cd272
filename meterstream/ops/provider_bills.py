"""Provider-bill reconciliation: what we metered against what OpenAI and Anthropic billed.

Cost to serve is computed from our events; the provider bills from its own
meter. This module reads the providers' own exports and compares, per provider,
model and day (UTC):

- **tokens** — billed (the provider's usage export) against metered (the stored
  events, saved query ``sql/queries/provider_daily_usage.sql``). Billed tokens
  above metered ones are **unmetered traffic**: usage that never reaches an invoice.
- **cost** — billed (the provider's cost export) against our cost to serve.
- **price-table drift** — the billed cost against *our* price table applied to
  the *billed* tokens (:func:`meterstream.pricing.rating.token_cost`, the rating
  engine's formula). When tokens agree but money does not, our price table is
  out of date (or the provider applied a rate we do not model).

A row is flagged when a gap exceeds ``threshold`` percent of the larger side
(and, for tokens, ``min_tokens`` in absolute terms): ``unmetered``,
``over_metered``, ``cost_gap``, ``price_drift``, or ``no_price`` (a model our
price book does not know). Money is ``Decimal`` from the file to the report:
JSON numbers are parsed as decimals, never floats.

**Formats read** (the JSON the documented endpoints return; one page, a JSON
array of pages, or one page per line as a paginated download gives):

- OpenAI ``GET /v1/organization/usage/completions`` (``bucket_width=1d``,
  ``group_by=model``): buckets with ``start_time`` (Unix seconds) and results
  ``organization.usage.completions.result`` with ``input_tokens`` (cached
  included), ``input_cached_tokens``, ``output_tokens``, ``num_model_requests``, ``model``.
- OpenAI ``GET /v1/organization/costs`` (``group_by=line_item``): results
  ``organization.costs.result`` with ``amount`` ``{value, currency}`` in the
  currency's units and ``line_item`` like ``"gpt-4o-2024-08-06, input"``.
- Anthropic ``GET /v1/organizations/usage_report/messages`` (``bucket_width=1d``,
  ``group_by[]=model``): buckets with ``starting_at`` (RFC 3339) and results with
  ``uncached_input_tokens``, ``cache_creation`` (``ephemeral_5m_input_tokens``,
  ``ephemeral_1h_input_tokens``), ``cache_read_input_tokens``, ``output_tokens``, ``model``.
- Anthropic ``GET /v1/organizations/cost_report`` (``group_by[]=description``):
  results with ``amount`` — a decimal string in the currency's **lowest units**
  (cents: ``"123.45"`` is $1.2345) — ``currency``, ``cost_type`` (``tokens``,
  ``web_search``, ``code_execution``), ``model``, ``token_type``.

Token conventions are meterstream's: input includes cached input and cache
writes; Anthropic's uncached input, cache writes and cache reads are summed into
input, cache reads are the cached part. Provider model names lose their date
snapshot suffix (``gpt-4o-2024-08-06`` -> ``gpt-4o``,
``claude-sonnet-4-5-20250929`` -> ``claude-sonnet-4-5``) unless an alias maps them.
Costs that are not token costs (Anthropic's web search, code execution) are
reported per provider and day with model ``(other: web_search)``; cost lines no
model can be read from go to model ``(unattributed)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterstream.pricing.plans import Catalog, period_bounds
from meterstream.pricing.pricebook import PriceBook
from meterstream.pricing.rating import RatingError, token_cost

ZERO = Decimal(0)
HUNDRED = Decimal(100)
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


class BillFileError(ValueError):
    """A provider export that cannot be read; the message names the file and the place."""


@dataclass
class BilledDay:
    """What one provider billed for one model on one day."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    cost: Decimal | None = None
    has_usage: bool = False

    def add_cost(self, amount: Decimal) -> None:
        self.cost = (self.cost or ZERO) + amount


@dataclass
class ProviderBills:
    """Everything read from the export files, keyed by (provider, model, day)."""

    days: dict[tuple[str, str, str], BilledDay] = field(default_factory=dict)
    currencies: set[str] = field(default_factory=set)
    #: (file, kind) of each file read, kind one of openai_usage, openai_costs, anthropic_usage, anthropic_costs
    files: list[tuple[str, str]] = field(default_factory=list)

    def at(self, provider: str, model: str, day: str) -> BilledDay:
        return self.days.setdefault((provider, model, day), BilledDay())


def normalise_model(name: str, aliases: Mapping[str, str] | None = None) -> str:
    if aliases and name in aliases:
        return aliases[name]
    return _SNAPSHOT.sub("", name)


def _pages(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    try:
        data = json.loads(text, parse_float=Decimal)  # money never passes through a float
        pages = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            pages = [json.loads(line, parse_float=Decimal) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise BillFileError(f"{path}: not JSON or JSON Lines: {exc}") from None
    for number, page in enumerate(pages):
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            raise BillFileError(f"{path}: page {number}: expected an object with a 'data' list of buckets")
    return pages


def detect_kind(pages: list[dict[str, Any]]) -> str | None:
    for page in pages:
        for bucket in page["data"]:
            for result in bucket.get("results") or []:
                obj = result.get("object", "")
                if obj.startswith("organization.usage."):
                    return "openai_usage"
                if obj == "organization.costs.result":
                    return "openai_costs"
                if "uncached_input_tokens" in result:
                    return "anthropic_usage"
                if "amount" in result and "currency" in result:
                    return "anthropic_costs"
    return None


def _int(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BillFileError(f"{where}: expected a token count, got {value!r}")
    return value


def _day_of_unix(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BillFileError(f"{where}: start_time should be Unix seconds, got {value!r}")
    return datetime.fromtimestamp(value, tz=timezone.utc).date().isoformat()


def _day_of_rfc3339(value: Any, where: str) -> str:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(timezone.utc).date().isoformat()
    except ValueError:
        raise BillFileError(f"{where}: starting_at should be an RFC 3339 time, got {value!r}") from None


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool):
        raise BillFileError(f"{where}: expected an amount, got {value!r}")
    if isinstance(value, (Decimal, int)):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value)
        except ArithmeticError:
            pass
    raise BillFileError(f"{where}: expected an amount, got {value!r}")


def read_bills(paths: Iterable[Path], aliases: Mapping[str, str] | None = None) -> ProviderBills:
    """Read provider exports; the kind of each file is recognised from its results."""
    bills = ProviderBills()
    for path in paths:
        try:
            pages = _pages(path)
        except OSError as exc:
            raise BillFileError(f"{path}: {exc}") from None
        kind = detect_kind(pages)
        if kind is None:
            raise BillFileError(f"{path}: no results, or not an OpenAI/Anthropic usage or cost export")
        bills.files.append((str(path), kind))
        for p, page in enumerate(pages):
            for b, bucket in enumerate(page["data"]):
                for r, result in enumerate(bucket.get("results") or []):
                    where = f"{path}: data[{b}].results[{r}]" + (f" (page {p})" if len(pages) > 1 else "")
                    _READERS[kind](bills, bucket, result, where, aliases)
    return bills


def _openai_usage(bills: ProviderBills, bucket: dict[str, Any], result: dict[str, Any], where: str, aliases: Any) -> None:
    day = _day_of_unix(bucket.get("start_time"), where)
    model = normalise_model(result.get("model") or "(unattributed)", aliases)
    billed = bills.at("openai", model, day)
    billed.has_usage = True
    billed.input_tokens += _int(result.get("input_tokens"), f"{where}.input_tokens")
    billed.cached_input_tokens += _int(result.get("input_cached_tokens"), f"{where}.input_cached_tokens")
    billed.output_tokens += _int(result.get("output_tokens"), f"{where}.output_tokens")
    billed.requests += _int(result.get("num_model_requests"), f"{where}.num_model_requests")


def _openai_costs(bills: ProviderBills, bucket: dict[str, Any], result: dict[str, Any], where: str, aliases: Any) -> None:
    day = _day_of_unix(bucket.get("start_time"), where)
    amount = result.get("amount") or {}
    bills.currencies.add(str(amount.get("currency", "usd")).upper())
    line_item = result.get("line_item") or ""
    model = normalise_model(line_item.rsplit(",", 1)[0].strip(), aliases) if "," in line_item else "(unattributed)"
    bills.at("openai", model, day).add_cost(_decimal(amount.get("value", 0), f"{where}.amount.value"))


def _anthropic_usage(bills: ProviderBills, bucket: dict[str, Any], result: dict[str, Any], where: str, aliases: Any) -> None:
    day = _day_of_rfc3339(bucket.get("starting_at"), where)
    model = normalise_model(result.get("model") or "(unattributed)", aliases)
    billed = bills.at("anthropic", model, day)
    billed.has_usage = True
    creation = result.get("cache_creation") or {}
    cache_write = sum(_int(creation.get(k), f"{where}.cache_creation.{k}") for k in sorted(creation))
    cache_read = _int(result.get("cache_read_input_tokens"), f"{where}.cache_read_input_tokens")
    billed.input_tokens += _int(result.get("uncached_input_tokens"), f"{where}.uncached_input_tokens") + cache_write + cache_read
    billed.cached_input_tokens += cache_read
    billed.output_tokens += _int(result.get("output_tokens"), f"{where}.output_tokens")


def _anthropic_costs(bills: ProviderBills, bucket: dict[str, Any], result: dict[str, Any], where: str, aliases: Any) -> None:
    day = _day_of_rfc3339(bucket.get("starting_at"), where)
    bills.currencies.add(str(result.get("currency", "USD")).upper())
    cost_type = result.get("cost_type") or "tokens"
    if cost_type != "tokens":
        model = f"(other: {cost_type})"
    else:
        model = normalise_model(result.get("model") or "(unattributed)", aliases)
    cents = _decimal(result.get("amount", "0"), f"{where}.amount")
    bills.at("anthropic", model, day).add_cost(cents / HUNDRED)  # lowest currency units -> units


_READERS: dict[str, Callable[..., None]] = {
    "openai_usage": _openai_usage,
    "openai_costs": _openai_costs,
    "anthropic_usage": _anthropic_usage,
    "anthropic_costs": _anthropic_costs,
}


# -- the comparison ---------------------------------------------------------------------------


@dataclass
class MeteredDay:
    events: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_to_serve: Decimal = ZERO
    #: price book version -> events it priced (the day's most used one prices the drift check)
    books: dict[str, int] = field(default_factory=dict)


def metered_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], MeteredDay]:
    """``provider_daily_usage`` rows, summed over price book versions."""
    out: dict[tuple[str, str, str], MeteredDay] = {}
    for row in rows:
        day = out.setdefault((row["provider"], row["model"], str(row["day"])), MeteredDay())
        day.events += int(row["events"])
        day.input_tokens += int(row["input_tokens"])
        day.cached_input_tokens += int(row["cached_input_tokens"])
        day.output_tokens += int(row["output_tokens"])
        day.cost_to_serve += Decimal(row["cost_to_serve"])
        day.books[row["price_book_version"]] = day.books.get(row["price_book_version"], 0) + int(row["events"])
    return out


@dataclass
class ReconciledRow:
    provider: str
    model: str
    day: str
    metered: MeteredDay
    billed: BilledDay | None
    #: our price table applied to the billed tokens (None: no usage export, or no price)
    priced_billed_tokens: Decimal | None
    price_book_version: str
    flags: list[str]

    @property
    def metered_tokens(self) -> int:
        return self.metered.input_tokens + self.metered.output_tokens

    @property
    def billed_tokens(self) -> int | None:
        if self.billed is None or not self.billed.has_usage:
            return None
        return self.billed.input_tokens + self.billed.output_tokens

    @property
    def token_gap(self) -> int | None:
        billed = self.billed_tokens
        return None if billed is None else billed - self.metered_tokens

    @property
    def cost_gap(self) -> Decimal | None:
        if self.billed is None or self.billed.cost is None:
            return None
        return self.billed.cost - self.metered.cost_to_serve

    @property
    def drift(self) -> Decimal | None:
        if self.billed is None or self.billed.cost is None or self.priced_billed_tokens is None:
            return None
        return self.billed.cost - self.priced_billed_tokens

    def to_json(self) -> dict[str, Any]:
        b = self.billed
        has_usage = b is not None and b.has_usage

        def text(value: Any) -> Any:
            return None if value is None else str(value)

        return {
            "provider": self.provider, "model": self.model, "day": self.day,
            "metered": {"events": self.metered.events, "input_tokens": self.metered.input_tokens,
                        "cached_input_tokens": self.metered.cached_input_tokens,
                        "output_tokens": self.metered.output_tokens, "cost": str(self.metered.cost_to_serve)},
            "billed": {"input_tokens": b.input_tokens if b is not None and has_usage else None,
                       "cached_input_tokens": b.cached_input_tokens if b is not None and has_usage else None,
                       "output_tokens": b.output_tokens if b is not None and has_usage else None,
                       "requests": b.requests if b is not None and has_usage and self.provider == "openai" else None,
                       "cost": text(b.cost if b is not None else None)},
            "token_gap": self.token_gap, "token_gap_percent": text(_percent(self.token_gap, self.billed_tokens, self.metered_tokens)),
            "cost_gap": text(self.cost_gap),
            "priced_billed_tokens": text(self.priced_billed_tokens), "price_book_version": self.price_book_version,
            "price_drift": text(self.drift), "flags": self.flags,
        }  # fmt: skip


def _percent(gap: int | Decimal | None, a: int | Decimal | None, b: int | Decimal) -> Decimal | None:
    if gap is None:
        return None
    base = max(abs(Decimal(a or 0)), abs(Decimal(b)))
    if base == 0:
        return Decimal(0)
    return (Decimal(gap) * HUNDRED / base).quantize(Decimal("0.01"))


@dataclass
class Reconciliation:
    period: str
    threshold_percent: Decimal
    rows: list[ReconciledRow]
    files: list[tuple[str, str]]
    currency: str

    @property
    def flagged(self) -> list[ReconciledRow]:
        return [r for r in self.rows if r.flags]

    def totals(self) -> list[dict[str, Any]]:
        out = []
        for provider in sorted({r.provider for r in self.rows}):
            rows = [r for r in self.rows if r.provider == provider]
            billed_cost = [r.billed.cost for r in rows if r.billed is not None and r.billed.cost is not None]
            billed_tokens = [r.billed_tokens for r in rows if r.billed_tokens is not None]
            out.append({
                "provider": provider,
                "metered_tokens": sum(r.metered_tokens for r in rows),
                "billed_tokens": sum(billed_tokens) if billed_tokens else None,
                "metered_cost": str(sum((r.metered.cost_to_serve for r in rows), ZERO)),
                "billed_cost": str(sum(billed_cost, ZERO)) if billed_cost else None,
                "flagged_rows": sum(1 for r in rows if r.flags),
            })  # fmt: skip
        return out

    def to_json(self) -> dict[str, Any]:
        return {"period": self.period, "threshold_percent": str(self.threshold_percent), "currency": self.currency,
                "files": [{"file": f, "kind": k} for f, k in self.files], "totals": self.totals(),
                "rows": [r.to_json() for r in self.rows], "flagged": len(self.flagged)}  # fmt: skip


def _book_for(catalog: Catalog, version: str, day: str) -> tuple[str, PriceBook] | None:
    """The plan version (its name, as rated rows record it) whose price book prices ``day``'s tokens.

    The one that priced most of the day's metered rows; with none, the default plan's on that day.
    """
    if version:
        named = catalog.version_named(version)
        if named is not None:
            return version, named.price_book
    if catalog.default_plan is None:
        return None
    at = datetime.combine(date.fromisoformat(day), datetime.min.time(), tzinfo=timezone.utc)
    found = catalog.plans[catalog.default_plan].version_at(at)
    return (found.version, found.price_book) if found is not None else None


def reconcile(
    period: str,
    metered: Mapping[tuple[str, str, str], MeteredDay],
    bills: ProviderBills,
    catalog: Catalog,
    *,
    threshold_percent: Decimal = Decimal(1),
    min_tokens: int = 0,
    min_cost: Decimal = ZERO,
) -> Reconciliation:
    """Metered against billed per (provider, model, day) of ``period``, for the providers the files cover."""
    start, end = period_bounds(period)
    first, last = start.date().isoformat(), end.date().isoformat()
    covered = {tuple(kind.split("_")) for _, kind in bills.files}
    providers = {provider for provider, _ in covered}
    keys = {k for k in bills.days if first <= k[2] < last} | {k for k in metered if k[0] in providers}
    rows = []
    for provider, model, day in sorted(keys):
        m = metered.get((provider, model, day), MeteredDay())
        b = bills.days.get((provider, model, day))
        # A provider whose usage (or cost) export is given billed nothing it does not list.
        if b is None and (provider, "usage") in covered:
            b = BilledDay(has_usage=True)
        if b is not None and b.cost is None and (provider, "costs") in covered:
            b.cost = ZERO
        version = max(m.books, key=lambda v: (m.books[v], v)) if m.books else ""
        flags: list[str] = []
        priced = None
        if b is not None and b.has_usage and not model.startswith("("):
            found = _book_for(catalog, version, day)
            try:
                if found is None:
                    raise RatingError(f"no price book in effect on {day}")
                version, book = found
                priced = token_cost(book, model, input_tokens=b.input_tokens,
                                    cached_input_tokens=b.cached_input_tokens, output_tokens=b.output_tokens)  # fmt: skip
            except RatingError:
                flags.append("no_price")
        row = ReconciledRow(provider, model, day, m, b, priced, version, flags)
        gap = row.token_gap
        pct = _percent(gap, row.billed_tokens, row.metered_tokens)
        if gap is not None and pct is not None and abs(pct) > threshold_percent and abs(gap) > min_tokens:
            flags.append("unmetered" if gap > 0 else "over_metered")
        cost_gap = row.cost_gap
        if cost_gap is not None and abs(cost_gap) > min_cost:
            cost_pct = _percent(cost_gap, b.cost, m.cost_to_serve)  # type: ignore[union-attr]
            if cost_pct is not None and abs(cost_pct) > threshold_percent:
                flags.append("cost_gap")
        drift = row.drift
        if drift is not None and abs(drift) > min_cost:
            drift_pct = _percent(drift, b.cost, priced)  # type: ignore[union-attr, arg-type]
            if drift_pct is not None and abs(drift_pct) > threshold_percent:
                flags.append("price_drift")
        rows.append(row)
    currency = ",".join(sorted(bills.currencies)) or "USD"
    return Reconciliation(period, threshold_percent, rows, bills.files, currency)


def iter_table_rows(result: Reconciliation) -> Iterator[list[str]]:
    """The text table's cells, one list per row (the CLI renders them)."""
    for r in result.rows:
        b = r.billed

        def money(v: Decimal | None) -> str:
            return "-" if v is None else f"{v.quantize(Decimal('0.0001')):,}"

        billed_tokens = r.billed_tokens
        yield [
            r.provider, r.model, r.day, f"{r.metered_tokens:,}", "-" if billed_tokens is None else f"{billed_tokens:,}",
            "-" if r.token_gap is None else f"{r.token_gap:+,}", money(r.metered.cost_to_serve),
            money(b.cost if b is not None else None), money(r.priced_billed_tokens), money(r.drift), " ".join(r.flags),
        ]  # fmt: skip
