-- The issued invoice of a customer and period, if the period was closed (sql/008).
-- Parameters: customer, period. The first issued wins (rows are never rewritten).
-- catalog_json (sql/009): the catalog it was issued with; '' for invoices issued before 009.
SELECT invoice_number, issued_at, catalog_fingerprint, total, invoice_json, catalog_json
FROM issued_invoices
WHERE customer_id = {customer:String} AND period = {period:String}
ORDER BY issued_at, invoice_number
LIMIT 1
