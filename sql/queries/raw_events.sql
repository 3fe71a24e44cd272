-- The accepted events of a period as they arrived (JSON payloads), for re-rating.
-- Parameters: period (YYYY-MM), customer ('' for every customer).
SELECT kind, payload
FROM events_raw FINAL
WHERE period = {period:String}
  AND ({customer:String} = '' OR customer_id = {customer:String})
ORDER BY customer_id, occurred_at, event_id
