"""Lookalike: an image-retrieval service."""
