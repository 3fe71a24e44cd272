"""The worker's batch logic without Faust or ClickHouse: decode, dedupe, rate, aggregate, alert."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.budgets import Budget, BudgetBook
from meterstream.pricing.plans import Catalog
from meterstream.pricing.pricebook import PriceBook
from meterstream.schemas.records import BudgetAlert, RatedUsage, ThresholdAction
from meterstream.stream_processors.processing import (
    BatchProcessor,
    BatchResult,
    InboundMessage,
    MonthToDate,
    RecentIds,
    month_key,
    window_key,
)

T0 = datetime(2025, 3, 15, 12, 0, 0, tzinfo=timezone.utc)
NOW = datetime(2025, 3, 15, 13, 0, 0, tzinfo=timezone.utc)
NO_BUDGETS = BudgetBook()


def usage(event_id: str, customer: str = "acme", *, at: datetime = T0, model: str = "large-model",
          input_tokens: int = 12_000, output_tokens: int = 3_000, **extra: Any) -> bytes:
    """A large-model event; the default (12,000 in + 3,000 out) is 6 credits and $0.06."""
    return json.dumps({"event_id": event_id, "customer_id": customer, "occurred_at": at.isoformat(), "model": model,
                       "input_tokens": input_tokens, "output_tokens": output_tokens, **extra}).encode()


def outcome(event_id: str, customer: str = "acme", **extra: Any) -> bytes:
    return json.dumps({"event_id": event_id, "customer_id": customer, "occurred_at": T0.isoformat(),
                       "outcome_type": "verified_application", "attribution": "ai_only", **extra}).encode()


class Stream:
    """Numbers messages like a partition would, so each has a distinct offset."""

    def __init__(self) -> None:
        self.offset = 100

    def __call__(self, value: bytes | None, kind: str = "usage", topic: str | None = None,
                 partition: int = 1) -> InboundMessage:
        self.offset += 1
        topic = topic or ("usage.events" if kind == "usage" else "outcome.events")
        return InboundMessage(kind=kind, value=value, topic=topic, partition=partition, offset=self.offset)  # type: ignore[arg-type]


class Store:
    """The month-to-date table: feeds the processor's state back, counting lookups."""

    def __init__(self) -> None:
        self.table: dict[str, MonthToDate] = {}
        self.lookups: list[str] = []

    def get(self, key: str) -> MonthToDate:
        self.lookups.append(key)
        return self.table.get(key, MonthToDate())

    def save(self, result: BatchResult) -> None:
        # Through JSON, as the Faust table stores it.
        for key, value in result.month_to_date.items():
            self.table[key] = value


@pytest.fixture()
def msg() -> Stream:
    return Stream()


@pytest.fixture()
def store() -> Store:
    return Store()


def budgets(credits: str = "100", action: str = "block", thresholds: tuple[int, ...] = (50, 80, 100)) -> BudgetBook:
    return BudgetBook(customers={"acme": Budget(monthly_credits=Decimal(credits), thresholds=thresholds,
                                                action=ThresholdAction(action))})


# -- rating a batch -------------------------------------------------------------------------------


def test_n_messages_give_n_rated_rows_with_exact_totals(book: PriceBook, msg: Stream, store: Store) -> None:
    processor = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS)
    messages = [msg(usage(f"e{i}")) for i in range(7)]
    result = processor.process(messages, store.get, now=NOW)
    assert len(result.rated) == 7
    assert len(result.raw) == 7
    assert result.dead_letters == [] and result.duplicates == 0 and result.alerts == []
    assert sum(r.credits for r in result.rated) == Decimal("42")
    assert sum(r.cost_to_serve for r in result.rated) == Decimal("0.42")
    assert [r.event_id for r in result.rated] == [f"e{i}" for i in range(7)]
    mtd = result.month_to_date["acme|2025-03"]
    assert (mtd.credits, mtd.cost_to_serve, mtd.events, mtd.tokens) == (Decimal("42"), Decimal("0.42"), 7, 105_000)


def test_raw_events_keep_the_payload_and_where_it_came_from(book: PriceBook, msg: Stream, store: Store) -> None:
    value = usage("e1")
    message = msg(value, partition=2)
    raw = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS).process([message], store.get, now=NOW).raw[0]
    assert raw.payload == value
    assert (raw.event_id, raw.customer_id, raw.kind, raw.period) == ("e1", "acme", "usage", "2025-03")
    assert (raw.source_topic, raw.source_partition, raw.source_offset) == ("usage.events", 2, message.offset)
    assert raw.occurred_at == T0


def test_outcomes_and_reversals_in_a_batch(book: PriceBook, msg: Stream, store: Store) -> None:
    messages = [msg(outcome("o1"), "outcome"), msg(outcome("o2", reversal_of="o1"), "outcome"), msg(usage("u1"))]
    result = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS).process(messages, store.get, now=NOW)
    assert [r.credits for r in result.rated] == [Decimal("150"), Decimal("-150"), Decimal("6")]
    assert result.month_to_date["acme|2025-03"].credits == Decimal("6")
    assert [r.kind for r in result.raw] == ["outcome", "outcome", "usage"]


# -- duplicates -----------------------------------------------------------------------------------


def test_duplicates_within_a_batch_are_skipped_and_counted(book: PriceBook, msg: Stream, store: Store) -> None:
    messages = [msg(usage("e1")), msg(usage("e2")), msg(usage("e1")), msg(usage("e1", input_tokens=1))]
    result = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS).process(messages, store.get, now=NOW)
    assert [r.event_id for r in result.rated] == ["e1", "e2"]
    assert result.duplicates == 2
    # The first copy wins: the resend with different counts is not billed.
    assert result.rated[0].input_tokens == 12_000
    assert result.month_to_date["acme|2025-03"].events == 2


def test_duplicates_across_batches_are_skipped_after_commit(book: PriceBook, msg: Stream, store: Store) -> None:
    processor = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS)
    first = processor.process([msg(usage("e1")), msg(usage("e2"))], store.get, now=NOW)
    processor.commit(first)
    store.save(first)
    second = processor.process([msg(usage("e2")), msg(usage("e3"))], store.get, now=NOW)
    assert [r.event_id for r in second.rated] == ["e3"]
    assert second.duplicates == 1
    assert second.month_to_date["acme|2025-03"].events == 3
    assert second.month_to_date["acme|2025-03"].credits == Decimal("18")


def test_without_commit_a_redelivered_batch_is_processed_again(book: PriceBook, msg: Stream, store: Store) -> None:
    # commit() is only called once the writes succeeded; a retried batch must not be dropped as duplicates.
    processor = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS)
    messages = [msg(usage("e1"))]
    processor.process(messages, store.get, now=NOW)
    again = processor.process(messages, store.get, now=NOW)
    assert [r.event_id for r in again.rated] == ["e1"]
    assert again.duplicates == 0


def test_recent_ids_forget_the_oldest_beyond_capacity() -> None:
    ids = RecentIds(capacity=2)
    for event_id in ("a", "b", "c"):
        ids.add(event_id)
    assert "a" not in ids
    assert "b" in ids and "c" in ids
    assert len(ids) == 2


@given(st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=6), max_size=6), st.integers(1, 5))
def test_recent_ids_remember_a_batch_as_one_add_per_id(batches: list[list[str]], capacity: int) -> None:
    one_by_one, in_batches = RecentIds(capacity), RecentIds(capacity)
    for batch in batches:
        for event_id in batch:
            one_by_one.add(event_id)
        in_batches.update(batch)
        assert list(in_batches._ids) == list(one_by_one._ids)


# -- dead letters ---------------------------------------------------------------------------------


def test_malformed_and_unknown_model_messages_become_dead_letters(book: PriceBook, msg: Stream, store: Store) -> None:
    malformed = b'{"event_id": "e2", "customer_id": "acme", \xff'
    unknown = usage("e3", model="mystery-model")
    messages = [msg(usage("e1")), msg(malformed, partition=0), msg(None), msg(unknown, partition=3), msg(usage("e4"))]
    result = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS).process(messages, store.get, now=NOW)
    # The good messages around them are still rated.
    assert [r.event_id for r in result.rated] == ["e1", "e4"]
    assert len(result.dead_letters) == 3
    bad_json, null_value, no_price = result.dead_letters

    assert bad_json.raw == malformed
    assert bad_json.reason.startswith("invalid event:")
    assert (bad_json.source_topic, bad_json.source_partition, bad_json.source_offset) == (
        "usage.events", 0, messages[1].offset)
    assert bad_json.rejected_at == NOW

    assert null_value.raw == b""
    assert "empty message" in null_value.reason
    assert null_value.source_offset == messages[2].offset

    assert no_price.raw == unknown
    assert "'mystery-model'" in no_price.reason
    assert (no_price.source_partition, no_price.source_offset) == (3, messages[3].offset)
    assert result.month_to_date["acme|2025-03"].events == 2


def test_dead_letters_are_not_counted_as_duplicates(book: PriceBook, msg: Stream, store: Store) -> None:
    # An id that failed to rate is not remembered: a corrected resend is billed.
    messages = [msg(usage("e1", model="mystery-model")), msg(usage("e1"))]
    result = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS).process(messages, store.get, now=NOW)
    assert len(result.dead_letters) == 1
    assert [r.event_id for r in result.rated] == ["e1"]
    assert result.duplicates == 0


def test_event_on_the_wrong_topic_is_a_dead_letter(book: PriceBook, msg: Stream, store: Store) -> None:
    result = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS).process([msg(outcome("o1"), "usage")], store.get, now=NOW)
    assert result.rated == []
    assert [d.source_topic for d in result.dead_letters] == ["usage.events"]


# -- month to date and windows --------------------------------------------------------------------


def test_month_to_date_is_per_customer_and_period(book: PriceBook, msg: Stream, store: Store) -> None:
    april = datetime(2025, 4, 1, 0, 0, 1, tzinfo=timezone.utc)
    late_march_local = datetime(2025, 3, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5)))  # April in UTC
    store.table["acme|2025-03"] = MonthToDate(credits=Decimal("10"), cost_to_serve=Decimal("0.1"), events=2,
                                              tokens=500)
    messages = [
        msg(usage("a1")),
        msg(usage("a2", at=april)),
        msg(usage("a3", at=late_march_local)),
        msg(usage("g1", customer="globex", input_tokens=4_000, output_tokens=0)),
        msg(usage("a4")),
    ]
    result = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS).process(messages, store.get, now=NOW)
    assert set(result.month_to_date) == {"acme|2025-03", "acme|2025-04", "globex|2025-03"}
    assert result.month_to_date["acme|2025-03"] == MonthToDate(
        credits=Decimal("22"), cost_to_serve=Decimal("0.22"), events=4, tokens=500 + 30_000)
    assert result.month_to_date["acme|2025-04"].credits == Decimal("12")
    assert result.month_to_date["acme|2025-04"].events == 2
    assert result.month_to_date["globex|2025-03"].credits == Decimal("1")
    # One lookup per key per batch, however many events share it.
    assert sorted(store.lookups) == ["acme|2025-03", "acme|2025-04", "globex|2025-03"]


def test_month_key() -> None:
    assert month_key("acme", "2025-03") == "acme|2025-03"


@pytest.mark.parametrize(
    ("occurred_at", "window", "expected"),
    [
        (datetime(2025, 3, 15, 12, 0, 0, tzinfo=timezone.utc), 60, "acme|2025-03-15T12:00:00Z"),
        (datetime(2025, 3, 15, 12, 0, 59, 999999, tzinfo=timezone.utc), 60, "acme|2025-03-15T12:00:00Z"),
        (datetime(2025, 3, 15, 12, 1, 0, tzinfo=timezone.utc), 60, "acme|2025-03-15T12:01:00Z"),
        (datetime(2025, 3, 15, 12, 59, 59, tzinfo=timezone.utc), 3600, "acme|2025-03-15T12:00:00Z"),
        (datetime(2025, 3, 15, 14, 0, 30, tzinfo=timezone(timedelta(hours=2))), 60, "acme|2025-03-15T12:00:00Z"),
        (datetime(2025, 3, 15, 12, 7, 29, tzinfo=timezone.utc), 300, "acme|2025-03-15T12:05:00Z"),
    ],
)
def test_window_key_buckets(occurred_at: datetime, window: int, expected: str) -> None:
    assert window_key("acme", occurred_at, window) == expected


def test_window_counts_per_customer_and_window(book: PriceBook, msg: Stream, store: Store) -> None:
    messages = [
        msg(usage("e1", at=T0 + timedelta(seconds=10))),
        msg(usage("e2", at=T0 + timedelta(seconds=50))),
        msg(usage("e3", at=T0 + timedelta(seconds=65))),
        msg(usage("g1", customer="globex", at=T0 + timedelta(seconds=10))),
    ]
    result = BatchProcessor(Catalog.for_price_book(book), NO_BUDGETS, window_seconds=60).process(messages, store.get, now=NOW)
    windows = result.windows
    assert set(windows) == {"acme|2025-03-15T12:00:00Z", "acme|2025-03-15T12:01:00Z", "globex|2025-03-15T12:00:00Z"}
    first = windows["acme|2025-03-15T12:00:00Z"]
    assert (first.credits, first.cost_to_serve, first.events, first.tokens) == (Decimal("12"), Decimal("0.12"), 2, 30_000)
    assert windows["acme|2025-03-15T12:01:00Z"].events == 1


def test_alerts_fire_at_the_event_that_crosses_each_threshold(book: PriceBook, msg: Stream, store: Store) -> None:
    # Budget 20 credits; each event is 6: running totals 6, 12, 18, 24.
    processor = BatchProcessor(Catalog.for_price_book(book), budgets("20"))
    result = processor.process([msg(usage(f"e{i}")) for i in range(1, 5)], store.get, now=NOW)
    assert [(a.threshold_percent, a.triggering_event_id, a.spent_credits) for a in result.alerts] == [
        (50, "e2", Decimal("12")), (80, "e3", Decimal("18")), (100, "e4", Decimal("24"))]
    assert [a.action for a in result.alerts] == [ThresholdAction.ALERT, ThresholdAction.ALERT, ThresholdAction.BLOCK]
    for alert in result.alerts:
        assert alert.alert_id == BudgetAlert.make_id("acme", "2025-03", alert.threshold_percent)
        assert alert.customer_id == "acme" and alert.period == "2025-03"
        assert alert.budget_credits == Decimal("20")
        assert alert.crossed_at == NOW
    assert result.month_to_date["acme|2025-03"].alerted == frozenset({50, 80, 100})


def test_exactly_at_a_threshold_alerts(book: PriceBook, msg: Stream, store: Store) -> None:
    # 6 credits of a 12-credit budget is exactly 50%.
    result = BatchProcessor(Catalog.for_price_book(book), budgets("12")).process([msg(usage("e1"))], store.get, now=NOW)
    assert [a.threshold_percent for a in result.alerts] == [50]


def test_each_threshold_alerts_once_across_batches(book: PriceBook, msg: Stream, store: Store) -> None:
    processor = BatchProcessor(Catalog.for_price_book(book), budgets("30"))

    def run(*ids: str) -> list[int]:
        result = processor.process([msg(usage(i)) for i in ids], store.get, now=NOW)
        processor.commit(result)
        store.save(result)
        return [a.threshold_percent for a in result.alerts]

    assert run("e1", "e2") == []  # 12 of 30: 40%
    assert run("e3", "e4", "e5", "e6") == [50, 80, 100]  # a jump from 40% to 120%
    assert run("e7") == []  # 140%: every threshold already alerted this period
    assert store.table["acme|2025-03"].alerted == frozenset({50, 80, 100})
    assert store.table["acme|2025-03"].credits == Decimal("42")


def test_a_new_period_alerts_again(book: PriceBook, msg: Stream, store: Store) -> None:
    processor = BatchProcessor(Catalog.for_price_book(book), budgets("6", thresholds=(100,)))
    march = processor.process([msg(usage("m1"))], store.get, now=NOW)
    store.save(march)
    april = processor.process([msg(usage("a1", at=datetime(2025, 4, 2, tzinfo=timezone.utc)))], store.get, now=NOW)
    assert [a.period for a in march.alerts] == ["2025-03"]
    assert [a.period for a in april.alerts] == ["2025-04"]
    assert march.alerts[0].alert_id != april.alerts[0].alert_id


def test_customers_without_a_budget_never_alert(book: PriceBook, msg: Stream, store: Store) -> None:
    result = BatchProcessor(Catalog.for_price_book(book), budgets("1")).process(
        [msg(usage("g1", customer="globex"))], store.get, now=NOW)
    assert result.alerts == []
    assert result.month_to_date["globex|2025-03"].alerted == frozenset()


def test_default_budget_applies_to_unlisted_customers(book: PriceBook, msg: Stream, store: Store) -> None:
    book_with_default = BudgetBook(default=Budget(monthly_credits=Decimal("6"), thresholds=(100,)))
    result = BatchProcessor(Catalog.for_price_book(book), book_with_default).process(
        [msg(usage("g1", customer="globex"))], store.get, now=NOW)
    assert [(a.customer_id, a.threshold_percent, a.action) for a in result.alerts] == [
        ("globex", 100, ThresholdAction.ALERT)]


# -- MonthToDate ----------------------------------------------------------------------------------


# -- property: batching does not change the outcome -----------------------------------------------

event_sizes = st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 10_000)), min_size=1, max_size=25)


@given(sizes=event_sizes, cuts=st.sets(st.integers(1, 24), max_size=6), resend=st.booleans())
def test_splitting_a_stream_into_batches_changes_nothing(
    book: PriceBook, sizes: list[tuple[int, int]], cuts: set[int], resend: bool
) -> None:
    values = [usage(f"e{i}", input_tokens=inp, output_tokens=out) for i, (inp, out) in enumerate(sizes)]
    resent = values[:3] if resend else []
    values += resent  # redelivered after their batch committed, or within the same batch

    def run(batches: list[list[bytes]]) -> tuple[MonthToDate, list[tuple[int, str]], list[RatedUsage], int]:
        processor = BatchProcessor(Catalog.for_price_book(book), budgets("50", thresholds=(10, 50, 80, 100, 150)))
        local = Store()
        alerts: list[tuple[int, str]] = []
        rated: list[RatedUsage] = []
        duplicates = 0
        for batch in batches:
            result = processor.process([InboundMessage("usage", v, "usage.events", 0, 0) for v in batch], local.get,
                                       now=NOW)
            processor.commit(result)
            local.save(result)
            alerts += [(a.threshold_percent, a.triggering_event_id) for a in result.alerts]
            rated += result.rated
            duplicates += result.duplicates
        return local.table["acme|2025-03"], alerts, rated, duplicates

    bounds = [0, *sorted(c for c in cuts if c < len(values)), len(values)]
    split = [values[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    one = run([values])
    many = run(split)
    assert one[0] == many[0]
    assert one[1] == many[1]
    thresholds = [t for t, _ in many[1]]
    assert len(thresholds) == len(set(thresholds)), "a threshold alerted twice in one period"
    assert one[2] == many[2]
    assert one[3] == many[3] == len(resent)
    expected_credits = sum((Decimal(i) * Decimal("0.25") + Decimal(o)) / 1000 for i, o in sizes)
    assert many[0].credits == expected_credits


@given(sizes=event_sizes, customers=st.lists(st.sampled_from(["acme", "beta", "gamma"]), min_size=25, max_size=25),
       outcomes=st.integers(0, 3), duplicated=st.lists(st.integers(0, 24), max_size=4))
def test_duplicates_dropped_in_one_step_and_row_by_row_agree(
    book: PriceBook, sizes: list[tuple[int, int]], customers: list[str], outcomes: int, duplicated: list[int]
) -> None:
    """The usual batch (all priced, no reversal, no closed period) drops its duplicates in one step; an
    event that cannot be priced sends the same batch row by row: the kept rows and everything they
    make are equal, duplicates included."""
    values = [("usage", usage(f"e{i}", customers[i], input_tokens=inp, output_tokens=out))
              for i, (inp, out) in enumerate(sizes)]  # fmt: skip
    values += [("outcome", outcome(f"o{i}", customers[i])) for i in range(outcomes)]
    duplicated = [i for i in duplicated if i < len(values)]

    def run(batch: list[tuple[str, bytes]]) -> BatchResult:
        processor = BatchProcessor(Catalog.for_price_book(book), budgets("10", thresholds=(10, 50, 80, 100)))
        messages = [InboundMessage(kind, v, f"{kind}.events", 0, i) for i, (kind, v) in enumerate(batch)]  # type: ignore[arg-type]
        return processor.process(messages, Store().get, now=NOW)

    values += [values[i] for i in duplicated]  # resent within the batch
    unpriced = ("usage", usage("x1", model="no-such-model"))
    whole, sifted = run(values), run([*values, unpriced])
    assert whole.duplicates == sifted.duplicates == len(duplicated)
    assert len(sifted.dead_letters) == 1
    assert list(whole.rated) == list(sifted.rated) and whole.keys == sifted.keys
    assert list(whole.raw) == list(sifted.raw)
    assert (whole.month_to_date, whole.windows, whole.enforcement, whole.runs) == \
        (sifted.month_to_date, sifted.windows, sifted.enforcement, sifted.runs)  # fmt: skip
    assert whole.alerts == sifted.alerts and not whole.dead_letters


# -- anniversary billing periods ------------------------------------------------------------------


def _anniversary_catalog(book: PriceBook) -> Catalog:
    data = Catalog.for_price_book(book).model_dump(mode="json")
    data["customers"] = {"acme": {"plan": "payg", "effective_from": "2024-08-15", "billing_anchor": "anniversary"}}
    return Catalog.model_validate(data)


def test_an_anniversary_customer_is_enforced_in_its_current_billing_period(book: PriceBook, msg: Stream,
                                                                           store: Store) -> None:  # fmt: skip
    # On 10 March the customer anchored on the 15th is in period 2025-02 (15 February to 14 March):
    # its budget is enforced there, not skipped because the calendar month is 2025-03.
    catalog = _anniversary_catalog(book)
    now = datetime(2025, 3, 10, 12, tzinfo=timezone.utc)
    event = usage("e1", at=now - timedelta(hours=1))
    result = BatchProcessor(catalog, budgets("5")).process([msg(event)], store.get, now=now)
    assert [r.period for r in result.rated] == ["2025-02"]
    assert store.lookups == [month_key("acme", "2025-02")]
    assert result.enforcement["acme"].period == "2025-02"
    assert result.enforcement["acme"].decision.value == "block"


def test_open_billing_periods_reach_an_anniversary_customers_previous_period(book: PriceBook) -> None:
    catalog = _anniversary_catalog(book)
    now = datetime(2025, 3, 10, 12, tzinfo=timezone.utc)
    # Calendar: March and February; acme: 2025-02 (current) and 2025-01 (15 January to 14 February).
    assert catalog.open_billing_periods(now) == {"2025-03", "2025-02", "2025-01"}
    assert catalog.billing_period("acme", datetime(2025, 2, 10, tzinfo=timezone.utc)) == "2025-01"
    assert catalog.billing_period("someone-else", datetime(2025, 2, 10, tzinfo=timezone.utc)) == "2025-02"
