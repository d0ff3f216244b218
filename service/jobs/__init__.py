"""Bulk ingestion jobs: expansion into items, batched processing, progress and the sweeper."""
