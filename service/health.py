"""Readiness checks of the database, the broker and the default model."""

from __future__ import annotations

from pathlib import Path

import redis
from flask import Flask
from sqlalchemy import text

from service.embedding import registry


def readiness(app: Flask) -> dict[str, str]:
    """Each dependency as 'ok' or the reason it is not."""
    checks: dict[str, str] = {}
    try:
        with app.extensions["db_engine"].connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        client = redis.Redis.from_url(app.config["REDIS_URL"], socket_connect_timeout=2,
                                      socket_timeout=2)
        client.ping()
        client.close()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    try:
        registry.load_info(Path(app.config["MODEL_DIR"]), app.config["DEFAULT_MODEL"])
        checks["model"] = "ok"
    except registry.ModelError as exc:
        checks["model"] = str(exc)
    return checks
