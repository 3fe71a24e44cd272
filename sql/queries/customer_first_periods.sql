-- The first billing period with rated usage of each customer active in a period:
-- the customer's cohort by first-seen month (meterstream profile --by cohort).
-- Parameters: period (YYYY-MM).
SELECT
    customer_id,
    min(period)                         AS first_period
FROM usage_rated
WHERE customer_id IN (SELECT customer_id FROM usage_rated WHERE period = {period:String})
GROUP BY customer_id
ORDER BY customer_id
