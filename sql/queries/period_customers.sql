-- Customers with rated usage in a billing period.
-- Parameters: period (YYYY-MM).
SELECT DISTINCT customer_id
FROM usage_rated
WHERE period = {period:String}
ORDER BY customer_id
