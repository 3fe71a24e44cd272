-- Every customer's usage in one billing period, in one query, grouped the way an invoice
-- needs it (invoice_usage.sql's groups, per customer, with billed_in kept apart) plus the
-- token sums: `meterstream usage` builds each customer's month-to-date row and its invoice
-- preview from these rows (meterstream.cs.reports.month_to_date), instead of one
-- invoice_usage query per customer.
-- Parameters: period (YYYY-MM), customer ('' for every customer).
-- Exactly what usage_rated FINAL gives (a resent event counts once), read as
-- invoice_usage.sql and month_to_date.sql read it: settled customer-days nothing has reached
-- since from usage_settled, the others from usage_recent FINAL (last 7 days) or usage_rated FINAL.
-- billed_in != '': usage that arrived after its period closed (shown here, where it happened;
-- billed on a later invoice).
-- The three CTEs are read by several subqueries each: MATERIALIZED runs each once (about half
-- the query's time on the benchmark store) where the session has enable_materialized_cte = 1
-- (meterstream's connections set it; the readonly profile in services/clickhouse/users.xml
-- and docs/security.md's SQL give it to the readers). Where it is 0 the keyword is ignored and
-- each reference runs its subquery again: the same rows, slower (tests/store/test_settled_usage.py
-- compares both with usage_rated FINAL).
WITH
    received AS MATERIALIZED
    (
        SELECT customer_id, day, sum(rows) AS n
        FROM usage_day_counts
        WHERE period = {period:String}
          AND ({customer:String} = '' OR customer_id = {customer:String})
        GROUP BY customer_id, day
    ),
    settled AS MATERIALIZED
    (
        SELECT customer_id, day, settle_id
        FROM usage_settled_days FINAL
        WHERE period = {period:String}
          AND ({customer:String} = '' OR customer_id = {customer:String})
          AND (customer_id, day, seen_rows) IN (SELECT customer_id, day, n FROM received)
    ),
    -- Days on which every customer-day received is settled: their partitions are not read.
    settled_days AS MATERIALIZED
    (
        SELECT day
        FROM received
        GROUP BY day
        HAVING countIf((customer_id, day) IN (SELECT customer_id, day FROM settled)) = count()
    )
SELECT
    customer_id,
    kind,
    meter,
    model,
    outcome_type,
    attribution,
    plan_version,
    is_reversal,
    billed_in,
    sum(events)                         AS events,
    sum(input_tokens)                   AS input_tokens,
    sum(cached_input_tokens)            AS cached_input_tokens,
    sum(output_tokens)                  AS output_tokens,
    sum(credits)                        AS credits,
    sum(cost_to_serve)                  AS cost_to_serve,
    max(max_quantity)                   AS max_quantity,
    sum(sum_quantity)                   AS sum_quantity
FROM
(
    SELECT customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in,
           events, input_tokens, cached_input_tokens, output_tokens, credits, cost_to_serve, max_quantity,
           sum_quantity
    FROM usage_settled
    WHERE period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
      AND (customer_id, day, settle_id) IN (SELECT customer_id, day, settle_id FROM settled)

    UNION ALL

    SELECT customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in,
           count() AS events, sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens,
           sum(output_tokens) AS output_tokens, sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve,
           max(quantity) AS max_quantity, sum(quantity) AS sum_quantity
    FROM usage_recent FINAL
    WHERE period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
      AND day >= toDate(now(), 'UTC') - 7
      AND day NOT IN (SELECT day FROM settled_days)
      AND (customer_id, day) NOT IN (SELECT customer_id, day FROM settled)
    GROUP BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in

    UNION ALL

    SELECT customer_id, kind, meter, model, outcome_type, attribution,
           price_book_version AS plan_version, endsWith(rule, ':reversal') AS is_reversal, billed_in,
           count() AS events, sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens,
           sum(output_tokens) AS output_tokens, sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve,
           max(quantity) AS max_quantity, sum(quantity) AS sum_quantity
    FROM usage_rated FINAL
    -- Only the customers with an older day left unsettled (none: no granule is read).
    WHERE customer_id IN (SELECT customer_id FROM received
                          WHERE day < toDate(now(), 'UTC') - 7
                            AND (customer_id, day) NOT IN (SELECT customer_id, day FROM settled))
      AND period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
      AND toDate(occurred_at, 'UTC') < toDate(now(), 'UTC') - 7
      AND (customer_id, toDate(occurred_at, 'UTC')) NOT IN (SELECT customer_id, day FROM settled)
    GROUP BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in
)
GROUP BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in
ORDER BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in
