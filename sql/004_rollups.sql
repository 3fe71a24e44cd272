-- Hourly and daily rollups of usage_rated per customer x meter x model x workflow,
-- for time series (`meterstream usage hourly|daily`, sql/queries/usage_hourly.sql,
-- usage_daily.sql) without scanning every rated row.
--
-- Duplicates. usage_rated is a ReplacingMergeTree keyed by (customer_id, event_id):
-- a resent event, or a batch the worker retried after a failed insert, can be
-- inserted twice, and FINAL (or a merge) keeps one row. A materialized view sees
-- every insert, so plain sums here would count such an event twice, and a merge of
-- usage_rated never takes it back out. The rollups therefore record, besides the
-- sums, how many rows they received (inserted_rows) and the set of event ids they
-- received (event_ids: uniqExact over sipHash64(event_id)).
--
-- What they guarantee:
-- * For a customer and period whose rollup rows say sum(inserted_rows) equals
--   uniqExactMerge(event_ids), every event was received exactly once, so every
--   sum is exactly what usage_rated FINAL gives (one row per event).
-- * Where they differ, some event was received twice; the saved queries then
--   read that customer's period from usage_rated FINAL instead. A 64-bit hash
--   collision between two different ids can only make the counts differ, i.e.
--   cause an unnecessary fallback, never a wrong sum.
-- * Every row written to usage_rated reaches the rollups: ClickHouse pushes each
--   insert to its views synchronously, a failed push fails the insert, and the
--   worker retries the whole batch with the same deduplication tokens (below).
-- So the hourly/daily saved queries are exact. A write cut by a crash (a worker or the
-- server killed after usage_rated's part but before a rollup's) is completed, not
-- detected: every insert carries a deduplication token and the batches stored past
-- the committed offsets are written again when a worker takes partitions, which each
-- rollup that lacks them receives and each that has them skips (sql/010,
-- meterstream/storage/batches.py, docs/storage.md). The check above stays as the
-- safety net for a repeat beyond the deduplication window. Invoices (invoice_usage, late_usage)
-- and month-to-date read settled per-day sums instead (sql/007_settled_usage.sql),
-- which keep the plan version and outcome columns these rollups do not. Margins,
-- cache savings, cost per outcome and the dispute audit still read usage_rated
-- FINAL: they need columns no derived table keeps (rule, run_id).
--
-- Money columns are Decimal(38, 18), as in usage_rated: sums never round.
-- The rollups include outcome rows (meter = 'outcome', quantity = 1 each).

CREATE TABLE IF NOT EXISTS usage_hourly
(
    period              LowCardinality(String),
    hour                DateTime('UTC'),
    customer_id         String,
    meter               LowCardinality(String),
    model               LowCardinality(String),
    workflow_id         String,
    inserted_rows       SimpleAggregateFunction(sum, UInt64),
    event_ids           AggregateFunction(uniqExact, UInt64),
    input_tokens        SimpleAggregateFunction(sum, UInt64),
    cached_input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens       SimpleAggregateFunction(sum, UInt64),
    quantity            SimpleAggregateFunction(sum, Decimal(38, 9)),
    credits             SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_to_serve       SimpleAggregateFunction(sum, Decimal(38, 18))
)
ENGINE = AggregatingMergeTree
PARTITION BY period
ORDER BY (customer_id, hour, meter, model, workflow_id);

CREATE TABLE IF NOT EXISTS usage_daily
(
    period              LowCardinality(String),
    day                 Date,
    customer_id         String,
    meter               LowCardinality(String),
    model               LowCardinality(String),
    workflow_id         String,
    inserted_rows       SimpleAggregateFunction(sum, UInt64),
    event_ids           AggregateFunction(uniqExact, UInt64),
    input_tokens        SimpleAggregateFunction(sum, UInt64),
    cached_input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens       SimpleAggregateFunction(sum, UInt64),
    quantity            SimpleAggregateFunction(sum, Decimal(38, 9)),
    credits             SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_to_serve       SimpleAggregateFunction(sum, Decimal(38, 18))
)
ENGINE = AggregatingMergeTree
PARTITION BY period
ORDER BY (customer_id, day, meter, model, workflow_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    period,
    toStartOfHour(occurred_at)          AS hour,
    customer_id,
    meter,
    model,
    workflow_id,
    toUInt64(count())                   AS inserted_rows,
    uniqExactState(sipHash64(event_id)) AS event_ids,
    sum(input_tokens)                   AS input_tokens,
    sum(cached_input_tokens)            AS cached_input_tokens,
    sum(output_tokens)                  AS output_tokens,
    sum(quantity)                       AS quantity,
    sum(credits)                        AS credits,
    sum(cost_to_serve)                  AS cost_to_serve
FROM usage_rated
GROUP BY period, hour, customer_id, meter, model, workflow_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_mv TO usage_daily AS
SELECT
    period,
    toDate(occurred_at, 'UTC')          AS day,
    customer_id,
    meter,
    model,
    workflow_id,
    toUInt64(count())                   AS inserted_rows,
    uniqExactState(sipHash64(event_id)) AS event_ids,
    sum(input_tokens)                   AS input_tokens,
    sum(cached_input_tokens)            AS cached_input_tokens,
    sum(output_tokens)                  AS output_tokens,
    sum(quantity)                       AS quantity,
    sum(credits)                        AS credits,
    sum(cost_to_serve)                  AS cost_to_serve
FROM usage_rated
GROUP BY period, day, customer_id, meter, model, workflow_id;

-- Backfill what usage_rated held before the views existed. The views come first:
-- a row inserted while this runs may be counted by both the view and the backfill,
-- which the inserted_rows / event_ids check above sees (a fallback, not an error);
-- backfilling first could miss such a row without trace.
INSERT INTO usage_hourly
SELECT
    period, toStartOfHour(occurred_at) AS hour, customer_id, meter, model, workflow_id,
    toUInt64(count()), uniqExactState(sipHash64(event_id)),
    sum(input_tokens), sum(cached_input_tokens), sum(output_tokens),
    sum(quantity), sum(credits), sum(cost_to_serve)
FROM usage_rated
GROUP BY period, hour, customer_id, meter, model, workflow_id;

INSERT INTO usage_daily
SELECT
    period, toDate(occurred_at, 'UTC') AS day, customer_id, meter, model, workflow_id,
    toUInt64(count()), uniqExactState(sipHash64(event_id)),
    sum(input_tokens), sum(cached_input_tokens), sum(output_tokens),
    sum(quantity), sum(credits), sum(cost_to_serve)
FROM usage_rated
GROUP BY period, day, customer_id, meter, model, workflow_id
