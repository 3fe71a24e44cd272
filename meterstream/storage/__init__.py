"""ClickHouse storage: DDL migrations, the batch sink and saved queries."""
