-- Customers whose invoice for a period carries late adjustments: usage of an earlier,
-- closed period that arrived late and is billed on this one (billed_in).
-- Parameters: billed_in (YYYY-MM).
-- `meterstream usage` computes these customers' invoice previews the full way
-- (meterstream.billing.invoice_from_store, with late_usage.sql); the others from one query.
SELECT DISTINCT customer_id
FROM usage_rated
WHERE billed_in = {billed_in:String}
  AND period < {billed_in:String}
ORDER BY customer_id
