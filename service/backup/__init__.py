"""Backups of an installation (database dump + objects) and its integrity check."""
