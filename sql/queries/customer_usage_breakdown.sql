-- One customer's usage in one billing period by model and workflow, for the customer-visible
-- page and API ("usage by model", "usage by workflow", this period against the last).
-- The customer is always bound. FINAL: a resent event counts once.
-- Parameters: customer, period (YYYY-MM), meters ('' for every meter, else a comma-separated
-- list: a token limited to some meters sees only those; outcome rows are the meter 'outcome').
SELECT
    kind,
    meter,
    model,
    workflow_id,
    count()                             AS events,
    sumIf(credits, kind = 'usage')      AS usage_credits,
    sumIf(credits, kind = 'outcome')    AS outcome_credits,
    sum(cost_to_serve)                  AS cost_to_serve
FROM usage_rated FINAL
WHERE customer_id = {customer:String}
  AND period = {period:String}
  AND ({meters:String} = '' OR has(splitByChar(',', {meters:String}), meter))
GROUP BY kind, meter, model, workflow_id
ORDER BY kind, meter, model, workflow_id
