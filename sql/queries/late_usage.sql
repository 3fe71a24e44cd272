-- Usage of closed periods that arrived late and is billed on one open period's invoice.
-- Parameters: customer, billed_in (YYYY-MM: the invoice that carries the adjustments).
SELECT
    period,
    count()      AS events,
    sum(credits) AS credits
FROM usage_rated FINAL
WHERE customer_id = {customer:String}
  AND billed_in = {billed_in:String}
GROUP BY period
ORDER BY period
