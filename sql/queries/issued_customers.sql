-- The customers whose invoice for a period has been issued (sql/008).
-- Parameters: period.
SELECT DISTINCT customer_id
FROM issued_invoices
WHERE period = {period:String}
ORDER BY customer_id
