-- Cost to serve per outcome, by outcome type and attribution: what the usage behind each
-- outcome cost us (and was charged in credits), for outcome-based pricing.
-- Parameters: period (YYYY-MM), customer ('' for every customer).
-- Rule: an outcome belongs to a run (customer_id, run_id). The run's usage is every usage
-- row with the same customer and run_id in the period or the one before (runs that cross
-- a month end). Each run's cost to serve and credits are shared equally among the run's
-- outcomes in the period; reversals are counted but do not take a share (a reversed
-- outcome cost what it cost). cost_per_outcome = attributed cost / outcomes_with_usage;
-- outcomes without a run_id or whose run has no usage are counted in
-- outcomes_without_usage and left out of the per-outcome figures (their cost is unknown,
-- not zero). Shares are Decimal(38, 18), truncated at the 18th decimal. FINAL throughout.
WITH
    formatDateTime(addMonths(toDateOrZero(concat({period:String}, '-01')), -1), '%Y-%m') AS previous_period,
    outcomes AS
    (
        SELECT
            customer_id,
            run_id,
            outcome_type,
            attribution,
            countIf(NOT endsWith(rule, ':reversal'))    AS outcomes,
            countIf(endsWith(rule, ':reversal'))        AS reversals
        FROM usage_rated FINAL
        WHERE kind = 'outcome'
          AND period = {period:String}
          AND ({customer:String} = '' OR customer_id = {customer:String})
        GROUP BY customer_id, run_id, outcome_type, attribution
    ),
    runs AS
    (
        SELECT customer_id, run_id, sum(outcomes) AS run_outcomes
        FROM outcomes
        WHERE run_id != ''
        GROUP BY customer_id, run_id
        HAVING run_outcomes > 0
    ),
    run_usage AS
    (
        SELECT
            customer_id,
            run_id,
            count()             AS usage_events,
            sum(credits)        AS credits,
            sum(cost_to_serve)  AS cost_to_serve
        FROM usage_rated FINAL
        WHERE kind = 'usage'
          AND run_id != ''
          AND period IN ({period:String}, previous_period)
          AND ({customer:String} = '' OR customer_id = {customer:String})
          AND (customer_id, run_id) IN (SELECT customer_id, run_id FROM runs)
        GROUP BY customer_id, run_id
    )
SELECT
    outcome_type,
    attribution,
    outcomes,
    reversals,
    outcomes_with_usage,
    outcomes - outcomes_with_usage                          AS outcomes_without_usage,
    runs_with_usage,
    usage_events,
    usage_credits,
    cost_to_serve,
    cost_to_serve / nullIf(outcomes_with_usage, 0)          AS cost_per_outcome,
    usage_credits / nullIf(outcomes_with_usage, 0)          AS credits_per_outcome
FROM
(
    SELECT
        o.outcome_type                                                          AS outcome_type,
        o.attribution                                                           AS attribution,
        sum(o.outcomes)                                                         AS outcomes,
        sum(o.reversals)                                                        AS reversals,
        sumIf(o.outcomes, u.usage_events > 0)                                   AS outcomes_with_usage,
        uniqExactIf((o.customer_id, o.run_id), o.outcomes > 0 AND u.usage_events > 0) AS runs_with_usage,
        sum(u.usage_events)                                                     AS usage_events,
        sum(u.credits * o.outcomes / greatest(r.run_outcomes, 1))               AS usage_credits,
        sum(u.cost_to_serve * o.outcomes / greatest(r.run_outcomes, 1))         AS cost_to_serve
    FROM outcomes AS o
    LEFT JOIN runs AS r ON r.customer_id = o.customer_id AND r.run_id = o.run_id
    LEFT JOIN run_usage AS u ON u.customer_id = o.customer_id AND u.run_id = o.run_id
    GROUP BY outcome_type, attribution
)
ORDER BY outcome_type, attribution
