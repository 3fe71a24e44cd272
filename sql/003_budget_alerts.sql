-- Budget alerts as sent to the budget-alerts topic; alert_id is deterministic
-- (customer, period, threshold), so a re-sent alert collapses to one row.
CREATE TABLE IF NOT EXISTS budget_alerts
(
    alert_id            String,
    customer_id         String,
    period              LowCardinality(String),
    threshold_percent   UInt8,
    budget_credits      Decimal(38, 18),
    spent_credits       Decimal(38, 18),
    action              LowCardinality(String),
    crossed_at          DateTime64(3, 'UTC'),
    triggering_event_id String
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, period, threshold_percent);
