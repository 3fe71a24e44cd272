-- Prompt-cache use per customer, model and the plan version that priced it: token events,
-- events with a cache hit, input tokens (cached included) and cached input tokens.
-- Parameters: period (YYYY-MM), customer ('' for every customer).
-- The savings are computed from these rows with the price book of each plan version
-- (meterstream.pricing.rating.cache_saving), because the rates live in the catalog, not here:
--   cost saved    = cached_input_tokens x (cost input - cost cached input) / 1,000,000
--   credits saved = cached_input_tokens x (credits input - credits cached input) / 1,000
-- i.e. what the cached tokens would have cost / been charged at the uncached input rate.
-- FINAL: a resent event counts once.
SELECT
    customer_id,
    model,
    price_book_version                  AS plan_version,
    count()                             AS events,
    countIf(rated.cached_input_tokens > 0) AS events_with_cache_hits,
    sum(input_tokens)                   AS input_tokens,
    sum(cached_input_tokens)            AS cached_input_tokens,
    sum(credits)                        AS credits,
    sum(cost_to_serve)                  AS cost_to_serve
FROM usage_rated AS rated FINAL
WHERE period = {period:String}
  AND ({customer:String} = '' OR customer_id = {customer:String})
  AND kind = 'usage'
  AND meter = 'tokens'
GROUP BY customer_id, model, plan_version
ORDER BY customer_id, model, plan_version
