-- One customer's usage per hour or per day (UTC) over a time range, for the customer-visible
-- web page and API. The customer is always bound: unlike the operator queries there is no
-- "every customer" value. FINAL: a resent event counts once.
-- Parameters: customer, bucket ('hour' or 'day'), since, until ('YYYY-MM-DD hh:mm:ss' UTC,
-- until exclusive). meterstream.web computes the bounds; they never come from a request.
SELECT
    formatDateTime(
        if({bucket:String} = 'hour', toStartOfHour(occurred_at, 'UTC'), toStartOfDay(occurred_at, 'UTC')),
        '%Y-%m-%d %H:%i:%S', 'UTC'
    )                           AS bucket_start,
    count()                     AS events,
    sum(credits)                AS credits,
    sum(cost_to_serve)          AS cost_to_serve
FROM usage_rated FINAL
WHERE customer_id = {customer:String}
  AND occurred_at >= toDateTime64OrNull({since:String}, 3, 'UTC')
  AND occurred_at <  toDateTime64OrNull({until:String}, 3, 'UTC')
GROUP BY bucket_start
ORDER BY bucket_start
