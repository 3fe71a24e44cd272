-- The billing periods in which a customer has rated usage, oldest first.
-- Parameters: customer.
SELECT DISTINCT period
FROM usage_rated
WHERE customer_id = {customer:String}
ORDER BY period
