"""A job's state changes: its row lock, cancelling, and finishing once no item is left."""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.errors import NotFound, parse_uuid
from service.jobs.models import (
    ACTIVE_JOB_STATUSES,
    BATCH_JOB_STATUSES,
    IngestItem,
    IngestJob,
)
from service.jobs.paths import remove_job_dir
from service.jobs.progress import item_counts


def lock_job(job_id: uuid.UUID, *, session: Session) -> IngestJob | None:
    """The job row locked for this transaction; every writer takes it first (no deadlocks)."""
    return session.scalar(select(IngestJob).where(IngestJob.id == job_id)
                          .with_for_update().execution_options(populate_existing=True))


def cancel_job(job_id: str | uuid.UUID, *, session: Session, storage_dir: str | Path) -> IngestJob:
    """Stop a job: unfinished items become cancelled; finished ones stay. Idempotent."""
    job = lock_job(parse_uuid(job_id, what="job"), session=session)
    if job is None:
        raise NotFound("not_found", f"no job {job_id}")
    if job.status in ACTIVE_JOB_STATUSES:
        session.execute(update(IngestItem).where(
            IngestItem.job_id == job.id, IngestItem.status.in_(("pending", "running")))
            .values(status="cancelled", claim_token=None, updated_at=func.now()))
        job.status = "cancelled"
        job.finished_at = session.scalar(select(func.now()))
        session.commit()
        remove_job_dir(storage_dir, job.id)
    return job


def finish_if_complete(job_id: uuid.UUID, *, session: Session,
                       storage_dir: str | Path) -> str | None:
    """Close a job whose items are all terminal; returns its final status, or None if open."""
    job = lock_job(job_id, session=session)
    if job is None or job.status not in BATCH_JOB_STATUSES:
        session.rollback()
        return None
    counts = item_counts([job.id], session=session)[job.id]
    if counts["pending"] or counts["running"]:
        session.rollback()
        return None
    succeeded = counts["done"] + counts["duplicate"]
    job.status = "failed" if succeeded == 0 and counts["failed"] else "done"
    job.finished_at = session.scalar(select(func.now()))
    job.started_at = job.started_at or job.finished_at
    session.commit()
    remove_job_dir(storage_dir, job.id)
    return job.status
