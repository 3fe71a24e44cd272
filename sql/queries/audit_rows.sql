-- The rated rows behind a customer's invoice in one period, with the raw event each came
-- from (events_raw.payload), the plan version and the rule that priced it: the dispute
-- audit (`meterstream audit`). One page at a time, in a stable order (occurred_at, event_id),
-- so large periods stream and a re-run gives the same rows in the same order.
-- Parameters: customer, period (YYYY-MM),
--   kind ('usage', 'outcome' or '' for both), meter ('' for every meter),
--   after_occurred_at, after_event_id (the last row of the previous page; '' for the first page;
--   occurred_at as 'YYYY-MM-DD HH:MM:SS.fff' UTC), page_size ('' for 10000).
-- FINAL: a resent event is one row. payload is '' if the raw event is missing.
-- Only rows billed in their own period (billed_in = ''): late usage that arrived after
-- the period closed is billed, and audited, as an adjustment on a later invoice.
WITH page AS
(
    SELECT
        event_id, kind, customer_id, occurred_at, period, meter, model, provider,
        workflow_id, run_id, input_tokens, cached_input_tokens, output_tokens, quantity,
        unit, outcome_type, attribution, credits, cost_to_serve, currency,
        price_book_version, rule, billed_in
    FROM usage_rated FINAL
    WHERE customer_id = {customer:String}
      AND period = {period:String}
      AND billed_in = ''
      AND ({kind:String} = '' OR kind = {kind:String})
      AND ({meter:String} = '' OR meter = {meter:String})
      AND (occurred_at, event_id) >
          (parseDateTime64BestEffortOrZero({after_occurred_at:String}, 3, 'UTC'), {after_event_id:String})
    ORDER BY occurred_at, event_id
    LIMIT if({page_size:String} = '', 10000, toUInt64({page_size:String}))
)
SELECT
    page.*,
    raw.payload AS payload
FROM page
LEFT JOIN
(
    SELECT event_id, payload
    FROM events_raw FINAL
    WHERE customer_id = {customer:String}
      AND period = {period:String}
      AND event_id IN (SELECT event_id FROM page)
) AS raw ON raw.event_id = page.event_id
ORDER BY page.occurred_at, page.event_id
