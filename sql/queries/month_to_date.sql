-- Month-to-date usage per customer for one billing period.
-- Parameters: period (YYYY-MM), customer ('' for every customer).
-- Exactly what usage_rated FINAL gives (a resent event counts once), read as
-- invoice_usage.sql reads it: settled customer-days nothing has reached since from
-- usage_settled, the others from usage_recent FINAL (last 7 days) or usage_rated FINAL.
WITH
    received AS
    (
        SELECT customer_id, day, sum(rows) AS n
        FROM usage_day_counts
        WHERE period = {period:String}
          AND ({customer:String} = '' OR customer_id = {customer:String})
        GROUP BY customer_id, day
    ),
    settled AS
    (
        SELECT customer_id, day, settle_id
        FROM usage_settled_days FINAL
        WHERE period = {period:String}
          AND ({customer:String} = '' OR customer_id = {customer:String})
          AND (customer_id, day, seen_rows) IN (SELECT customer_id, day, n FROM received)
    ),
    -- Days on which every customer-day received is settled: their partitions are not read.
    settled_days AS
    (
        SELECT day
        FROM received
        GROUP BY day
        HAVING countIf((customer_id, day) IN (SELECT customer_id, day FROM settled)) = count()
    )
SELECT
    customer_id,
    sum(events)                              AS events,
    sum(input_tokens)                        AS input_tokens,
    sum(cached_input_tokens)                 AS cached_input_tokens,
    sum(output_tokens)                       AS output_tokens,
    -- Usage credits (what the invoice's allowance and overage count) and outcome credits
    -- (the price book's credits for outcomes: budgets count them, invoices price outcomes in money).
    sumIf(credits, kind = 'usage')           AS usage_credits,
    sumIf(credits, kind = 'outcome')         AS outcome_credits,
    sum(cost_to_serve)                       AS cost_to_serve,
    -- Non-token meters (documents, seats, ...) and outcomes carry no model: not a model.
    uniqExactIf(model, model != '')          AS models
FROM
(
    SELECT customer_id, kind, model, events, input_tokens, cached_input_tokens, output_tokens, credits, cost_to_serve
    FROM usage_settled
    WHERE period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
      AND (customer_id, day, settle_id) IN (SELECT customer_id, day, settle_id FROM settled)

    UNION ALL

    SELECT customer_id, kind, model, count() AS events, sum(input_tokens) AS input_tokens,
           sum(cached_input_tokens) AS cached_input_tokens, sum(output_tokens) AS output_tokens,
           sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve
    FROM usage_recent FINAL
    WHERE period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
      AND day >= toDate(now(), 'UTC') - 7
      AND day NOT IN (SELECT day FROM settled_days)
      AND (customer_id, day) NOT IN (SELECT customer_id, day FROM settled)
    GROUP BY customer_id, kind, model

    UNION ALL

    SELECT customer_id, kind, model, count() AS events, sum(input_tokens) AS input_tokens,
           sum(cached_input_tokens) AS cached_input_tokens, sum(output_tokens) AS output_tokens,
           sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve
    FROM usage_rated FINAL
    -- Only the customers with an older day left unsettled (none: no granule is read).
    WHERE customer_id IN (SELECT customer_id FROM received
                          WHERE day < toDate(now(), 'UTC') - 7
                            AND (customer_id, day) NOT IN (SELECT customer_id, day FROM settled))
      AND period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
      AND toDate(occurred_at, 'UTC') < toDate(now(), 'UTC') - 7
      AND (customer_id, toDate(occurred_at, 'UTC')) NOT IN (SELECT customer_id, day FROM settled)
    GROUP BY customer_id, kind, model
)
GROUP BY customer_id
ORDER BY usage_credits + outcome_credits DESC, customer_id
