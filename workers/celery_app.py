"""The worker's Celery app, built from the same settings as the Flask app."""

from __future__ import annotations

from service.app import create_app
from service.queue import SWEEP_JOBS

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
celery_app.conf.update(include=["workers.tasks"])

# The sweeper recovers job items whose worker died or whose message Redis lost.
_sweep_every = float(flask_app.config["JOB_SWEEP_INTERVAL"])
celery_app.conf.beat_schedule = {
    "sweep-jobs": {"task": SWEEP_JOBS, "schedule": _sweep_every,
                   # A sweep that waited longer than the interval is replaced by the next one.
                   "options": {"expires": _sweep_every}},
}
