-- Month-to-date usage per customer for one billing period.
-- Parameters: period (YYYY-MM), customer ('' for every customer).
-- FINAL collapses resent events (same event_id) before background merges run.
SELECT
    customer_id,
    count()                                  AS events,
    sum(input_tokens)                        AS input_tokens,
    sum(cached_input_tokens)                 AS cached_input_tokens,
    sum(output_tokens)                       AS output_tokens,
    sum(credits)                             AS credits,
    sum(cost_to_serve)                       AS cost_to_serve,
    uniqExact(model)                         AS models
FROM usage_rated FINAL
WHERE period = {period:String}
  AND ({customer:String} = '' OR customer_id = {customer:String})
GROUP BY customer_id
ORDER BY credits DESC, customer_id
