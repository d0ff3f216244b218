"""Celery signals: each task's log context and metrics, the worker's log format and /metrics.

A task's request id comes from its message headers (service/queue.py's enqueue); a job's
tasks that were sent without one (by the sweeper) take the id stored on the job.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import signals
from flask import Flask
from prometheus_client import start_http_server

from service import logs
from service.db import session_scope
from service.jobs.service import request_id_of
from service.metrics import (
    CELERY_TASK_DURATION,
    CELERY_TASKS,
    multiprocess_dir,
    process_exited,
    scrape_registry,
)
from service.queue import EXPAND_JOB, INGEST_BATCH, LINK_JOB_IMAGES

log = logging.getLogger(__name__)

# Tasks whose first argument is a job id.
JOB_TASKS = frozenset({EXPAND_JOB, INGEST_BATCH, LINK_JOB_IMAGES})
OUTCOMES = {"SUCCESS": "success", "FAILURE": "failure", "RETRY": "retry"}
_started: dict[str, float] = {}


def task_context(task: Any, task_id: str, args: tuple[Any, ...] | list[Any] | None,
                 job_request_id: Any) -> dict[str, str | None]:
    """The log fields of one task run: its name and id, the request id, a job's id."""
    request_id = logs.valid_request_id(getattr(task.request, logs.TASK_HEADER, None))
    fields: dict[str, str | None] = {"task": task.name, "task_id": task_id}
    if task.name in JOB_TASKS and args:
        fields["job_id"] = str(args[0])
        if request_id is None:
            request_id = logs.valid_request_id(job_request_id(args[0]))
    fields["request_id"] = request_id
    return fields


def _job_request_id(flask_app: Flask, job_id: Any) -> str | None:
    try:
        with flask_app.app_context(), session_scope() as session:
            return request_id_of(str(job_id), session=session)
    except Exception as exc:  # noqa: BLE001 (a log field must not stop the task)
        log.warning("no request id for job %s: %s", job_id, exc)
        return None


def install(flask_app: Flask) -> None:
    """Connect the worker's signal handlers (strong references: they live as long as Celery)."""
    config = flask_app.config

    @signals.setup_logging.connect(weak=False)
    def _setup_logging(loglevel: Any = None, **_: Any) -> None:
        # Connected, so Celery leaves the root logger to us: one format for every line.
        fmt = logs.resolve_format(config.get("LOG_FORMAT"), default="json")
        logs.configure_logging(fmt, level=loglevel or logging.INFO)

    @signals.task_prerun.connect(weak=False)
    def _prerun(task_id: str, task: Any, args: Any = None, **_: Any) -> None:
        _started[task_id] = time.perf_counter()
        logs.reset()
        logs.bind(**task_context(task, task_id, args,
                                 lambda job_id: _job_request_id(flask_app, job_id)))

    @signals.task_postrun.connect(weak=False)
    def _postrun(task_id: str, task: Any, state: str | None = None, **_: Any) -> None:
        started = _started.pop(task_id, None)
        if started is not None:
            CELERY_TASK_DURATION.labels(task.name).observe(time.perf_counter() - started)
        outcome = OUTCOMES.get(state or "", (state or "unknown").lower())
        CELERY_TASKS.labels(task.name, outcome).inc()
        logs.reset()

    @signals.worker_process_shutdown.connect(weak=False)
    def _pool_process_exit(**_: Any) -> None:
        process_exited(os.getpid())

    @signals.worker_init.connect(weak=False)
    def _serve_metrics(**_: Any) -> None:
        port = config.get("WORKER_METRICS_PORT")
        if not port:
            return
        if multiprocess_dir() is None:
            log.warning("PROMETHEUS_MULTIPROC_DIR is not a folder: the worker's /metrics shows "
                        "its main process only, not its pool")
        start_http_server(int(port), registry=scrape_registry())
        log.info("worker metrics on port %s", port)
