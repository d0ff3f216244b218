"""Celery tasks: ids in, one domain call, retries for transient errors."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import shared_task
from flask import current_app

from service.db import get_engine, session_scope
from service.embedding import compact, indexes
from service.embedding.defaults import default_model
from service.embedding.session import get_embedder
from service.evaluation.service import execute_run
from service.graph import rebuilds
from service.hashing.service import fit_code_set
from service.images import service as images
from service.indexing import service as indexing
from service.indexing.reindex import reindex_step
from service.jobs import expansion, pipeline
from service.jobs.expansion import remove_stray_dirs
from service.jobs.pipeline import done_image_ids
from service.jobs.states import finish_if_complete
from service.jobs.sweeper import batches_for, enqueue_batches, enqueue_expansion, sweep
from service.queue import (
    BUILD_INDEX,
    EMBED_IMAGE,
    EXPAND_JOB,
    FIT_CODES,
    INGEST_BATCH,
    LINK_JOB_IMAGES,
    PREPARE_COMPACT,
    REBUILD_GRAPH,
    REINDEX,
    RUN_EVALUATION,
    SWEEP_JOBS,
    TRANSIENT,
    durable_task,
    enqueue,
    enqueue_or_sweep,
    internal_reason,
    is_transient,
)
from service.recovery import stale_work

log = logging.getLogger(__name__)


@durable_task(EMBED_IMAGE)
def embed_image(self: object, image_id: str) -> str:
    """Embed one image with the default model; permanent failures mark it failed."""
    config = current_app.config
    image_uuid = uuid.UUID(image_id)
    with session_scope() as session:
        try:
            # Vectors, labels, derived vectors, codes and graph edges: one commit.
            return indexing.embed_image(
                image_uuid, session=session, store=current_app.extensions["content_store"],
                model_dir=config["MODEL_DIR"], model_name=default_model(session=session),
                max_pixels=int(config["MAX_IMAGE_PIXELS"]),
                link=bool(config["GRAPH_LINK_ON_EMBED"]),
                max_attempts=int(config["JOB_MAX_ATTEMPTS"]),
            )
        except indexing.PermanentEmbedError as exc:
            session.rollback()
            images.mark_failed(image_uuid, str(exc), session=session)
            log.warning("image %s failed: %s", image_id, exc)
            return "failed"


@durable_task(FIT_CODES)
def fit_codes(self: object, code_set_id: int) -> str:
    """Fit a code set on its vectors, encode them and build its Hamming index."""
    with session_scope() as session:
        return fit_code_set(int(code_set_id), session=session)


@durable_task(REBUILD_GRAPH)
def rebuild_graph(self: Any, rebuild_id: str, model_id: int | None = None) -> str:
    """Recompute one collection's kNN graph exactly for a queued request; done or failed."""
    try:
        with session_scope() as session:
            if model_id is not None:  # a message sent as (collection, model id), before rows
                rebuild_id = str(rebuilds.request_rebuild(rebuild_id, int(model_id),
                                                          session=session))
                session.commit()
            return rebuilds.run_rebuild(uuid.UUID(rebuild_id), session=session)
    except TRANSIENT:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise self.retry(exc=exc, countdown=5) from exc
        log.error("graph rebuild %s failed", rebuild_id, exc_info=exc)
        with session_scope() as session:
            rebuilds.fail_rebuild(uuid.UUID(rebuild_id), internal_reason(exc), session=session)
        return "failed"


@durable_task(BUILD_INDEX, max_retries=5)
def build_index(self: Any, build_id: int) -> str:
    """Build one recorded runtime HNSW index CONCURRENTLY (no transaction of this task open)."""
    try:
        return indexes.build(int(build_id), engine=get_engine())
    except TRANSIENT:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise self.retry(exc=exc, countdown=5) from exc
        log.error("index build %s failed", build_id, exc_info=exc)
        with session_scope() as session:
            indexes.fail(int(build_id), internal_reason(exc), session=session)
        return "failed"


@durable_task(RUN_EVALUATION, max_retries=5)
def run_evaluation(self: object, run_id: str) -> str:
    """Run one queued evaluation."""
    with session_scope() as session:
        return execute_run(uuid.UUID(run_id), session=session)


@durable_task(PREPARE_COMPACT)
def prepare_compact(self: object, model_id: int) -> str:
    """Fit, fill and index a model's compact vectors (search uses them once ready)."""
    with session_scope() as session:
        return compact.prepare(int(model_id), session=session)


@durable_task(REINDEX)
def reindex(self: object, run_id: str) -> str:
    """Embed a slice of a reindex run's missing images, then queue the next slice."""
    config = current_app.config
    with session_scope() as session:
        more = reindex_step(uuid.UUID(run_id), session=session,
                            store=current_app.extensions["content_store"],
                            model_dir=config["MODEL_DIR"],
                            max_pixels=int(config["MAX_IMAGE_PIXELS"]))
    if more:
        # Short tasks keep the queue fair to uploads and bound what a lost worker costs.
        enqueue(REINDEX, run_id)
    return "more" if more else "done"




@durable_task(INGEST_BATCH, retry_backoff_max=60, max_retries=12)
def ingest_batch(self: Any, job_id: str, token: str) -> dict[str, object]:
    """Process one batch of a job's items; a retry (same token) resumes the same claim.

    An error that is not transient fails the batch's claimed items at once, with a reason,
    and the job goes on: nothing waits for the sweeper's timeout.
    """

    config = current_app.config
    with session_scope() as session:
        model_name = default_model(session=session)
    embedder = get_embedder(config["MODEL_DIR"], model_name,
                            threads=int(config["ORT_INTRA_OP_THREADS"]))
    try:
        with session_scope() as session:
            result = pipeline.process_batch(
                uuid.UUID(job_id), uuid.UUID(token), session=session,
                store=current_app.extensions["content_store"], embedder=embedder,
                settings=pipeline.batch_settings(config))
            # Binary codes of the new images were written with them. Graph edges are not
            # linked one by one here: that halved ingestion throughput (docs/benchmarks.md);
            # the collection's graph is rebuilt in one pass after the job.
            if (result.finished == "done" and result.collection is not None
                    and config["GRAPH_LINK_ON_EMBED"]):
                indexing.graph_after_job(
                    uuid.UUID(job_id), result.collection, model_name, session=session,
                    rebuild_max_images=int(config["GRAPH_REBUILD_MAX_IMAGES"]))
    except TRANSIENT:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise self.retry(exc=exc, countdown=5) from exc
        return _fail_batch(job_id, token, exc)
    if result.more:  # each finished batch sends the next; a lost one is re-sent by the sweeper
        enqueue_batches(job_id, 1)
    return {"claimed": result.claimed, "done": result.done, "duplicates": result.duplicates,
            "failed": result.failed, "finished": result.finished}


def _fail_batch(job_id: str, token: str, exc: Exception) -> dict[str, object]:
    """Fail what the batch had claimed, then let the job go on or finish."""
    log.error("batch %s of job %s failed", token, job_id, exc_info=exc)
    with session_scope() as session:
        failed, more = pipeline.fail_claim(uuid.UUID(job_id), uuid.UUID(token),
                                           internal_reason(exc), session=session)
        finished = None if more else finish_if_complete(
            uuid.UUID(job_id), session=session, storage_dir=current_app.config["STORAGE_DIR"])
    if failed and more:
        # Only after progress: a batch that fails before claiming anything must not loop.
        enqueue_batches(job_id, 1)
    return {"claimed": failed, "done": 0, "duplicates": 0, "failed": failed,
            "finished": finished, "error": internal_reason(exc)}


@durable_task(EXPAND_JOB, retry_backoff_max=60)
def expand_job(self: Any, job_id: str) -> dict[str, object]:
    """Extract an uploaded archive into items, then send its first batches (idempotent)."""
    config = current_app.config
    try:
        with session_scope() as session:
            outcome = expansion.expand_job(uuid.UUID(job_id), session=session,
                                           settings=expansion.expand_settings(config))
    except TRANSIENT:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise self.retry(exc=exc, countdown=5) from exc
        log.error("expansion of job %s failed", job_id, exc_info=exc)
        with session_scope() as session:
            expansion.fail_expansion(uuid.UUID(job_id), "internal_error", internal_reason(exc),
                                     session=session, storage_dir=config["STORAGE_DIR"])
        return {"status": "failed", "error": internal_reason(exc)}
    if outcome.pending:
        enqueue_batches(job_id, batches_for(outcome.pending,
                                            batch_size=int(config["JOB_BATCH_SIZE"]),
                                            parallelism=int(config["JOB_PARALLELISM"])))
    return {"status": outcome.status, "pending": outcome.pending}


@durable_task(LINK_JOB_IMAGES)
def link_job_images(self: object, job_id: str) -> int:
    """Link every image a job created into the kNN graph (idempotent: edges are upserted)."""
    with session_scope() as session:
        ids = done_image_ids(uuid.UUID(job_id), session=session)
        return indexing.link_images(ids, session=session)


@shared_task(name=SWEEP_JOBS, acks_late=True, reject_on_worker_lost=True)
def sweep_jobs() -> dict[str, int]:
    """Re-enqueue stuck items and stalled jobs from PostgreSQL; close finished jobs."""
    config = current_app.config
    with session_scope() as session:
        report = sweep(session=session, timeout_s=float(config["JOB_ITEM_TIMEOUT"]),
                       max_attempts=int(config["JOB_MAX_ATTEMPTS"]),
                       batch_size=int(config["JOB_BATCH_SIZE"]),
                       parallelism=int(config["JOB_PARALLELISM"]),
                       storage_dir=config["STORAGE_DIR"])
    for job_id, count in report.enqueue.items():
        enqueue_batches(job_id, count)
    for job_id in report.expand:
        enqueue_expansion(job_id)
    with session_scope() as session:
        strays = remove_stray_dirs(config["STORAGE_DIR"], session=session,
                                   older_than_s=float(config["JOB_ITEM_TIMEOUT"]))
    # Evaluations, code-set fits and reindex runs whose message was lost.
    with session_scope() as session:
        work = stale_work(session=session, older_than_s=float(config["JOB_ITEM_TIMEOUT"]))
    for task, args in work:
        enqueue_or_sweep(task, *args)
    # Models grown past the size where compact vectors pay (a running fill answers "busy").
    with session_scope() as session:
        compactable = compact.due(session=session)
    for model_id in compactable:
        enqueue_or_sweep(PREPARE_COMPACT, model_id)
    # Single uploads whose embed message was lost (Redis down at upload, or restarted).
    with session_scope() as session:
        stale = images.claim_stale_pending(session=session,
                                           older_than_s=float(config["JOB_ITEM_TIMEOUT"]))
    for image_id in stale:
        enqueue_or_sweep(EMBED_IMAGE, str(image_id))
    if (report.reset or report.gave_up or report.enqueue or report.finished or report.expand
            or report.abandoned or strays or work):
        log.info("sweep: reset %d, gave up %d, re-enqueued %s, finished %d, re-expanding %s, "
                 "abandoned %d, stray folders %d", report.reset, report.gave_up,
                 {str(k): v for k, v in report.enqueue.items()}, report.finished,
                 [str(j) for j in report.expand], report.abandoned, strays)
    return {"reset": report.reset, "gave_up": report.gave_up,
            "enqueued": sum(report.enqueue.values()), "finished": report.finished,
            "expanding": len(report.expand), "abandoned": report.abandoned, "strays": strays,
            "work": len(work)}
