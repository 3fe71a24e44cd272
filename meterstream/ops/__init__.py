"""Operations on a running pipeline: the dead-letter topic (``meterstream dlq``) and
``meterstream reconcile`` (Kafka vs ClickHouse vs invoices for one period)."""
