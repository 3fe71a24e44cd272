-- What the store holds for one period: distinct events raw and rated, and totals.
-- Parameters: period (YYYY-MM).
SELECT
    (SELECT count() FROM events_raw FINAL WHERE period = {period:String})  AS raw_events,
    (SELECT count() FROM usage_rated FINAL WHERE period = {period:String}) AS rated_rows,
    (SELECT sum(credits) FROM usage_rated FINAL WHERE period = {period:String}) AS credits,
    (SELECT sum(cost_to_serve) FROM usage_rated FINAL WHERE period = {period:String}) AS cost_to_serve
