-- One customer's budget threshold alerts in one billing period, in the order they were
-- crossed: what the web page derives the enforcement state from. The customer is always
-- bound. Run-cap and spend-spike alerts (sql/005_alert_kinds.sql) are left out: they concern
-- one run or one hour, not the customer's monthly budget; '' is a threshold alert from
-- before alert kinds existed.
-- Parameters: customer, period (YYYY-MM).
SELECT
    threshold_percent,
    spent_credits,
    budget_credits,
    action,
    crossed_at
FROM budget_alerts FINAL
WHERE customer_id = {customer:String}
  AND period = {period:String}
  AND kind IN ('', 'threshold')
ORDER BY crossed_at, threshold_percent
