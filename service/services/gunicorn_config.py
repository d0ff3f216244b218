"""gunicorn's settings for the API (`gunicorn -c python:service.services.gunicorn_config`).

The workers share one metrics folder so that a scrape, which reaches one of them, reports
them all; the master marks a dead worker's live gauges gone. Its own lines (worker starts and
exits) go through the same JSON or text handler as the app's. `lookalike run` names the folder
(shared with its Celery worker); any other launch gets a private one, removed on exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from service.logs import resolve_format

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Before the workers import prometheus_client: they read this when their metrics are made.
_OWN_DIR: str | None = None
if not os.path.isdir(os.environ.get(MULTIPROC_ENV, "")):
    _OWN_DIR = tempfile.mkdtemp(prefix="lookalike-api-metrics-")
    os.environ[MULTIPROC_ENV] = _OWN_DIR

_FORMAT = resolve_format(os.environ.get("LOOKALIKE_LOG_FORMAT"), default="json")
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": ["lookalike"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True,
                           "qualname": "gunicorn.error"},
        # The app logs each request itself, with its route, status and request id.
        "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": True,
                            "qualname": "gunicorn.access"},
    },
    "handlers": {"lookalike": {"()": "service.logs.stream_handler", "fmt": _FORMAT}},
    "formatters": {},
}


def child_exit(server: Any, worker: Any) -> None:
    """A worker has exited: its live gauges (pool connections) must not be added any more."""
    from service.metrics import process_exited

    process_exited(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the private metrics folder."""
    if _OWN_DIR is not None:
        shutil.rmtree(_OWN_DIR, ignore_errors=True)
