-- Every stored event of a period, raw and rated, for `meterstream reconcile`: one row per
-- (source, customer_id, event_id), credits on the rated rows (0 on the raw ones).
-- FINAL: a resent or replayed event is one row, as the invoice sees it.
-- Parameters: period (YYYY-MM).
SELECT 'raw' AS source, customer_id, event_id, toDecimal128(0, 18) AS credits
FROM events_raw FINAL
WHERE period = {period:String}
UNION ALL
SELECT 'rated' AS source, customer_id, event_id, credits
FROM usage_rated FINAL
WHERE period = {period:String}
ORDER BY source, customer_id, event_id
