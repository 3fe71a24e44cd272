-- Invoices without re-reading a whole month: settled per-day aggregates for the days
-- nothing has reached since they were settled, and the recent days keyed by day.
--
-- usage_rated itself is unchanged: partitioned by period, collapsed by (customer_id,
-- event_id). A day filter cannot narrow a read of it (event ids are random within a
-- customer), and partitioning it by day made every FINAL over a customer-period merge
-- ~30 parts (the worker's state query 25 -> 330 ms for a small customer), so:
--
-- usage_recent: what the invoice queries need from each rated row, fed by a view on
--   usage_rated, PARTITION BY day and ORDER BY (customer_id, day, event_id), kept 10
--   days (whole parts dropped by TTL). A query reads one customer's recent days from it
--   with FINAL over just those days' parts. FINAL collapses the copies of an event
--   within a day; the copies of an event (a resend, a replay, a retried batch) carry
--   the same occurred_at, so they share a day. (An id reused for an event on another
--   day is caught by meterstream.storage.settle, which then keeps that customer-period
--   off the settled path.) The queries read days before the last 7 from usage_rated.
--
-- usage_day_counts: rows received per customer-day, fed by a view on usage_recent (so a
--   count is committed only after the rows it counts: an insert writes a table's part
--   before it pushes the block to that table's views), never decreasing (a merge sums).
--   While the count of a settled customer-day still equals the count the settle saw,
--   nothing has reached it since. Late rows for old days pass through usage_recent too
--   (before its TTL drops them), so they are counted.
--
-- usage_settled: per customer, period and day, what the invoice queries need from
--   usage_rated FINAL (invoice_usage's groups plus billed_in, and the token sums of
--   month_to_date), written by meterstream.storage.settle for closed days, one settle
--   run (settle_id) at a time. usage_settled_days says, per customer-day, which run
--   settled it last and the count it saw (seen_rows). The invoice queries take a
--   customer-day from usage_settled while the live count equals seen_rows, else from the
--   rows. seen_rows = 0 marks a customer-period that must not use settled sums (an event
--   id found on two days); a customer-day with rows has a count of at least 1.
--
-- The views come first, then the backfills (as in 004): a row inserted meanwhile may be
-- counted twice, which is harmless (a count only has to change when a row arrives), and
-- copied twice into usage_recent, which FINAL collapses.

CREATE TABLE IF NOT EXISTS usage_recent
(
    day                 Date,
    customer_id         String,
    event_id            String,
    period              LowCardinality(String),
    kind                LowCardinality(String),
    meter               LowCardinality(String),
    model               LowCardinality(String),
    outcome_type        LowCardinality(String),
    attribution         LowCardinality(String),
    plan_version        LowCardinality(String),
    is_reversal         UInt8,
    billed_in           LowCardinality(String),
    input_tokens        UInt64,
    cached_input_tokens UInt64,
    output_tokens       UInt64,
    quantity            Decimal(38, 9),
    credits             Decimal(38, 18),
    cost_to_serve       Decimal(38, 18)
)
ENGINE = ReplacingMergeTree
PARTITION BY day
ORDER BY (customer_id, day, event_id)
TTL day + INTERVAL 10 DAY
SETTINGS ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS usage_day_counts
(
    period      LowCardinality(String),
    customer_id String,
    day         Date,
    rows        UInt64
)
ENGINE = SummingMergeTree
PARTITION BY period
ORDER BY (customer_id, period, day);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_day_counts_mv TO usage_day_counts AS
SELECT period, customer_id, day, toUInt64(count()) AS rows
FROM usage_recent
GROUP BY period, customer_id, day;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_recent_mv TO usage_recent AS
SELECT
    toDate(occurred_at, 'UTC')          AS day,
    customer_id,
    event_id,
    period,
    kind,
    meter,
    model,
    outcome_type,
    attribution,
    price_book_version                  AS plan_version,
    endsWith(rule, ':reversal')         AS is_reversal,
    billed_in,
    input_tokens,
    cached_input_tokens,
    output_tokens,
    quantity,
    credits,
    cost_to_serve
FROM usage_rated;

INSERT INTO usage_recent
SELECT
    toDate(occurred_at, 'UTC') AS day, customer_id, event_id, period, kind, meter, model, outcome_type,
    attribution, price_book_version, endsWith(rule, ':reversal'), billed_in, input_tokens,
    cached_input_tokens, output_tokens, quantity, credits, cost_to_serve
FROM usage_rated
WHERE toDate(occurred_at, 'UTC') >= toDate(now(), 'UTC') - 10
SETTINGS max_partitions_per_insert_block = 0;

-- The rows just copied into usage_recent were counted by its view; count the older ones.
INSERT INTO usage_day_counts
SELECT period, customer_id, toDate(occurred_at, 'UTC') AS day, toUInt64(count())
FROM usage_rated
WHERE toDate(occurred_at, 'UTC') < toDate(now(), 'UTC') - 10
GROUP BY period, customer_id, day;

CREATE TABLE IF NOT EXISTS usage_settled
(
    settle_id           UUID,
    period              LowCardinality(String),
    customer_id         String,
    day                 Date,
    kind                LowCardinality(String),
    meter               LowCardinality(String),
    model               LowCardinality(String),
    outcome_type        LowCardinality(String),
    attribution         LowCardinality(String),
    plan_version        LowCardinality(String),
    is_reversal         UInt8,
    billed_in           LowCardinality(String),
    events              UInt64,
    input_tokens        UInt64,
    cached_input_tokens UInt64,
    output_tokens       UInt64,
    max_quantity        Decimal(38, 9),
    credits             Decimal(38, 18),
    cost_to_serve       Decimal(38, 18)
)
ENGINE = MergeTree
PARTITION BY period
ORDER BY (customer_id, period, day, settle_id);

CREATE TABLE IF NOT EXISTS usage_settled_days
(
    period      LowCardinality(String),
    customer_id String,
    day         Date,
    settled_at  DateTime64(6, 'UTC'),
    settle_id   UUID,
    seen_rows   UInt64
)
ENGINE = ReplacingMergeTree(settled_at)
PARTITION BY period
ORDER BY (customer_id, period, day);

-- One settle run's snapshot of the rollup counts, taken before it reads usage_rated.
CREATE TABLE IF NOT EXISTS usage_settle_runs
(
    settle_id   UUID,
    settled_at  DateTime64(6, 'UTC'),
    period      LowCardinality(String),
    customer_id String,
    day         Date,
    seen_rows   UInt64,
    settleable  UInt8
)
ENGINE = MergeTree
ORDER BY (settle_id, period, customer_id, day)
TTL toDateTime(settled_at) + INTERVAL 7 DAY
