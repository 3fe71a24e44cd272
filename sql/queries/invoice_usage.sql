-- What one customer used in one billing period, aggregated the way an invoice needs it
-- (meterstream.pricing.invoice.PeriodUsage). FINAL: a resent event counts once.
-- Parameters: customer, period (YYYY-MM), late_until: '' for the invoice as issued
-- (usage billed in its own period), or YYYY-MM to add the usage that arrived after the
-- period closed and was billed on invoices up to that period (late adjustments).
SELECT
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
    max(quantity)                       AS max_quantity
FROM usage_rated FINAL
WHERE customer_id = {customer:String}
  AND period = {period:String}
  AND (billed_in = '' OR ({late_until:String} != '' AND billed_in <= {late_until:String}))
GROUP BY kind, meter, model, outcome_type, attribution, plan_version, is_reversal
ORDER BY kind, meter, model, outcome_type, attribution, plan_version, is_reversal
