-- One customer's usage per hour or per day (UTC) over a time range, for the customer-visible
-- web page and API. The customer is always bound: unlike the operator queries there is no
-- "every customer" value. FINAL: a resent event counts once.
-- Parameters: customer, bucket ('hour' or 'day'), since, until ('YYYY-MM-DD hh:mm:ss' UTC,
-- until exclusive), meters ('' for every meter, else a comma-separated list: a token limited
-- to some meters sees only those). meterstream.web computes them; they never come from a request.
-- Usage credits and outcome credits apart: a budget counts both, an invoice's allowance only usage.
SELECT
    formatDateTime(
        if({bucket:String} = 'hour', toStartOfHour(occurred_at, 'UTC'), toStartOfDay(occurred_at, 'UTC')),
        '%Y-%m-%d %H:%i:%S', 'UTC'
    )                           AS bucket_start,
    count()                     AS events,
    sumIf(credits, kind = 'usage')   AS usage_credits,
    sumIf(credits, kind = 'outcome') AS outcome_credits,
    sum(cost_to_serve)          AS cost_to_serve
FROM usage_rated FINAL
WHERE customer_id = {customer:String}
  AND occurred_at >= toDateTime64OrNull({since:String}, 3, 'UTC')
  AND occurred_at <  toDateTime64OrNull({until:String}, 3, 'UTC')
  AND ({meters:String} = '' OR has(splitByChar(',', {meters:String}), meter))
GROUP BY bucket_start
ORDER BY bucket_start
