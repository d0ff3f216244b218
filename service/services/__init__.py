"""Embedded PostgreSQL (with pgvector) and Redis for `make run` and `make test`."""
