"""Celery built from the Flask config, and enqueueing by task name after commit."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from flask import Flask, current_app

EMBED_IMAGE = "lookalike.embed_image"


def celery_init_app(app: Flask) -> Celery:
    """Create the Celery app from Flask settings; tasks run inside an app context."""

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    redis_url = app.config.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object({
        "broker_url": redis_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        # A Redis that is down must not hang an upload: give up fast, the sweeper re-enqueues.
        "broker_transport_options": {"visibility_timeout": 3600, "max_retries": 2},
        "task_default_queue": "lookalike",
        **app.config.get("CELERY", {}),
    })
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def enqueue(task_name: str, *args: Any) -> None:
    """Send a task by name; call only after the rows it reads are committed."""
    celery_app: Celery = current_app.extensions["celery"]
    celery_app.send_task(task_name, args=list(args))
