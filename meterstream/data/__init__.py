"""Data files shipped with meterstream (the curated default price book)."""
