-- Usage per hour, customer, meter, model and workflow: events, tokens, quantity,
-- credits and cost to serve, from the usage_hourly rollup (sql/004_rollups.sql).
-- Parameters: period (YYYY-MM), customer ('' for every customer),
--             day (YYYY-MM-DD, '' for the whole period).
-- Exact, not approximate: a customer whose rollup rows show an event received twice
-- (rows received != distinct event ids over the period) is read from usage_rated FINAL
-- instead; the `source` column says which table each row came from.
WITH resent AS
(
    SELECT customer_id
    FROM usage_hourly
    WHERE period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
    GROUP BY customer_id
    HAVING sum(inserted_rows) != uniqExactMerge(event_ids)
)
SELECT *
FROM
(
    SELECT
        hour,
        customer_id,
        meter,
        model,
        workflow_id,
        sum(inserted_rows)          AS events,
        sum(input_tokens)           AS input_tokens,
        sum(cached_input_tokens)    AS cached_input_tokens,
        sum(output_tokens)          AS output_tokens,
        sum(quantity)               AS quantity,
        sum(credits)                AS credits,
        sum(cost_to_serve)          AS cost_to_serve,
        'rollup'                    AS source
    FROM usage_hourly
    WHERE period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
      AND ({day:String} = '' OR toDate(hour, 'UTC') = toDateOrZero({day:String}))
      AND customer_id NOT IN (SELECT customer_id FROM resent)
    GROUP BY hour, customer_id, meter, model, workflow_id

    UNION ALL

    SELECT
        toStartOfHour(occurred_at)  AS hour,
        customer_id,
        meter,
        model,
        workflow_id,
        count()                     AS events,
        sum(input_tokens)           AS input_tokens,
        sum(cached_input_tokens)    AS cached_input_tokens,
        sum(output_tokens)          AS output_tokens,
        sum(quantity)               AS quantity,
        sum(credits)                AS credits,
        sum(cost_to_serve)          AS cost_to_serve,
        'usage_rated'               AS source
    FROM usage_rated FINAL
    WHERE period = {period:String}
      AND ({customer:String} = '' OR customer_id = {customer:String})
      AND ({day:String} = '' OR toDate(occurred_at, 'UTC') = toDateOrZero({day:String}))
      AND customer_id IN (SELECT customer_id FROM resent)
    GROUP BY hour, customer_id, meter, model, workflow_id
)
ORDER BY hour, customer_id, meter, model, workflow_id
