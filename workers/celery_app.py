"""The worker's Celery app, built from the same settings as the Flask app."""

from __future__ import annotations

from service.app import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
celery_app.conf.update(include=["workers.tasks"])
