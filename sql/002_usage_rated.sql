-- One priced row per event: the table invoices, margins and audits read.
-- Money is Decimal(38, 18) so per-token rates never round before an invoice line.
-- price_book_version and rule say exactly what priced the row.
CREATE TABLE IF NOT EXISTS usage_rated
(
    event_id            String,
    kind                LowCardinality(String),
    customer_id         String,
    occurred_at         DateTime64(3, 'UTC'),
    period              LowCardinality(String),
    meter               LowCardinality(String),
    model               LowCardinality(String),
    provider            LowCardinality(String),
    workflow_id         String,
    run_id              String,
    input_tokens        UInt64,
    cached_input_tokens UInt64,
    output_tokens       UInt64,
    quantity            Decimal(38, 9),
    unit                LowCardinality(String),
    outcome_type        LowCardinality(String),
    attribution         LowCardinality(String),
    credits             Decimal(38, 18),
    cost_to_serve       Decimal(38, 18),
    currency            LowCardinality(String),
    price_book_version  LowCardinality(String),
    rule                LowCardinality(String),
    rated_at            DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY period
ORDER BY (customer_id, event_id);
