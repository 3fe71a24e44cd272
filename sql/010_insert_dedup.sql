-- Insert deduplication on every table the worker's batches reach, so that a batch cut by a
-- crash can be written again blindly (meterstream/stream_processors/inflight.py, replay.py).
--
-- The worker inserts each batch with insert_deduplication_token = '<batch id>:<table>' and
-- deduplicate_blocks_in_dependent_materialized_views = 1. A non-replicated MergeTree only
-- remembers inserted blocks when non_replicated_deduplication_window > 0 (default 0); with it,
-- an insert repeated with the same token is skipped by each table and each view's target that
-- already has the block and written to each one that lacks it (each view's block id is derived
-- from the token and the view). Measured on ClickHouse 26.9: a view detached during the first
-- insert gets the block on the repeat, the others are not doubled
-- (tests/store/test_settled_usage.py, tests/system/test_kill_mid_insert.py).
--
-- The window is the last N blocks a table remembers (a batch writes one block per partition it
-- touches: per period in usage_rated, per day in usage_recent). A replay comes within seconds of
-- the batch it repeats (the restart, or a session timeout and a rebalance, then the first batch),
-- so 10,000 blocks leaves a wide margin even with many workers writing meanwhile; it costs a
-- few hundred KB per table. An insert without a token into these tables is now
-- deduplicated by its content: a byte-identical block inserted twice is written once.
ALTER TABLE events_raw MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_rated MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_hourly MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_recent MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE usage_day_counts MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE budget_alerts MODIFY SETTING non_replicated_deduplication_window = 10000
