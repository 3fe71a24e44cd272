-- Event ids already stored in a period, for `meterstream import` to skip what is there
-- (an event of the file with a stored (customer_id, event_id) would collapse into the stored row).
-- Every accepted event has an events_raw row; no FINAL needed for a set of ids.
-- Parameters: period (YYYY-MM), customer ('' for every customer of the period).
SELECT DISTINCT customer_id, event_id
FROM events_raw
WHERE period = {period:String}
  AND ({customer:String} = '' OR customer_id = {customer:String})
