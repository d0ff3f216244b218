"""The worker's Celery app, built from the same settings as the Flask app."""

from __future__ import annotations

import os
import tempfile

# A worker that serves its own /metrics adds up its pool processes through a folder, which
# must be named before prometheus_client is first imported (by the app, below).
if os.environ.get("LOOKALIKE_WORKER_METRICS_PORT") and not os.environ.get(
        "PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="lookalike-worker-metrics-")

from service.app import create_app  # noqa: E402
from service.queue import SWEEP_JOBS  # noqa: E402
from workers import signals  # noqa: E402

flask_app = create_app(log_format="json")
celery_app = flask_app.extensions["celery"]
celery_app.conf.update(include=["workers.tasks"])
signals.install(flask_app)

# The sweeper recovers job items whose worker died or whose message Redis lost.
_sweep_every = float(flask_app.config["JOB_SWEEP_INTERVAL"])
celery_app.conf.beat_schedule = {
    "sweep-jobs": {"task": SWEEP_JOBS, "schedule": _sweep_every,
                   # A sweep that waited longer than the interval is replaced by the next one.
                   "options": {"expires": _sweep_every}},
}
