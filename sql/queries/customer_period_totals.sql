-- Every customer's usage in one billing period, in one pass: the usage profiles
-- (meterstream.advisor) and replayed invoices read it. Per customer, the columns of
-- invoice_usage.sql (so meterstream.billing.period_usage_from_aggregates builds each
-- customer's PeriodUsage from its rows) plus token and quantity sums.
-- FINAL: a resent event counts once.
-- Parameters: period (YYYY-MM).
SELECT
    customer_id,
    kind,
    meter,
    model,
    outcome_type,
    attribution,
    price_book_version                  AS plan_version,
    endsWith(rule, ':reversal')         AS is_reversal,
    count()                             AS events,
    sum(credits)                        AS credits,
    sum(cost_to_serve)                  AS cost_to_serve,
    sum(input_tokens)                   AS input_tokens,
    sum(cached_input_tokens)            AS cached_input_tokens,
    sum(output_tokens)                  AS output_tokens,
    sum(quantity)                       AS total_quantity,
    max(quantity)                       AS max_quantity,
    sum(quantity)                       AS sum_quantity
FROM usage_rated FINAL
WHERE period = {period:String}
  AND billed_in = ''  -- as the period's invoice was issued (late usage is billed later)
GROUP BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal
ORDER BY customer_id, kind, meter, model, outcome_type, attribution, plan_version, is_reversal
