-- Metered token usage per provider, model, day (UTC) and price book of a period, for
-- `meterstream reconcile-provider` (metered vs what the provider billed).
-- Exactly usage_rated FINAL: each event once; token meters only.
-- Parameters: period (YYYY-MM).
SELECT
    provider,
    model,
    toString(toDate(occurred_at)) AS day,
    price_book_version,
    count()                  AS events,
    sum(input_tokens)        AS input_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(output_tokens)       AS output_tokens,
    sum(cost_to_serve)       AS cost_to_serve
FROM usage_rated FINAL
WHERE period = {period:String}
  AND kind = 'usage'
  AND meter = 'tokens'
GROUP BY provider, model, day, price_book_version
ORDER BY provider, model, day, price_book_version
