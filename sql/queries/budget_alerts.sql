-- Budget alerts raised in one billing period, in the order they were crossed.
-- Parameters: period (YYYY-MM), customer ('' for every customer).
SELECT
    customer_id,
    threshold_percent,
    spent_credits,
    budget_credits,
    action,
    crossed_at,
    alert_id
FROM budget_alerts FINAL
WHERE period = {period:String}
  AND ({customer:String} = '' OR customer_id = {customer:String})
ORDER BY crossed_at, customer_id, threshold_percent
