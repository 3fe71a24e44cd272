-- Issued invoices: what was billed when a period was closed (`meterstream close-period`),
-- stored once and never recomputed from a catalog that has changed since. `meterstream
-- invoice` for an issued period returns invoice_json exactly; later corrections appear as
-- flagged adjustments on the open period's invoice or in `rerate`'s diff, never here.
-- Plain MergeTree, no replacing: a row is never rewritten. Issuing is idempotent by
-- (customer_id, period) (the command checks first); should two issues race, readers take
-- the first issued (ORDER BY issued_at LIMIT 1, sql/queries/issued_invoice.sql).
-- ORDER BY (customer_id, period): every read is one customer's period.
CREATE TABLE IF NOT EXISTS issued_invoices
(
    invoice_number      String,
    customer_id         String,
    period              LowCardinality(String),
    issued_at           DateTime64(3, 'UTC'),
    plan_id             LowCardinality(String),
    plan_versions       Array(String),
    -- sha256 of the catalog (plans, versions, price books, assignments) the invoice was computed with
    catalog_fingerprint String,
    currency            LowCardinality(String),
    subtotal            Decimal(38, 9),
    total               Decimal(38, 9),
    -- the whole invoice as `invoice --json` prints it: what `invoice` returns for this period
    invoice_json        String CODEC(ZSTD(3))
)
ENGINE = MergeTree
ORDER BY (customer_id, period);

-- The lines of each issued invoice, for finance queries in SQL.
CREATE TABLE IF NOT EXISTS issued_invoice_lines
(
    invoice_number      String,
    customer_id         String,
    period              LowCardinality(String),
    line_no             UInt16,
    kind                LowCardinality(String),
    description         String,
    quantity            Nullable(Decimal(38, 18)),
    unit_price          Nullable(Decimal(38, 18)),
    amount              Decimal(38, 9)
)
ENGINE = MergeTree
ORDER BY (customer_id, period, invoice_number, line_no);
