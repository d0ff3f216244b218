"""Similarity search: filters, query plans and ranking in SQL."""
