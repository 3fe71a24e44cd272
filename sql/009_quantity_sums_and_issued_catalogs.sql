-- Two additions for invoices (issue 14), applied in place on an existing store.
--
-- 1. A charge can measure the sum of the quantities reported on its meter (pages of
--    documents, seat-days, ...): the settled per-day aggregates keep that sum beside
--    max_quantity. Rows settled before this column existed have no sum, so every
--    customer-day settled until now is marked unusable (seen_rows = 0, as 007 does for an
--    id reused on two days): the invoice queries read those days from the rows, and the
--    next settle run (the worker's timer, or `meterstream settle`) re-settles them with
--    the sum. Nothing is lost or double counted meanwhile, only read more slowly.
ALTER TABLE usage_settled ADD COLUMN IF NOT EXISTS sum_quantity Decimal(38, 9) DEFAULT 0 AFTER max_quantity;

INSERT INTO usage_settled_days (period, customer_id, day, settled_at, settle_id, seen_rows)
SELECT period, customer_id, day, settled_at + toIntervalMicrosecond(1), settle_id, 0
FROM usage_settled_days FINAL
WHERE seen_rows != 0;

-- 2. An issued invoice keeps the catalog it was computed with (the JSON its
--    catalog_fingerprint is the sha256 of), so usage of that period arriving after it
--    closed is priced with the issued plan versions and prices, not with whatever the
--    catalog says today. Invoices issued before this migration have '' here; their late
--    usage is priced with the current catalog (the old behaviour).
ALTER TABLE issued_invoices ADD COLUMN IF NOT EXISTS catalog_json String DEFAULT '' CODEC(ZSTD(3));
