"""Gauges computed when /metrics is scraped: queue depth from Redis, inventory from PostgreSQL.

The inventory is counted exactly while a table's planner estimate (pg_class.reltuples) is at
most METRICS_EXACT_COUNT_MAX_ROWS: at 1M images an exact GROUP BY took 0.33 s and the vectors'
join by collection 1.0-1.3 s (docs/operations.md), too much for every scrape. Above it, the
counts come from PostgreSQL's statistics (ANALYZE's most common values times reltuples, ~1 ms),
and lookalike_inventory_estimated says so. A count that took t seconds is reused for 10 t
(1 to 30 s), so that however many scrapers ask, counting costs a process at most a tenth of
one database connection's time; every statement has a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

# Kombu's Redis transport keeps each priority of a queue in a list of its own.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
MAX_COLLECTIONS = 100  # the largest ones by name; the rest are summed as "_other"
OTHER = "_other"
ALL = "_all"
REUSE_FACTOR = 10.0
REUSE_MIN_S, REUSE_MAX_S = 1.0, 30.0
STATEMENT_TIMEOUT_MS = 5000


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a Celery queue's waiting messages."""
    return [queue, *(f"{queue}{PRIORITY_SEPARATOR}{p}" for p in PRIORITY_STEPS)]


def _source_up(source: str, up: bool) -> GaugeMetricFamily:
    family = GaugeMetricFamily("lookalike_metrics_source_up", "Whether this scrape could read "
                               "a source of its gauges (redis, postgres)", labels=["source"])
    family.add_metric([source], 1.0 if up else 0.0)
    return family


class QueueDepthCollector(Collector):
    """lookalike_celery_queue_length: messages waiting in each Celery queue, read per scrape."""

    def __init__(self, redis_url: str, queues: Sequence[str]) -> None:
        self.queues = list(dict.fromkeys(queues))
        self.client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One LLEN per list of each queue, in one round trip."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                for key in queue_keys(queue):
                    pipe.llen(key)
            pipe.hlen("unacked")
            values = pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics: cannot read the queue lengths: %s", exc)
            yield _source_up("redis", False)
            return
        length = GaugeMetricFamily("lookalike_celery_queue_length", "Messages waiting in a "
                                   "Celery queue (its Redis lists)", labels=["queue"])
        per_queue = len(PRIORITY_STEPS) + 1
        for i, queue in enumerate(self.queues):
            length.add_metric([queue], float(sum(values[i * per_queue:(i + 1) * per_queue])))
        yield length
        yield GaugeMetricFamily("lookalike_celery_unacked_messages", "Messages delivered to a "
                                "worker and not yet acknowledged (running or prefetched)",
                                value=float(values[-1]))
        yield _source_up("redis", True)


def _reltuples(session: Session, table: str) -> float:
    """The planner's row estimate of a table; -1 when it has never been analysed."""
    value = session.execute(text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"),
                            {"t": table}).scalar()
    return float(value) if value is not None else -1.0


def _most_common(session: Session, table: str, column: str, cast: str) -> list[tuple[Any, float]]:
    """ANALYZE's most common values of a column with their fractions of the rows."""
    row = session.execute(text(
        f"SELECT most_common_vals::text::{cast}[], most_common_freqs FROM pg_stats "
        "WHERE schemaname = current_schema() AND tablename = :t AND attname = :c"),
        {"t": table, "c": column}).first()
    if row is None or row[0] is None:
        return []
    return list(zip(row[0], row[1], strict=True))


def _bounded(counts: dict[str, float]) -> dict[str, float]:
    """The MAX_COLLECTIONS largest collections; the others summed under "_other"."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[:MAX_COLLECTIONS])
    rest = sum(v for _, v in ranked[MAX_COLLECTIONS:])
    if rest:
        kept[OTHER] = kept.get(OTHER, 0.0) + rest
    return kept


def _images(session: Session, exact: bool, total: float) -> dict[str, float]:
    if exact:
        rows = session.execute(text("SELECT collection, count(*) FROM images GROUP BY 1"))
        return _bounded({str(c): float(n) for c, n in rows})
    common = {str(c): f * total for c, f in _most_common(session, "images", "collection",
                                                         "text")}
    counts = _bounded(common)
    rest = total - sum(common.values())
    if rest >= 1:
        counts[OTHER] = counts.get(OTHER, 0.0) + rest
    return counts


def _vectors(session: Session, exact: bool, total: float,
             collections: set[str]) -> dict[tuple[str, str], float]:
    names = dict(session.execute(text("SELECT id, name FROM models")).all())
    if not exact:
        return {(ALL, names[int(m)]): f * total
                for m, f in _most_common(session, "image_embeddings", "model_id", "int")
                if int(m) in names}
    counts: dict[tuple[str, str], float] = {}
    rows = session.execute(text(
        "SELECT i.collection, e.model_id, count(*) FROM image_embeddings e "
        "JOIN images i ON i.id = e.image_id GROUP BY 1, 2"))
    for collection, model_id, n in rows:
        key = (collection if collection in collections else OTHER, names.get(model_id, "?"))
        counts[key] = counts.get(key, 0.0) + float(n)
    return counts


def _jobs(session: Session) -> tuple[dict[str, float], dict[str, float]]:
    jobs = {str(s): float(n) for s, n in session.execute(
        text("SELECT status, count(*) FROM ingest_jobs GROUP BY 1"))}
    # Only items of unfinished jobs: those of finished ones are history and grow without end.
    items = {str(s): float(n) for s, n in session.execute(text(
        "SELECT it.status, count(*) FROM ingest_items it JOIN ingest_jobs j ON j.id = it.job_id "
        "WHERE j.status IN ('expanding', 'queued', 'running') GROUP BY 1"))}
    return jobs, items


class InventoryCollector(Collector):
    """Images and vectors per collection and model, jobs and their items by state."""

    def __init__(self, sessions: sessionmaker[Session], exact_max_rows: int) -> None:
        self.sessions = sessions
        self.exact_max_rows = exact_max_rows
        self._lock = threading.Lock()
        # (reusable until, families)
        self._cached: tuple[float, list[GaugeMetricFamily]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The families of the last few seconds, or counted again."""
        with self._lock:
            if self._cached is None or time.monotonic() > self._cached[0]:
                started = time.monotonic()
                try:
                    families = self._count()
                    took = time.monotonic() - started
                    reuse = min(max(REUSE_FACTOR * took, REUSE_MIN_S), REUSE_MAX_S)
                    self._cached = (time.monotonic() + reuse, families)
                except Exception as exc:  # noqa: BLE001 (a scrape must still answer)
                    log.warning("metrics: cannot count the inventory: %s", exc)
                    self._cached = None
                    yield _source_up("postgres", False)
                    return
            families = self._cached[1]
        yield from families
        yield _source_up("postgres", True)

    def _count(self) -> list[GaugeMetricFamily]:
        with self.sessions() as session, session.begin():
            session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
            image_rows = _reltuples(session, "images")
            vector_rows = _reltuples(session, "image_embeddings")
            exact_images = 0 <= image_rows <= self.exact_max_rows or image_rows < 0
            exact_vectors = exact_images and (vector_rows < 0
                                              or vector_rows <= self.exact_max_rows)
            images = _images(session, exact_images, image_rows)
            vectors = _vectors(session, exact_vectors, vector_rows, set(images))
            jobs, items = _jobs(session)
        image_family = GaugeMetricFamily("lookalike_images", "Images per collection (the "
                                         "largest 100; the rest as _other)",
                                         labels=["collection"])
        for collection, n in sorted(images.items()):
            image_family.add_metric([collection], n)
        vector_family = GaugeMetricFamily("lookalike_vectors", "Stored vectors per collection "
                                          "and model (collection _all when estimated)",
                                          labels=["collection", "model"])
        for (collection, model), n in sorted(vectors.items()):
            vector_family.add_metric([collection, model], n)
        estimated = GaugeMetricFamily("lookalike_inventory_estimated", "1 when a table's "
                                      "counts are estimates from PostgreSQL's statistics",
                                      labels=["table"])
        estimated.add_metric(["images"], 0.0 if exact_images else 1.0)
        estimated.add_metric(["image_embeddings"], 0.0 if exact_vectors else 1.0)
        job_family = GaugeMetricFamily("lookalike_jobs", "Ingest jobs by status",
                                       labels=["status"])
        for status, n in sorted(jobs.items()):
            job_family.add_metric([status], n)
        item_family = GaugeMetricFamily("lookalike_job_items", "Items of unfinished ingest jobs "
                                        "(expanding, queued, running) by state",
                                        labels=["state"])
        for state, n in sorted(items.items()):
            item_family.add_metric([state], n)
        return [image_family, vector_family, estimated, job_family, item_family]
