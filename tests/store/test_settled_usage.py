"""Settled days (sql/007_settled_usage.sql, meterstream.storage.settle) against the real engine.

The invoice queries read a settled customer-day from ``usage_settled`` and every
other day from ``usage_rated FINAL``; whatever was settled, whatever arrived since,
they must give exactly what the whole period read from ``usage_rated FINAL`` gives,
and the invoices must equal the offline rating of the same events. The data is the
hand-checked month of test_cs_queries.py (October 2026, a resent event included).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine

from meterstream.billing import invoice_from_store, invoices_from_rated, rate_events
from meterstream.clock import utc_now
from meterstream.pricing.plans import load_catalog
from meterstream.schemas.records import RawEvent
from meterstream.storage.clickhouse import (
    SQL_DIR,
    ClickHouseStore,
    connect,
    migrate,
    open_store,
)
from meterstream.storage.columns import rated_table, raw_table
from meterstream.storage.queries import saved_query
from meterstream.storage.settle import settle
from tests.system.test_cs_queries import (
    ACME_TOTAL,
    AI,
    CATALOG,
    EVENTS,
    GLOBEX_TOTAL,
    INITECH_TOTAL,
    PERIOD,
    _at,
    _load,
    _outcome,
    _tokens,
)

pytestmark = pytest.mark.store

CUSTOMERS = ("acme", "globex", "initech")

# The saved queries as they were before settling: the whole period from usage_rated FINAL.
REFERENCE = {
    "invoice_usage": """
        SELECT kind, meter, model, outcome_type, attribution, price_book_version AS plan_version,
               endsWith(rule, ':reversal') AS is_reversal, count() AS events, sum(credits) AS credits,
               sum(cost_to_serve) AS cost_to_serve, max(quantity) AS max_quantity, sum(quantity) AS sum_quantity
        FROM usage_rated FINAL
        WHERE customer_id = {customer:String} AND period = {period:String}
          AND (billed_in = '' OR ({late_until:String} != '' AND billed_in <= {late_until:String}))
        GROUP BY kind, meter, model, outcome_type, attribution, plan_version, is_reversal
        ORDER BY kind, meter, model, outcome_type, attribution, plan_version, is_reversal""",
    "month_to_date": """
        SELECT customer_id, count() AS events, sum(input_tokens) AS input_tokens,
               sum(cached_input_tokens) AS cached_input_tokens, sum(output_tokens) AS output_tokens,
               sumIf(credits, kind = 'usage') AS usage_credits, sumIf(credits, kind = 'outcome') AS outcome_credits,
               sum(cost_to_serve) AS cost_to_serve, uniqExactIf(model, model != '') AS models
        FROM usage_rated FINAL
        WHERE period = {period:String} AND ({customer:String} = '' OR customer_id = {customer:String})
        GROUP BY customer_id
        ORDER BY usage_credits + outcome_credits DESC, customer_id""",
    "period_usage": """
        SELECT customer_id, kind, meter, model, outcome_type, attribution, price_book_version AS plan_version,
               endsWith(rule, ':reversal') AS is_reversal, billed_in, count() AS events,
               sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens,
               sum(output_tokens) AS output_tokens, sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve,
               max(quantity) AS max_quantity, sum(quantity) AS sum_quantity
        FROM usage_rated FINAL
        WHERE period = {period:String} AND ({customer:String} = '' OR customer_id = {customer:String})
        GROUP BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in
        ORDER BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in""",
    "late_usage": """
        SELECT period, count() AS events, sum(credits) AS credits
        FROM usage_rated FINAL
        WHERE customer_id = {customer:String} AND billed_in = {billed_in:String}
        GROUP BY period
        ORDER BY period""",
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = tmp_path_factory.mktemp("catalog") / "plans.yaml"
    path.write_text(CATALOG)
    return load_catalog(path)


@pytest.fixture
def store(clickhouse, catalog):
    store = open_store(clickhouse)
    _load(store, catalog)
    yield store
    store.close()


def _run(store: ClickHouseStore):
    def run(name: str, **params: str):
        return store.query(saved_query(name), params)

    return run


def _assert_same_as_final(
    store: ClickHouseStore, late_until: str = "", billed_in: str = "2026-11"
) -> None:
    """Every settled query gives, row for row and digit for digit, what the whole period FINAL gives."""
    cases = [("month_to_date", {"period": PERIOD, "customer": ""}), ("period_usage", {"period": PERIOD, "customer": ""})]
    for customer in CUSTOMERS:
        cases += [
            (
                "invoice_usage",
                {"customer": customer, "period": PERIOD, "late_until": late_until},
            ),
            ("month_to_date", {"period": PERIOD, "customer": customer}),
            ("period_usage", {"period": PERIOD, "customer": customer}),
            ("late_usage", {"customer": customer, "billed_in": billed_in}),
        ]
    # The store's session runs period_usage's MATERIALIZED CTEs once; a server or user without
    # the setting ignores the keyword: both must give the same rows.
    assert store.query("SELECT getSetting('enable_materialized_cte') AS on").rows == [[True]]
    for name, params in cases:
        got = store.query(saved_query(name), params)
        want = store.query(REFERENCE[name], params)
        assert got.rows == want.rows, (name, params)
        if "AS MATERIALIZED" in saved_query(name):
            inlined = store.query(saved_query(name) + "\nSETTINGS enable_materialized_cte = 0", params)
            assert inlined.rows == want.rows, (name, params, "enable_materialized_cte = 0")
        assert all(
            isinstance(v, Decimal)
            for row in got.dicts()
            for k, v in row.items()
            if k in ("credits", "cost_to_serve")
        )


def _settled_days(store: ClickHouseStore) -> dict[tuple[str, date], int]:
    rows = store.query(
        "SELECT customer_id, day, seen_rows FROM usage_settled_days FINAL"
    ).rows
    return {(c, d): n for c, d, n in rows}


def _rate(catalog, events):
    rated, errors = rate_events(catalog, events)
    assert errors == []
    raw = [
        RawEvent(
            e.event_id,
            e.customer_id,
            e.type,
            r.occurred_at,
            r.period,
            e.model_dump_json().encode(),
            f"{e.type}.events",
            0,
            1000 + i,
        )  # fmt: skip
        for i, (e, r) in enumerate(zip(events, rated, strict=True))
    ]
    return raw, rated


def _invoices_equal_offline(store: ClickHouseStore, catalog, events) -> None:
    offline = {
        inv.customer_id: inv
        for inv in invoices_from_rated(
            catalog, rate_events(catalog, events)[0], period=PERIOD
        )
    }
    for customer in CUSTOMERS:
        stored = invoice_from_store(_run(store), catalog, customer, PERIOD)
        assert stored.total == offline[customer].total, customer
        assert stored.lines == offline[customer].lines, customer


def test_a_partly_settled_period_reads_settled_days_and_the_rest_from_final(
    store, catalog
):
    # Days before 10 October settled: acme's 1-6; globex (10th, with the resent g2), initech
    # (20th) and acme's 15th and 16th are read from usage_rated FINAL.
    result = settle(store.client, date(2026, 10, 10))
    assert result.unsettleable_customer_days == 0
    days = _settled_days(store)
    assert {d.day for c, d in days if c == "acme" and d.month == 10} == {1, 3, 4, 5, 6}
    assert not any(c in ("globex", "initech") for c, _ in days)
    _assert_same_as_final(store)
    _invoices_equal_offline(store, catalog, EVENTS)
    # Settle the rest: the resent g2 was received twice, its day's settled sums count it once.
    assert settle(store.client, date(2026, 11, 1)).customer_days > 0
    assert (
        _settled_days(store)[("globex", date(2026, 10, 10))] == 4
    )  # 3 events, 4 rows received
    _assert_same_as_final(store)
    _invoices_equal_offline(store, catalog, EVENTS)
    totals = {
        c: invoice_from_store(_run(store), catalog, c, PERIOD).total for c in CUSTOMERS
    }
    assert totals == {
        "acme": ACME_TOTAL,
        "globex": GLOBEX_TOTAL,
        "initech": INITECH_TOTAL,
    }
    # Nothing new: a second run settles nothing.
    assert settle(store.client, date(2026, 11, 1)).customer_days == 0


def test_the_queries_really_read_the_settled_sums(store):
    settle(store.client, date(2026, 11, 1))
    before = store.query(
        saved_query("month_to_date"), {"period": PERIOD, "customer": "initech"}
    ).dicts()[0]
    # Tamper with the settled sums of initech's one day: the queries must show it (and the
    # reference, reading the rows, must not), i.e. the day was not read from usage_rated.
    store.client.command(
        "INSERT INTO usage_settled SELECT * REPLACE (events * 100 AS events) FROM usage_settled "
        "WHERE customer_id = 'initech'"
    )
    after = store.query(
        saved_query("month_to_date"), {"period": PERIOD, "customer": "initech"}
    ).dicts()[0]
    assert after["events"] == before["events"] + 100
    reference = store.query(
        REFERENCE["month_to_date"], {"period": PERIOD, "customer": "initech"}
    ).dicts()[0]
    assert reference["events"] == before["events"] == 1


def test_late_arrivals_and_resends_after_settling_are_read_from_final_until_settled_again(
    store, catalog
):
    settle(store.client, date(2026, 11, 1))
    settled = _settled_days(store)
    # After the settle: a new acme event on a settled day, a resend of a settled event (a1),
    # and a late globex outcome for the closed period, billed on November's invoice.
    late_event = _tokens(
        "a7", "acme", _at(3, 18), "gpt-4o", 10_000, 0, 1_000, "support", "r1"
    )
    resent = next(e for e in EVENTS if e.event_id == "a1")
    late_outcome = _outcome("go2", "globex", _at(10, 12), AI, "g-r1")
    raw, rated = _rate(catalog, [late_event, resent, late_outcome])
    rated[2] = rated[2].model_copy(update={"billed_in": "2026-11"})
    store.insert_batch(raw, rated)
    events = [*EVENTS, late_event, late_outcome]
    _assert_same_as_final(store)
    _assert_same_as_final(store, late_until="2026-11")
    acme = store.query(
        saved_query("month_to_date"), {"period": PERIOD, "customer": "acme"}
    ).dicts()[0]
    assert acme["events"] == 12  # 11 + a7; the resent a1 once
    late = store.query(
        saved_query("late_usage"), {"customer": "globex", "billed_in": "2026-11"}
    ).dicts()
    assert [(r["period"], r["events"], r["credits"]) for r in late] == [
        (PERIOD, 1, Decimal(90))
    ]
    # The invoice as issued leaves the late outcome out; the offline rating of the on-time events agrees.
    offline = {
        i.customer_id: i
        for i in invoices_from_rated(
            catalog, rate_events(catalog, events)[0], period=PERIOD
        )
    }
    assert (
        invoice_from_store(_run(store), catalog, "acme", PERIOD).total
        == offline["acme"].total
    )
    assert (
        invoice_from_store(_run(store), catalog, "globex", PERIOD).total == GLOBEX_TOTAL
    )
    # Settling again takes exactly the two customer-days that changed, and stays exact.
    again = settle(store.client, date(2026, 11, 1))
    assert again.customer_days == 2
    now = _settled_days(store)
    assert now[("acme", date(2026, 10, 3))] == settled[("acme", date(2026, 10, 3))] + 2
    assert (
        now[("globex", date(2026, 10, 10))]
        == settled[("globex", date(2026, 10, 10))] + 1
    )
    _assert_same_as_final(store)
    _assert_same_as_final(store, late_until="2026-11")


def test_an_event_id_on_two_days_keeps_the_customer_period_off_the_settled_path(
    store, catalog
):
    settle(store.client, date(2026, 10, 20))
    # initech reuses i1's id for an event on another day (a client bug: the offline rating
    # keeps the first, FINAL the last); whatever the copies say, the id must count once.
    copy = _tokens("i1", "initech", _at(21, 8), "gpt-4o-mini", 5_000, 0, 5_000)
    raw, rated = _rate(catalog, [copy])
    store.insert_batch(raw, rated)
    result = settle(store.client, date(2026, 11, 1))
    assert result.unsettleable_customer_days == 2
    assert {d for (c, d), n in _settled_days(store).items() if c == "initech" and n == 0} == {
        date(2026, 10, 20), date(2026, 10, 21)}  # fmt: skip
    _assert_same_as_final(store)
    rows = store.query(
        saved_query("month_to_date"), {"period": PERIOD, "customer": "initech"}
    ).dicts()
    assert rows[0]["events"] == 1


class Pre010Store(ClickHouseStore):
    """A store migrated only to a migration before 010: rows as the worker wrote them then
    (no batch id or source position in usage_rated, no deduplication tokens)."""

    def insert_batch(self, raw, rated, alerts=(), *, raw_stored=()) -> None:
        assert not alerts and not raw_stored
        now = utc_now()
        if raw:
            self.client.insert_arrow("events_raw", raw_table(raw, now))
        if rated:
            columns = rated_table(rated, now).drop(["batch_id", "source_topic", "source_partition", "source_offset"])
            self.client.insert_arrow("usage_rated", columns, settings={"max_partitions_per_insert_block": 0})


def test_migrating_a_store_with_usage_counts_its_days_and_settles_it(
    clickhouse, catalog, tmp_path
):
    before = tmp_path / "sql"
    before.mkdir()
    for path in sorted(SQL_DIR.glob("00[1-6]_*.sql")):
        (before / path.name).write_text(path.read_text())
    client = connect(clickhouse)
    try:
        migrate(client, before)
        store = Pre010Store(client)
        _load(store, catalog)  # rows (and a resend) that predate 007
        assert migrate(client)[0] == "007_settled_usage.sql"  # then any later ones
        assert migrate(client) == []
        counts = dict(
            store.query(
                "SELECT customer_id, sum(rows) FROM usage_day_counts GROUP BY customer_id"
            ).rows
        )
        assert counts == {
            "acme": 12,
            "globex": 4,
            "initech": 1,
        }  # rows received, the resend included
        _assert_same_as_final(
            store
        )  # nothing settled yet: every day from usage_rated FINAL
        raw, rated = _rate(
            catalog,
            [_tokens("i2", "initech", _at(21, 8), "gpt-4o-mini", 1_000, 0, 1_000)],
        )
        store.insert_batch(raw, rated)
        assert (
            store.query(
                "SELECT sum(rows) FROM usage_day_counts WHERE customer_id = 'initech'"
            ).rows[0][0]
            == 2
        )
        settle(client, date(2026, 11, 1))
        _assert_same_as_final(store)
        assert (
            invoice_from_store(_run(store), catalog, "acme", PERIOD).total == ACME_TOTAL
        )
    finally:
        client.close()


def test_recent_days_are_read_from_usage_recent_and_settled_from_it(
    clickhouse, catalog
):
    """Days in the last week: today live, the others settled, a late arrival and a resend since."""
    now = utc_now()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    store = open_store(clickhouse)
    try:
        events = [
            _tokens(
                f"r{n}",
                customer,
                # Today's event at its hour, or now if that is still ahead (a run just after midnight).
                min(today - timedelta(days=days, hours=-hour), now),
                "gpt-4o",
                1_000 * (n + 1),
                0,
                100 * n,
            )
            for n, (customer, days, hour) in enumerate(
                [
                    ("acme", 0, 1),
                    ("acme", 1, 2),
                    ("acme", 2, 3),
                    ("acme", 2, 4),
                    ("globex", 1, 5),
                    ("globex", 5, 6),
                ]
            )
        ]
        raw, rated = _rate(catalog, events)
        store.insert_batch(raw, rated)
        store.insert_batch(
            raw[1:2], rated[1:2]
        )  # a resend of acme's event of yesterday
        periods = sorted({r.period for r in rated})
        settle(store.client)  # every day before today
        assert (today - timedelta(days=1)).date() in {
            d for c, d in _settled_days(store) if c == "acme"
        }
        assert today.date() not in {d for _, d in _settled_days(store)}
        late = _tokens(
            "r9",
            "acme",
            today - timedelta(days=2, hours=-9),
            "gpt-4o-mini",
            5_000,
            0,
            500,
        )
        raw2, rated2 = _rate(
            catalog, [late, events[2]]
        )  # a new event and a resend on a settled day
        store.insert_batch(raw2, rated2)
        for period in periods:
            for customer in ("acme", "globex"):
                params = {"customer": customer, "period": period, "late_until": ""}
                got = store.query(saved_query("invoice_usage"), params).rows
                assert got == store.query(REFERENCE["invoice_usage"], params).rows
            params = {"customer": "", "period": period}
            assert (
                store.query(saved_query("month_to_date"), params).rows
                == store.query(REFERENCE["month_to_date"], params).rows
            )
        total = sum(
            r["events"]
            for p in periods
            for r in store.query(
                saved_query("month_to_date"), {"customer": "acme", "period": p}
            ).dicts()
        )
        assert total == 5  # r0-r3 and r9, resends once
        assert settle(store.client).customer_days == 1  # acme, two days ago
    finally:
        store.close()


def test_settled_queries_take_the_same_parameters():
    # Callers pass these by name (billing, the CLI, the worker's read endpoint).
    from meterstream.storage.queries import query_parameters

    assert query_parameters("invoice_usage") == {"customer", "period", "late_until"}
    assert query_parameters("month_to_date") == {"customer", "period"}
    assert query_parameters("late_usage") == {"customer", "billed_in"}


def test_the_worker_entry_point_reports_a_failed_run_as_a_store_error(clickhouse):
    from meterstream.storage.clickhouse import StoreError
    from meterstream.storage.settle import settle_store

    client = connect(clickhouse)  # not migrated: no tables to settle
    try:
        with pytest.raises(StoreError, match="settle failed"):
            settle_store(ClickHouseStore(client))
        migrate(client)
        assert settle_store(ClickHouseStore(client)).customer_days == 0
    finally:
        client.close()


def _same_as_final(store: ClickHouseStore, periods: list[str], customers: tuple[str, ...]) -> bool:
    for period in periods:
        for customer in customers:
            params = {"customer": customer, "period": period, "late_until": ""}
            if store.query(saved_query("invoice_usage"), params).rows != store.query(REFERENCE["invoice_usage"], params).rows:
                return False
        params = {"customer": "", "period": period}
        if store.query(saved_query("month_to_date"), params).rows != store.query(REFERENCE["month_to_date"], params).rows:
            return False
    return True


def test_a_batch_written_again_with_its_tokens_doubles_nothing_and_recovery_is_idempotent(clickhouse, catalog):
    """The same batch written twice (a store retry), then recovered from its stored rows at an
    assignment (storage/batches.py): every table and view holds it once, physically."""
    now = utc_now()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    store = open_store(clickhouse)
    tables = ("events_raw", "usage_rated", "usage_recent", "usage_hourly", "usage_daily", "usage_day_counts")
    try:
        for table in tables:
            store.client.command(f"SYSTEM STOP MERGES {table}")
        events = [
            _tokens(f"k{n}", "acme", min(today - timedelta(days=days, hours=-1), now), "gpt-4o", 1_000 * (n + 1), 0, 10)
            for n, days in enumerate([0, 1, 2, 2])
        ]
        raw, rated = _rate(catalog, events)
        raw = [replace(r, source_topic="usage", source_partition=0, source_offset=100 + i) for i, r in enumerate(raw)]

        def physical() -> dict[str, int]:
            out = {t: int(store.query(f"SELECT count() FROM {t}").rows[0][0]) for t in tables[:3]}
            out["usage_hourly"] = int(store.query("SELECT sum(inserted_rows) FROM usage_hourly").rows[0][0])
            out["usage_daily"] = int(store.query("SELECT sum(inserted_rows) FROM usage_daily").rows[0][0])
            out["usage_day_counts"] = int(store.query("SELECT sum(rows) FROM usage_day_counts").rows[0][0])
            return out

        store.insert_batch(raw, rated)
        once = physical()
        assert once == dict.fromkeys(tables, len(events))
        store.insert_batch(raw, rated)  # the retry of the same in-memory batch
        assert physical() == once
        # Committed before the batch: it is found past the offset and written again, doubling nothing.
        recovered = store.recover_batches({("usage", 0): 100})
        assert (recovered.batches, recovered.rows) == (1, len(events))
        assert physical() == once
        assert store.recover_batches({("usage", 0): 104}).batches == 0  # committed past it: nothing to do
        periods = sorted({r.period for r in rated})
        settle(store.client)
        assert _same_as_final(store, periods, ("acme",))
    finally:
        for table in tables:
            store.client.command(f"SYSTEM START MERGES {table}")
        store.close()


def test_with_no_committed_offset_only_the_newest_batches_are_written_again(clickhouse, catalog):
    """A partition with nothing committed (a new consumer group on an old store, or offsets the
    broker expired): writing again every batch it ever stored would double in the views those
    that left the dedup window, so only those within UNCOMMITTED_HORIZON of its newest count."""
    from meterstream.storage.batches import UNCOMMITTED_HORIZON

    now = utc_now()
    store = open_store(clickhouse)
    try:
        def batch(prefix: str, first_offset: int, at: datetime) -> None:
            events = [_tokens(f"{prefix}{n}", "acme", at - timedelta(minutes=1), "gpt-4o", 1_000, 0, 10) for n in range(3)]
            raw, rated = _rate(catalog, events)
            raw = [replace(r, source_topic="usage", source_partition=0, source_offset=first_offset + i)
                   for i, r in enumerate(raw)]  # fmt: skip
            with time_machine.travel(at, tick=False):  # the batch's rated_at
                store.insert_batch(raw, rated)

        batch("old", 100, now - UNCOMMITTED_HORIZON - timedelta(hours=1))
        batch("new", 200, now)
        before = int(store.query("SELECT sum(inserted_rows) FROM usage_hourly").rows[0][0])
        recovered = store.recover_batches({("usage", 0): None})
        assert (recovered.batches, recovered.rows) == (1, 3)  # the newest batch only
        assert int(store.query("SELECT sum(inserted_rows) FROM usage_hourly").rows[0][0]) == before == 6
        # A known committed offset still finds every batch past it, however old.
        assert store.recover_batches({("usage", 0): 100}).batches == 2
    finally:
        store.close()
