-- Usage of closed periods that arrived late and is billed on one open period's invoice.
-- Parameters: customer, billed_in (YYYY-MM: the invoice that carries the adjustments).
-- Exactly what usage_rated FINAL gives, read as invoice_usage.sql reads it: settled
-- customer-days nothing has reached since from usage_settled, the others from the rows.
WITH
    received AS
    (
        SELECT period, day, sum(rows) AS n
        FROM usage_day_counts
        WHERE customer_id = {customer:String}
        GROUP BY period, day
    ),
    settled AS
    (
        SELECT period, day, settle_id
        FROM usage_settled_days FINAL
        WHERE customer_id = {customer:String}
          AND (period, day, seen_rows) IN (SELECT period, day, n FROM received)
    ),
    -- Days whose every (period, day) received is settled: their partitions are not read.
    settled_days AS
    (
        SELECT day
        FROM received
        GROUP BY day
        HAVING countIf((period, day) IN (SELECT period, day FROM settled)) = count()
    )
SELECT
    period,
    sum(events)  AS events,
    sum(credits) AS credits
FROM
(
    SELECT period, events, credits
    FROM usage_settled
    WHERE customer_id = {customer:String} AND billed_in = {billed_in:String}
      AND (period, day, settle_id) IN (SELECT period, day, settle_id FROM settled)

    UNION ALL

    SELECT period, count() AS events, sum(credits) AS credits
    FROM usage_recent FINAL
    WHERE customer_id = {customer:String} AND billed_in = {billed_in:String}
      AND day >= toDate(now(), 'UTC') - 7
      AND day NOT IN (SELECT day FROM settled_days)
      AND (period, day) NOT IN (SELECT period, day FROM settled)
    GROUP BY period

    UNION ALL

    SELECT period, count() AS events, sum(credits) AS credits
    FROM usage_rated FINAL
    WHERE customer_id IN (SELECT {customer:String} FROM received
                          WHERE day < toDate(now(), 'UTC') - 7 AND (period, day) NOT IN (SELECT period, day FROM settled))
      AND billed_in = {billed_in:String}
      AND toDate(occurred_at, 'UTC') < toDate(now(), 'UTC') - 7
      AND (period, toDate(occurred_at, 'UTC')) NOT IN (SELECT period, day FROM settled)
    GROUP BY period
)
GROUP BY period
ORDER BY period
