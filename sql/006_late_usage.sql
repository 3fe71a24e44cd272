-- Usage that arrives after its billing period has closed (its period end plus the
-- worker's grace period) keeps its own period, so audits and usage reports show it
-- where it happened, and names the open period whose invoice carries it as a
-- flagged late adjustment. '' means billed in its own period.
ALTER TABLE usage_rated ADD COLUMN IF NOT EXISTS billed_in LowCardinality(String) DEFAULT '';
