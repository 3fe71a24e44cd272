-- Alerts of other kinds share the budget_alerts outbox: a run reaching its cap
-- (a runaway agent loop) and a spend spike. `scope` tells two alerts of one
-- customer, period and kind apart (the run id, or the hour of a spike), so the
-- sorting key that collapses re-sent alerts keeps distinct ones apart. Columns
-- added to a sorting key cannot have a default: rows from before read kind = ''
-- (a threshold alert) and scope = ''.
ALTER TABLE budget_alerts
    ADD COLUMN IF NOT EXISTS kind LowCardinality(String),
    ADD COLUMN IF NOT EXISTS scope String,
    MODIFY ORDER BY (customer_id, period, threshold_percent, kind, scope);

ALTER TABLE budget_alerts
    ADD COLUMN IF NOT EXISTS run_id String DEFAULT '',
    ADD COLUMN IF NOT EXISTS projected_exhaustion_at Nullable(DateTime64(3, 'UTC')),
    ADD COLUMN IF NOT EXISTS detail String DEFAULT '';
