-- Every accepted event exactly as it arrived (the JSON bytes), for dispute audits
-- and re-rating. ReplacingMergeTree on the idempotency key: a resent event is one
-- row after merges, and queries that need exactness before merges use FINAL.
CREATE TABLE IF NOT EXISTS events_raw
(
    event_id        String,
    customer_id     String,
    kind            LowCardinality(String),
    occurred_at     DateTime64(3, 'UTC'),
    period          LowCardinality(String),
    payload         String CODEC(ZSTD(3)),
    source_topic    LowCardinality(String),
    source_partition UInt32,
    source_offset   UInt64,
    ingested_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY period
ORDER BY (customer_id, event_id);
