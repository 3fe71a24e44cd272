-- A write cut by a crash is made whole, not detected (docs/storage.md, "A write cut by a crash").
--
-- Every batch the worker writes has an id (meterstream.storage.batches.batch_id: a digest of its
-- topic-partition-offset ranges and of the rows it writes), and each table's insert carries
-- insert_deduplication_token = '<batch id>:<table>' with
-- deduplicate_blocks_in_dependent_materialized_views = 1. A non-replicated MergeTree remembers
-- the blocks it took only with non_replicated_deduplication_window > 0 (default 0); with it on
-- the table and on every view's target, an insert repeated with the same token is skipped by each
-- table that has the block and written to each one that lacks it (measured on the 26.9 server;
-- the token is tracked per partition). The window is the last 10,000 blocks per table: a repeat
-- comes within seconds of the batch it repeats (a store retry, or the next assignment).
--
-- usage_rated rows keep their batch id and their place on the event topics, so that a worker
-- taking partitions finds the batches stored past the group's committed offsets (written, never
-- committed: a crash may have cut their views) and writes each again from its own stored rows
-- (meterstream.storage.batches.recover_batches). The minmax indexes let those reads skip the
-- granules of committed batches (source_offset) and of other batches (rated_at: one per batch).
ALTER TABLE usage_rated
    ADD COLUMN IF NOT EXISTS batch_id String DEFAULT '',
    ADD COLUMN IF NOT EXISTS source_topic LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS source_partition UInt32 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS source_offset UInt64 DEFAULT 0;

ALTER TABLE usage_rated
    ADD INDEX IF NOT EXISTS source_offset_minmax source_offset TYPE minmax GRANULARITY 1,
    ADD INDEX IF NOT EXISTS rated_at_minmax rated_at TYPE minmax GRANULARITY 1;

ALTER TABLE events_raw MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_rated MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_hourly MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_recent MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_day_counts MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE budget_alerts MODIFY SETTING non_replicated_deduplication_window = 10000
