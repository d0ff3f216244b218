"""The queue contract: task names, enqueueing after commit, and how tasks retry.

`service/` enqueues by name and never imports `workers/`; the workers declare their tasks
with `durable_task`, so every task acknowledges late, survives a lost worker and retries only
what may succeed the next time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, shared_task
from flask import Flask, current_app
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.logs import TASK_HEADER, current_request_id

log = logging.getLogger(__name__)

EMBED_IMAGE = "lookalike.embed_image"
EXPAND_JOB = "lookalike.expand_job"
INGEST_BATCH = "lookalike.ingest_batch"
LINK_JOB_IMAGES = "lookalike.link_job_images"
SWEEP_JOBS = "lookalike.sweep_jobs"
FIT_CODES = "lookalike.fit_codes"
REBUILD_GRAPH = "lookalike.rebuild_graph"
RUN_EVALUATION = "lookalike.run_evaluation"
REINDEX = "lookalike.reindex"
PREPARE_COMPACT = "lookalike.prepare_compact"
BUILD_INDEX = "lookalike.build_index"

# Worth retrying: the database went away or was busy (OperationalError covers lost
# connections, deadlocks, serialization failures and statement timeouts), a pool or socket
# timeout. Not DBAPIError as a whole: a ProgrammingError, DataError or IntegrityError fails
# the same way every time, and retrying it only delays the failure.
TRANSIENT = (OperationalError, DisconnectionError, PoolTimeout, ConnectionError, TimeoutError)
DURABLE: dict[str, Any] = {
    "bind": True, "acks_late": True, "reject_on_worker_lost": True, "autoretry_for": TRANSIENT,
    "retry_backoff": True, "retry_backoff_max": 120, "retry_jitter": True, "max_retries": 8,
}


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: TRANSIENT, or any driver error that lost its connection."""
    return isinstance(exc, TRANSIENT) or (isinstance(exc, DBAPIError)
                                          and bool(exc.connection_invalidated))


def internal_reason(exc: BaseException) -> str:
    """The reason recorded for work an unexpected error stopped (details go to the log)."""
    return f"internal error: {type(exc).__name__}"


def durable_task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:
    """A Celery task under this contract (bound, acks late, retries TRANSIENT with backoff)."""
    return shared_task(name=name, **{**DURABLE, **options})


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
    """Send a task by name; call only after the rows it reads are committed.

    The request id being served (or the one of the task sending this one) travels in the
    message's headers; the worker binds it to the task's log lines (workers/signals.py).
    """
    celery_app: Celery = current_app.extensions["celery"]
    request_id = current_request_id()
    headers = {TASK_HEADER: request_id} if request_id else None
    celery_app.send_task(task_name, args=list(args), headers=headers)


def enqueue_or_sweep(task_name: str, *args: Any) -> bool:
    """Send a task whose work is durable in PostgreSQL; if the broker is down, leave it.

    The sweeper finds the work by its state and sends it again, so a failure here is logged,
    not raised: the caller's request or task has already committed what matters.
    """
    try:
        enqueue(task_name, *args)
    except Exception:  # noqa: BLE001 (any broker failure: the sweeper re-sends the work)
        log.exception("could not enqueue %s%r; the sweeper will send it", task_name, args)
        return False
    return True
