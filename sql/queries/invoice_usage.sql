-- What one customer used in one billing period, aggregated the way an invoice needs it
-- (meterstream.pricing.invoice.PeriodUsage). Exactly what usage_rated FINAL gives (a
-- resent event counts once), read cheaply (sql/007_settled_usage.sql): a day settled by
-- meterstream.storage.settle comes from usage_settled while usage_day_counts has received
-- no row for it since (the live count still equals the count the settle saw); every other
-- day (today, a day with a late or resent event since its settle, a day never settled)
-- from the rows: usage_recent FINAL for the last 7 days (only those days' parts are read),
-- usage_rated FINAL for older ones (read only when there are any).
-- Parameters: customer, period (YYYY-MM), late_until: '' for the invoice as issued
-- (usage billed in its own period), or YYYY-MM to add the usage that arrived after the
-- period closed and was billed on invoices up to that period (late adjustments).
WITH
    received AS
    (
        SELECT day, sum(rows) AS n
        FROM usage_day_counts
        WHERE customer_id = {customer:String} AND period = {period:String}
        GROUP BY day
    ),
    settled AS
    (
        SELECT day, settle_id
        FROM usage_settled_days FINAL
        WHERE customer_id = {customer:String} AND period = {period:String}
          AND (day, seen_rows) IN (SELECT day, n FROM received)
    )
SELECT
    kind,
    meter,
    model,
    outcome_type,
    attribution,
    plan_version,
    is_reversal,
    sum(events)                         AS events,
    sum(credits)                        AS credits,
    sum(cost_to_serve)                  AS cost_to_serve,
    max(max_quantity)                   AS max_quantity,
    sum(sum_quantity)                   AS sum_quantity
FROM
(
    SELECT kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in,
           events, credits, cost_to_serve, max_quantity, sum_quantity
    FROM usage_settled
    WHERE customer_id = {customer:String} AND period = {period:String}
      AND (day, settle_id) IN (SELECT day, settle_id FROM settled)

    UNION ALL

    SELECT kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in,
           count() AS events, sum(credits) AS credits, sum(cost_to_serve) AS cost_to_serve,
           max(quantity) AS max_quantity, sum(quantity) AS sum_quantity
    FROM usage_recent FINAL
    WHERE customer_id = {customer:String} AND period = {period:String}
      AND day >= toDate(now(), 'UTC') - 7
      AND day NOT IN (SELECT day FROM settled)
    GROUP BY kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in

    UNION ALL

    SELECT
        kind,
        meter,
        model,
        outcome_type,
        attribution,
        price_book_version                  AS plan_version,
        endsWith(rule, ':reversal')         AS is_reversal,
        billed_in,
        count()                             AS events,
        sum(credits)                        AS credits,
        sum(cost_to_serve)                  AS cost_to_serve,
        max(quantity)                       AS max_quantity,
        sum(quantity)                       AS sum_quantity
    FROM usage_rated FINAL
    -- An empty set here (no older day left unsettled) makes the primary key skip every granule.
    WHERE customer_id IN (SELECT {customer:String} FROM received
                          WHERE day < toDate(now(), 'UTC') - 7 AND day NOT IN (SELECT day FROM settled))
      AND period = {period:String}
      AND toDate(occurred_at, 'UTC') < toDate(now(), 'UTC') - 7
      AND toDate(occurred_at, 'UTC') NOT IN (SELECT day FROM settled)
    GROUP BY kind, meter, model, outcome_type, attribution, plan_version, is_reversal, billed_in
)
WHERE billed_in = '' OR ({late_until:String} != '' AND billed_in <= {late_until:String})
GROUP BY kind, meter, model, outcome_type, attribution, plan_version, is_reversal
ORDER BY kind, meter, model, outcome_type, attribution, plan_version, is_reversal
