-- Every stored event's (customer_id, event_id), all periods, for `meterstream reconcile`'s
-- offset accounting (every message up to the committed offsets is stored, a duplicate of a
-- stored event, or a dead letter). No parameters.
SELECT DISTINCT customer_id, event_id
FROM events_raw
