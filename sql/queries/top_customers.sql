-- Customers ranked by cost to serve in a billing period, the most expensive to serve first:
-- events, tokens, usage credits, outcome credits, cost to serve and each customer's share of
-- the period's cost.
-- Parameters: period (YYYY-MM), limit (how many customers; '' for 10).
-- FINAL: a resent event counts once. cost_share is NULL when the period cost nothing.
-- The share is divided in Decimal256: Decimal(38, 18) / Decimal(38, 18) scales the dividend
-- by 10^18 inside an Int128 and wraps around silently once it passes ~1.7e38, i.e. for any
-- customer costing more than ~$170 (171 / 200 gave -0.846). The share itself is <= 1.
SELECT
    customer_id,
    count()                                                         AS events,
    sum(input_tokens)                                               AS input_tokens,
    sum(cached_input_tokens)                                        AS cached_input_tokens,
    sum(output_tokens)                                              AS output_tokens,
    sumIf(credits, kind = 'usage')                                  AS usage_credits,
    sumIf(credits, kind = 'outcome')                                AS outcome_credits,
    sum(cost_to_serve)                                              AS cost_to_serve,
    toDecimal128(
        toDecimal256(sum(rated.cost_to_serve), 18)
        / nullIf(toDecimal256(sum(sum(rated.cost_to_serve)) OVER (), 18), 0),
        18
    )                                                               AS cost_share,
    uniqExactIf(rated.model, rated.model != '')                     AS models
FROM usage_rated AS rated FINAL
WHERE period = {period:String}
GROUP BY customer_id
ORDER BY cost_to_serve DESC, customer_id
LIMIT if({limit:String} = '', 10, toUInt64({limit:String}))
