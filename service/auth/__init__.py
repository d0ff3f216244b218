"""API keys: creation, revocation, authentication and per-collection visibility."""
