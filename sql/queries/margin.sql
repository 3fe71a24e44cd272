-- Credits and cost to serve per customer, workflow and model in a billing period,
-- the basis of the margin report (revenue is allocated from each customer's invoice).
-- Parameters: period (YYYY-MM).
SELECT
    customer_id,
    workflow_id,
    if(kind = 'outcome', concat('outcome:', outcome_type), model) AS model,
    count()                                                     AS events,
    sumIf(credits, kind = 'usage')                              AS credits,
    sum(cost_to_serve)                                          AS cost_to_serve
FROM usage_rated FINAL
WHERE period = {period:String}
GROUP BY customer_id, workflow_id, model
ORDER BY customer_id, workflow_id, model
