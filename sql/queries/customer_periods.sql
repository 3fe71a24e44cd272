-- The billing periods in which a customer has rated usage, oldest first.
-- Parameters: customer.
-- From usage_day_counts (sql/007_settled_usage.sql: a row per customer, period and day
-- that received a rated row, backfilled from usage_rated), not from the rated rows: a
-- heavy customer's month is millions of rows, and every invoice asks this first.
SELECT DISTINCT period
FROM usage_day_counts
WHERE customer_id = {customer:String}
ORDER BY period
