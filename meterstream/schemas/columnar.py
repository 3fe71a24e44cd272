"""Events validated as columns: fast accept, exact reject.

:func:`accept` looks at a batch of records given as columns (one list of values per
wire field) and accepts, with whole-column operations (one regex pass over a column's
values joined, RE2 through Arrow for large columns; sets, ``min``/``max`` and other
C-level list passes), the rows it can prove the pydantic models accept. It never
rejects anything: every row it does not accept is for the caller to validate alone
with :class:`~meterstream.schemas.events.UsageEvent` /
:class:`~meterstream.schemas.events.OutcomeEvent`, so the accept/reject decision, the
error text, type and location of every rejected row are the model's by construction.

**The rule.** A row is accepted by the fast path only if all of these hold; everything
else goes to the model:

- its kind is outcome when ``type`` is the string ``"outcome"``, else usage, and it has
  no field the kind's model does not know (a key given with ``None`` counts as absent
  when ``none_is_absent``, i.e. an empty CSV cell or a Parquet null);
- ``event_id`` and ``customer_id`` (and, for outcomes, ``outcome_type``) are ``str``
  matching the identifier pattern ``^[A-Za-z0-9][A-Za-z0-9._:@/\\-]*$`` and at most 128
  characters; ``workflow_id``, ``run_id``, ``model``, ``provider``, ``reversal_of`` are
  absent, ``None`` or such an identifier;
- ``occurred_at`` is a ``str`` of the form ``YYYY-MM-DDTHH:MM:SSZ``,
  ``YYYY-MM-DDTHH:MM:SS.mmmZ`` or ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (ASCII digits; the last
  is what the SDK writes) that :meth:`datetime.fromisoformat`
  reads (the model's own reading of that form), not before 2000-01-01 and not more than
  :data:`~meterstream.schemas.events.MAX_FUTURE_SKEW` after ``now`` (read from the
  caller's clock *before* the call; the model reads its clock later, so a row accepted
  here is accepted there);
- ``schema_version`` is absent or the ``int`` 1; ``type`` is absent or ``"usage"`` for
  usage; ``meter`` is absent or one of the :class:`~meterstream.schemas.events.Meter`
  values; ``attribution`` one of the :class:`~meterstream.schemas.events.Attribution`
  values;
- token counts are absent or ``int`` (not ``bool``) in 0..100,000,000; ``quantity`` is
  absent, an ``int`` in 0..10¹², or a ``str`` of at most 12 ASCII digits without a
  leading zero (or ``"0"``); ``unit`` is absent, ``None`` or a ``str`` of at most 32
  printable ASCII characters other than ``"`` and ``\\``;
- ``attributes`` is absent or a ``dict`` of at most 32 entries whose keys are ``str`` of
  1..64 such characters and whose values are such ``str`` of at most 256 characters,
  ``bool``, or ``int`` within 64 bits;
- the model's cross-field rule holds: a tokens event has a model, no quantity and
  ``cached_input_tokens <= input_tokens``; any other meter has no token counts and a
  positive quantity.

``None`` for a field the model does not allow to be null (anything but the optional
identifiers and ``unit``) is a rejection here unless ``none_is_absent``. For accepted
rows :func:`accept` also builds, column-wise, the bytes ``wire_bytes()`` of the
model would produce (``tests/unit/test_ingest_fuzz.py`` compares both on generated
and hostile input, for JSON Lines, CSV and Parquet, and for ``record_many``'s batches).

**Python values** (``python=True``, the SDK's ``record_many``: fields as an application
passes them to the model, never read from JSON). Besides the above, the fast path then
takes the values the model reads exactly as their wire form, and nothing else:

- ``occurred_at`` an exact :class:`~datetime.datetime` whose ``tzinfo`` is
  :data:`datetime.timezone.utc` (the model keeps it as it is), within the same limits,
  when the whole column of the kind's rows is such datetimes (a column mixing them with
  strings goes to the model);
- ``meter`` / ``attribution`` an exact :class:`~meterstream.schemas.events.Meter` /
  :class:`~meterstream.schemas.events.Attribution` member (as its value);
- ``quantity`` an exact :class:`~decimal.Decimal` whose ``str`` is the digits form above
  (the model keeps the Decimal and writes its ``str``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from functools import cache
from itertools import chain
from operator import attrgetter, le
from typing import Any, Final

import orjson

try:  # RE2 through Arrow for long columns (imports, the worker); the SDK installed alone matches with `re`
    import pyarrow as pa
    import pyarrow.compute as pc
except ImportError:  # pragma: no cover - exercised by tests/system/test_packaging.py's SDK-only venv
    pa = pc = None

from meterstream.schemas.events import (
    EARLIEST_OCCURRED_AT,
    MAX_ATTRIBUTE_KEY_LENGTH,
    MAX_ATTRIBUTE_VALUE_LENGTH,
    MAX_ATTRIBUTES,
    MAX_FUTURE_SKEW,
    Attribution,
    Meter,
    OutcomeEvent,
    UsageEvent,
)

USAGE_FIELDS: Final = frozenset(UsageEvent.model_fields)
OUTCOME_FIELDS: Final = frozenset(OutcomeEvent.model_fields)
_IDENTIFIER = r"[A-Za-z0-9][A-Za-z0-9._:@/\-]{0,127}"
_CANONICAL_UTC = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{3}|\.[0-9]{6})?Z"
_QUANTITY_DIGITS = r"0|[1-9][0-9]{0,11}"
#: Printable ASCII without '"' and '\\': JSON writes such a string as it is (pydantic and orjson alike).
_PLAIN_UNIT = r"[ !#-\[\]-~]{0,32}"
_plain = re.compile(r"[ !#-\[\]-~]*").fullmatch
_MAX_TOKENS = 100_000_000
_MAX_QUANTITY = 10**12
_INT64 = (-(2**63), 2**63)
_METERS = frozenset(m.value for m in Meter)
_ATTRIBUTIONS = frozenset(a.value for a in Attribution)
_TOKENS = Meter.TOKENS.value
_NONE = type(None)
_UTC = timezone.utc
_tzinfo = attrgetter("tzinfo")


@dataclass(frozen=True)
class Accepted:
    """The rows the fast path accepted, in batch order, and what the model would have made of them."""

    #: indices into the batch, ascending
    rows: list[int]
    #: per accepted row: True for an outcome, False for usage
    outcome: list[bool]
    customer_id: list[str]
    event_id: list[str]
    #: UTC, equal to the model's ``occurred_at``
    occurred_at: list[datetime]
    #: the model's ``wire_bytes()`` per accepted row (when asked for), else None
    wire: list[bytes] | None


#: Below this many values a pattern is matched with Python's ``re``: RE2 compiles the pattern on every
#: Arrow call (~6 ms for the identifier's ``{0,127}``), which only a large column repays.
_RE2_FROM = 20_000


@cache
def _compiled(pattern: str, joined: bool) -> re.Pattern[str]:
    return re.compile(f"(?:(?:{pattern})\n)*" if joined else f"(?:{pattern})")


def _all_match(values: list[str], pattern: str) -> bool:
    """Every value (all ``str``) matches ``pattern`` whole: one pass over the values joined by newlines."""
    text = "\n".join(values)
    if text.count("\n") != len(values) - 1:  # a value holding a newline: not one of ours
        return False
    if len(values) < _RE2_FROM or pc is None:
        return _compiled(pattern, True).fullmatch(text + "\n") is not None
    return bool(pc.match_substring_regex(pa.array([text + "\n"]), f"^(?:(?:{pattern})\n)*$")[0].as_py())


def _each_match(values: list[str], pattern: str) -> list[bool]:
    if len(values) < _RE2_FROM or pc is None:
        match = _compiled(pattern, False).fullmatch
        return [match(v) is not None for v in values]
    return pc.match_substring_regex(pa.array(values, pa.string()), f"^(?:{pattern})$").to_pylist()  # type: ignore[no-any-return]


class _Rows:
    """One kind's rows of a batch (every column as long as the batch), and the rows refused so far."""

    def __init__(self, columns: Mapping[str, list[Any]], n: int, none_is_absent: bool) -> None:
        self.columns, self.n, self.none_is_absent = columns, n, none_is_absent
        self.refused: set[int] = set()

    def check(self, name: str, kind: type, *, nullable: bool, required: bool = False,
              all_ok: Callable[[list[Any]], bool], each_ok: Callable[[list[Any]], list[bool]]) -> None:  # fmt: skip
        """Refuse the rows whose ``name`` is not absent/None-as-allowed or exactly a ``kind`` passing the tests."""
        values = self.columns.get(name)
        if values is None:
            if required:
                self.refused.update(range(self.n))
            return
        none_ok = not required and (nullable or self.none_is_absent)
        types = set(map(type, values))
        if types == {kind}:
            # one exact type (so no 1 == True merging): a column of few distinct values is checked once per value
            distinct = set(values[:1000])  # a sample first: ids unique per event are not worth a set
            if len(distinct) * 4 <= min(len(values), 1000) and len(distinct := set(values)) * 4 <= len(values):
                unique = list(distinct)
                if not all_ok(unique):
                    bad = {v for v, ok in zip(unique, each_ok(unique), strict=True) if not ok}
                    self.refused.update(i for i, v in enumerate(values) if v in bad)
            elif not all_ok(values):
                self.refused.update(i for i, ok in enumerate(each_ok(values)) if not ok)
            return
        positions, given = [], []
        for i, value in enumerate(values):
            if type(value) is kind:
                positions.append(i)
                given.append(value)
            elif not (value is None and none_ok):
                self.refused.add(i)
        if given and not all_ok(given):
            self.refused.update(positions[j] for j, ok in enumerate(each_ok(given)) if not ok)

    def identifier(self, name: str, *, required: bool) -> None:
        self.check(name, str, nullable=True, required=required, all_ok=lambda v: _all_match(v, _IDENTIFIER),
                   each_ok=lambda v: _each_match(v, _IDENTIFIER))  # fmt: skip

    def in_set(self, name: str, allowed: frozenset[str], *, required: bool = False) -> None:
        self.check(name, str, nullable=False, required=required, all_ok=lambda v: set(v) <= allowed,
                   each_ok=lambda v: [x in allowed for x in v])  # fmt: skip

    def integer(self, name: str, low: int, high: int) -> None:
        self.check(name, int, nullable=False, all_ok=lambda v: low <= min(v) and max(v) <= high,
                   each_ok=lambda v: [low <= x <= high for x in v])  # fmt: skip

    def ints(self, name: str, default: int) -> list[int]:
        """The column's values with None and absence as ``default`` (on rows the checks passed)."""
        values = self.columns.get(name)
        if values is None:
            return [default] * self.n
        return [default if v is None else v for v in values] if None in values else values

    def accepted(self) -> list[int]:
        return [i for i in range(self.n) if i not in self.refused] if self.refused else list(range(self.n))


def transpose(keys: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Dicts of one key layout (every dict's keys are ``keys``, in that order) as columns, in one C-level pass."""
    return dict(zip(keys, map(list, zip(*map(dict.values, rows), strict=True)), strict=True))


def accept(
    columns: Mapping[str, Sequence[Any]],
    n: int,
    *,
    none_is_absent: bool,
    now: datetime,
    wire: bool = False,
    python: bool = False,
) -> Accepted:
    """The rows of the batch the fast path accepts (see the module's rule), with their wire bytes if ``wire``.

    ``columns`` maps a field name to its ``n`` values; a name not in ``columns`` is absent
    from every row. With ``none_is_absent`` False (JSON: the caller groups lines by their
    keys) every row has every key of ``columns``, and ``None`` is an explicit JSON null.
    ``now`` is the caller's clock, read before the call. ``python``: the values are Python
    values given to the model as they are (see the module's rule).
    """
    cols = {name: list(values) for name, values in columns.items()}
    if python:
        _python_values(cols)
    types = cols.get("type")
    if types is None or "outcome" not in types:
        return _accept_kind(cols, n, False, none_is_absent, now, wire, python)
    if all(t == "outcome" for t in types):
        return _accept_kind(cols, n, True, none_is_absent, now, wire, python)
    parts = []
    for outcome in (False, True):
        index = [i for i, t in enumerate(types) if (t == "outcome") is outcome]
        sub = {name: [values[i] for i in index] for name, values in cols.items()}
        got = _accept_kind(sub, len(index), outcome, none_is_absent, now, wire, python)
        parts.append((index, got))
    merged = sorted((index[r], part, j) for index, part in parts for j, r in enumerate(part.rows))
    return Accepted(
        rows=[row for row, _, _ in merged],
        outcome=[part.outcome[j] for _, part, j in merged],
        customer_id=[part.customer_id[j] for _, part, j in merged],
        event_id=[part.event_id[j] for _, part, j in merged],
        occurred_at=[part.occurred_at[j] for _, part, j in merged],
        wire=[part.wire[j] for _, part, j in merged] if wire else None,  # type: ignore[index]
    )


def _python_values(cols: dict[str, list[Any]]) -> None:
    """Enum members and plain-digit Decimals as the wire values the model reads them as (in place)."""
    for name, enum in (("meter", Meter), ("attribution", Attribution)):
        values = cols.get(name)
        if values is not None and enum in set(map(type, values)):
            cols[name] = [v.value if type(v) is enum else v for v in values]
    quantity = cols.get("quantity")
    if quantity is not None and Decimal in set(map(type, quantity)):
        # the model keeps a Decimal and writes str(); plain digits read as an int write the same
        cols["quantity"] = [int(text) if type(v) is Decimal and (text := str(v)).isascii()
                            and re.fullmatch(_QUANTITY_DIGITS, text) else v for v in quantity]  # fmt: skip


def _utc_datetimes(values: list[Any] | None) -> bool:
    """Every value an exact datetime in ``timezone.utc``: what the model keeps as it is."""
    if not values or set(map(type, values)) != {datetime}:
        return False
    # identity, as the model tests it (an equal tzinfo is parsed): the ids of the tzinfos, in C
    return set(map(id, map(_tzinfo, values))) == {id(_UTC)}


def _accept_kind(cols: dict[str, list[Any]], n: int, outcome: bool, none_is_absent: bool, now: datetime,
                 wire: bool, python: bool = False) -> Accepted:  # fmt: skip
    """:func:`accept` for rows of one kind (every ``type`` is "outcome", or none is)."""
    if n == 0:
        return Accepted([], [], [], [], [], [] if wire else None)
    rows = _Rows(cols, n, none_is_absent)
    fields = OUTCOME_FIELDS if outcome else USAGE_FIELDS
    for name, values in cols.items():  # a field the model does not know must be absent
        if name not in fields:
            rows.refused.update(i for i, v in enumerate(values) if not (v is None and none_is_absent))
    rows.identifier("event_id", required=True)
    rows.identifier("customer_id", required=True)
    rows.identifier("workflow_id", required=False)
    rows.identifier("run_id", required=False)
    rows.check("schema_version", int, nullable=False, all_ok=lambda v: set(v) == {1}, each_ok=lambda v: [x == 1 for x in v])
    datetimes = python and _utc_datetimes(cols.get("occurred_at"))
    if not datetimes:
        rows.check("occurred_at", str, nullable=False, required=True, all_ok=lambda v: _all_match(v, _CANONICAL_UTC),
                   each_ok=lambda v: _each_match(v, _CANONICAL_UTC))  # fmt: skip
    attributes = _attributes(rows, wire)
    if outcome:
        rows.in_set("type", frozenset({"outcome"}), required=True)
        rows.identifier("outcome_type", required=True)
        rows.in_set("attribution", _ATTRIBUTIONS, required=True)
        rows.identifier("reversal_of", required=False)
    else:
        rows.in_set("type", frozenset({"usage"}))
        rows.in_set("meter", _METERS)
        rows.identifier("model", required=False)
        rows.identifier("provider", required=False)
        for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
            rows.integer(name, 0, _MAX_TOKENS)
        quantity = _quantity(rows)
        rows.check("unit", str, nullable=True, all_ok=lambda v: _all_match(v, _PLAIN_UNIT),
                   each_ok=lambda v: _each_match(v, _PLAIN_UNIT))  # fmt: skip
        _shape(rows, quantity)
    keep = rows.accepted()
    whole = len(keep) == n

    def column(name: str) -> list[Any] | None:
        values = cols.get(name)
        if values is None or whole:
            return values
        return [values[i] for i in keep]

    occurred = column("occurred_at") or []
    at, inside = _within_limits(occurred, now) if datetimes else _instants(occurred, now)
    if len(inside) != len(keep):
        keep = [keep[i] for i in inside]
        whole = False
        occurred = [occurred[i] for i in inside]
    customers, event_ids = column("customer_id") or [], column("event_id") or []
    wire_bytes = None
    if wire:
        if datetimes:
            # orjson writes a UTC datetime as pydantic does (RFC 3339, Z, microseconds when there are any),
            # a list of them in one C call (isoformat() costs ~10x per value)
            occurred = orjson.loads(orjson.dumps(occurred, option=orjson.OPT_UTC_Z))
        wire_bytes = _wire(outcome, column, occurred, attributes if whole else [attributes[i] for i in keep],
                           quantity if not outcome and whole else [quantity[i] for i in keep] if not outcome else [],
                           written=datetimes)  # fmt: skip
    return Accepted(keep, [outcome] * len(keep), customers, event_ids, at, wire_bytes)


def _shape(rows: _Rows, quantity: list[int]) -> None:
    """The usage model's cross-field rule (on the rows whose fields passed)."""
    meters = rows.columns.get("meter")
    model = rows.columns.get("model")
    inputs, outputs, cached = (rows.ints(f, 0) for f in ("input_tokens", "output_tokens", "cached_input_tokens"))
    if not rows.refused and (meters is None or set(meters) <= {_TOKENS, None}):
        # the usual batch: every row passed its fields and is a tokens event
        if model is not None and None not in model and not any(quantity) and all(map(le, cached, inputs)):
            return
    for i in range(rows.n):
        if i in rows.refused:
            continue
        if meters is None or meters[i] in (_TOKENS, None):
            if model is None or model[i] is None or quantity[i] or cached[i] > inputs[i]:
                rows.refused.add(i)
        elif inputs[i] or outputs[i] or cached[i] or quantity[i] <= 0:
            rows.refused.add(i)


def _quantity(rows: _Rows) -> list[int]:
    """quantity as ints (0 when absent), refusing what is not an int in range or a str of digits."""
    values = rows.columns.get("quantity")
    if values is None:
        return [0] * rows.n
    kinds = set(map(type, values))
    if kinds == {int} and 0 <= min(values) and max(values) <= _MAX_QUANTITY:
        return values
    if kinds == {str}:
        # the SDK writes quantity as a string ("0" for every tokens event): each distinct one read once
        distinct = set(values)
        numbers = {text: number for text in distinct if (number := _quantity_digits(text)) is not None}
        if len(numbers) == len(distinct):
            return list(map(numbers.__getitem__, values))
    out: list[int] = []
    for i, value in enumerate(values):
        kind = type(value)
        if kind is int and 0 <= value <= _MAX_QUANTITY:
            out.append(value)
        elif kind is str and (number := _quantity_digits(value)) is not None:
            out.append(number)
        else:
            out.append(0)
            if not (value is None and rows.none_is_absent):
                rows.refused.add(i)
    return out


def _quantity_digits(text: str) -> int | None:
    """A quantity string of the rule's digits as its int, else None."""
    return int(text) if text.isascii() and re.fullmatch(_QUANTITY_DIGITS, text) else None


def _instants(texts: list[str], now: datetime) -> tuple[list[datetime], list[int]]:
    """The UTC datetimes of canonical ``occurred_at`` strings and the positions within the limits."""
    parse = datetime.fromisoformat
    try:
        at = list(map(parse, texts))
    except ValueError:  # e.g. 2026-02-30: the model's error
        at, keep = [], []
        for i, text in enumerate(texts):
            try:
                at.append(parse(text))
                keep.append(i)
            except ValueError:
                pass
    else:
        keep = list(range(len(texts)))
    at, inside = _within_limits(at, now)
    return at, [keep[i] for i in inside] if len(inside) != len(keep) else keep


def _within_limits(at: list[datetime], now: datetime) -> tuple[list[datetime], list[int]]:
    """The UTC datetimes within the limits (not before 2000, at most the skew after ``now``) and their positions."""
    latest = now + MAX_FUTURE_SKEW
    if at and (min(at) < EARLIEST_OCCURRED_AT or max(at) > latest):
        inside = [i for i, value in enumerate(at) if EARLIEST_OCCURRED_AT <= value <= latest]
        return [at[i] for i in inside], inside
    return at, list(range(len(at)))


def _attributes(rows: _Rows, text: bool = True) -> list[str]:
    """The attributes as the JSON pydantic writes (``{}`` when absent; ``""`` unless ``text``); refuses those
    outside the rule. A batch's attributes repeat (a service sends the same few): each distinct one is checked once."""
    values = rows.columns.get("attributes")
    if values is None:
        return ["{}" if text else ""] * rows.n
    if set(map(type, values)) == {dict} and _all_plain_attributes(values):
        if not text:
            return [""] * rows.n
        written = list(map(orjson.dumps, values))
        decoded = {raw: raw.decode() for raw in set(written)}  # few distinct attribute sets, usually
        return list(map(decoded.__getitem__, written))
    out: list[str] = []
    verdicts: dict[tuple[tuple[Any, ...], ...], str | None] = {}
    for i, value in enumerate(values):
        if value is None and rows.none_is_absent:
            out.append("{}")
            continue
        if type(value) is dict:
            try:
                # (key, type, value): 1 and True are equal keys of a dict, not the same attribute
                key = tuple((k, type(v), v) for k, v in value.items())
                found = verdicts.get(key, _UNSEEN)
            except TypeError:  # an unhashable value (a list, a dict): outside the rule, which the check says
                key, found = None, _UNSEEN
            if found is _UNSEEN:
                found = _plain_attributes(value, text)
                if key is not None:
                    verdicts[key] = found
        else:
            found = None
        if found is None:
            rows.refused.add(i)
            found = "{}"
        out.append(found)
    return out


_UNSEEN: Any = object()


def _all_plain_attributes(values: list[dict[Any, Any]]) -> bool:
    """Every dict inside the rule, checked column-wise (their keys and values flattened); False: look at each."""
    if max(map(len, values)) > MAX_ATTRIBUTES:
        return False
    keys = set(chain.from_iterable(values))
    if not all(type(k) is str and 1 <= len(k) <= MAX_ATTRIBUTE_KEY_LENGTH and _plain(k) for k in keys):
        return False
    items = list(chain.from_iterable(map(dict.values, values)))
    kinds = set(map(type, items))
    if not kinds <= {str, bool, int}:
        return False
    if kinds == {str}:
        texts = items
    else:
        texts = [v for v in items if type(v) is str]
        numbers = [v for v in items if type(v) is int]
        if numbers and not (_INT64[0] <= min(numbers) and max(numbers) < _INT64[1]):
            return False
    distinct = set(texts)
    return all(len(v) <= MAX_ATTRIBUTE_VALUE_LENGTH and _plain(v) for v in distinct)


def _plain_attributes(value: Any, text: bool = True) -> str | None:
    """The JSON of an attributes dict inside the rule (orjson writes it as pydantic does; ``""`` unless
    ``text``), else None."""
    if type(value) is not dict:
        return None
    if not value:
        return "{}"
    if len(value) > MAX_ATTRIBUTES:
        return None
    lo, hi = _INT64
    for key, item in value.items():
        if type(key) is not str or not 1 <= len(key) <= MAX_ATTRIBUTE_KEY_LENGTH or not _plain(key):
            return None
        kind = type(item)
        if kind is str:
            if len(item) > MAX_ATTRIBUTE_VALUE_LENGTH or not _plain(item):
                return None
        elif kind is int:
            if not lo <= item < hi:
                return None
        elif kind is not bool:
            return None
    return orjson.dumps(value).decode() if text else ""


class _Template:
    """A wire text per row: literal pieces and columns, joined by one ``%`` per row, called from C (``map``)."""

    def __init__(self) -> None:
        self.pieces: list[str] = [""]
        self.columns: list[list[Any]] = []

    def text(self, literal: str) -> None:
        self.pieces[-1] += literal.replace("%", "%%")

    def column(self, values: list[Any]) -> None:
        self.columns.append(values)
        self.pieces.append("")

    def value(self, values: list[Any] | None, n: int, default: Any) -> None:
        """The column, with ``default`` for None / absence."""
        if values is None:
            self.text(str(default))
        else:
            self.column([default if v is None else v for v in values] if None in values else values)

    def field(self, name: str, values: list[Any] | None) -> None:
        """``,"name":"value"`` where the value is there, else nothing (pydantic's exclude_none)."""
        if values is None:
            return
        if None not in values:
            self.text(f',"{name}":"')
            self.column(values)
            self.text('"')
        else:
            self.column(["" if v is None else f',"{name}":"{v}"' for v in values])

    def rows(self) -> list[bytes]:
        template = "%s".join(self.pieces)  # %s of a str is the str, of an int its digits (as JSON writes it)
        return list(map(str.encode, map(template.__mod__, zip(*self.columns, strict=True))))


def _wire(outcome: bool, column: Callable[[str], list[Any] | None], occurred: list[str], attributes: list[str],
          quantity: list[int], written: bool = False) -> list[bytes]:  # fmt: skip
    """The model's ``wire_bytes()`` of the accepted rows, written row by row from one template.

    Every text value here is plain ASCII without ``"`` or ``\\`` (the rule), so it goes
    into the JSON as it is. ``occurred``: the canonical ``occurred_at`` strings, or
    (``written``) the text pydantic writes.
    """
    n = len(occurred)
    if n == 0:
        return []
    if not written and set(map(len, occurred)) != {20}:
        # pydantic writes a UTC datetime with microseconds when there are any: .123 -> .123000,
        # .000 and .000000 -> none, .123456 as it is
        occurred = [t if len(t) == 20 else (t[:19] + "Z" if t.endswith((".000Z", ".000000Z")) else
                                            t[:-1] + "000Z" if len(t) == 24 else t) for t in occurred]  # fmt: skip
    w = _Template()
    w.text('{"schema_version":1,"event_id":"')
    w.value(column("event_id"), n, None)
    w.text('","customer_id":"')
    w.value(column("customer_id"), n, None)
    w.text('","occurred_at":"')
    w.column(occurred)
    w.text('"')
    w.field("workflow_id", column("workflow_id"))
    w.field("run_id", column("run_id"))
    w.text(',"attributes":')
    w.column(attributes)
    if outcome:
        w.text(',"type":"outcome","outcome_type":"')
        w.value(column("outcome_type"), n, None)
        w.text('","attribution":"')
        w.value(column("attribution"), n, None)
        w.text('"')
        w.field("reversal_of", column("reversal_of"))
    else:
        w.text(',"type":"usage","meter":"')
        w.value(column("meter"), n, _TOKENS)
        w.text('"')
        w.field("model", column("model"))
        w.field("provider", column("provider"))
        for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
            w.text(f',"{name}":')
            w.value(column(name), n, 0)
        w.text(',"quantity":"')
        w.column(quantity)
        w.text('"')
        w.field("unit", column("unit"))
    w.text("}")
    return w.rows()
