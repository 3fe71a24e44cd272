"""The Faust worker that rates, dedupes, counts and alerts."""
