"""The service's Prometheus metrics, one definition each, and how a scrape is rendered.

Every layer records into these, so this module sits below all of them and imports nothing of
ours. In multiprocess mode (PROMETHEUS_MULTIPROC_DIR set before prometheus_client is first
imported: by `lookalike run`, service/services/gunicorn_config.py or workers/celery_app.py)
each process writes its values to files in that folder and a scrape adds them up, so the
gunicorn and Celery processes of one machine answer as one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# From a cached health check (~1 ms) to a slow upload or an exact scan of a large collection.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A Celery task runs from milliseconds (a sweep) to minutes (an archive's expansion).
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                900.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

HTTP_REQUESTS = Counter(
    "lookalike_http_requests", "HTTP requests answered, by method, route (the URL rule, not "
    "the path) and status", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "lookalike_http_request_duration_seconds", "Time from the request's arrival in Flask to "
    "its response, by method and route", ["method", "route"], buckets=LATENCY_BUCKETS)
SEARCH_DURATION = Histogram(
    "lookalike_search_duration_seconds", "Planning, ranking and re-ranking of one search, by "
    "the strategy that answered (the explain record's method)", ["strategy"],
    buckets=LATENCY_BUCKETS)
EMBED_DURATION = Histogram(
    "lookalike_embed_duration_seconds", "One model run over a preprocessed batch, by model",
    ["model"], buckets=LATENCY_BUCKETS)
EMBED_BATCH_SIZE = Histogram(
    "lookalike_embed_batch_size", "Images per model run, by model", ["model"],
    buckets=BATCH_BUCKETS)
CELERY_TASKS = Counter(
    "lookalike_celery_tasks", "Celery tasks run, by task name and outcome (success, failure, "
    "retry)", ["task", "outcome"])
CELERY_TASK_DURATION = Histogram(
    "lookalike_celery_task_duration_seconds", "Run time of one Celery task, by task name",
    ["task"], buckets=TASK_BUCKETS)
# livesum: the processes alive now, added up (a dead process's file is removed).
DB_POOL_CHECKED_OUT = Gauge(
    "lookalike_db_pool_checked_out_connections", "Database connections checked out of the "
    "SQLAlchemy pools now, over every live process", multiprocess_mode="livesum")
DB_POOL_SIZE = Gauge(
    "lookalike_db_pool_size_connections", "Connections the SQLAlchemy pools keep open "
    "(pool_size, without overflow), over every live process that has used its pool",
    multiprocess_mode="livesum")


def multiprocess_dir() -> str | None:
    """The folder the processes share their values through, or None (one process)."""
    path = os.environ.get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


def process_exited(pid: int) -> None:
    """Drop the live gauges of a process that has ended (gunicorn's child_exit, Celery's)."""
    if multiprocess_dir() is not None:
        mark_process_dead(pid)


class _Collectors:
    """Several collectors as one, registered without describing them (collected per scrape)."""

    def __init__(self, collectors: Iterable[Any]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Any]:
        """Every metric family of every collector."""
        for collector in self.collectors:
            yield from collector.collect()


def scrape_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """The registry one scrape reads: every process's values (or this one's), plus `extra`."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path is not None:
        MultiProcessCollector(registry, path=path)
    else:
        registry.register(_Collectors([REGISTRY]))  # type: ignore[arg-type]
    if extra:
        registry.register(_Collectors(extra))  # type: ignore[arg-type]
    return registry


def render(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The Prometheus text exposition of a scrape, and its content type."""
    return generate_latest(scrape_registry(extra)), CONTENT_TYPE_LATEST
