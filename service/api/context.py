"""Per-request access to the app's shared objects, for the views."""

from __future__ import annotations

from flask import current_app

from service.images.storage import ContentStore


def content_store() -> ContentStore:
    """The app's content store."""
    return current_app.extensions["content_store"]


def setting(name: str) -> object:
    """One configuration value."""
    return current_app.config[name]
