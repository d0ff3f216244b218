"""Reading jobs: item counts, first errors, rate and ETA, listings."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from service.errors import ApiError
from service.jobs.models import (
    ACTIVE_JOB_STATUSES,
    EXPANDING,
    ITEM_STATUSES,
    JOB_STATUSES,
    IngestItem,
    IngestJob,
)
from service.jobs.service import get_job

FIRST_ERRORS = 10


def item_counts(job_ids: list[uuid.UUID], *, session: Session) -> dict[uuid.UUID, dict[str, int]]:
    """Items per status of each job, from one GROUP BY over the (job, status) index."""
    out: dict[uuid.UUID, dict[str, int]] = {j: dict.fromkeys(ITEM_STATUSES, 0) for j in job_ids}
    if not job_ids:
        return out
    rows = session.execute(select(IngestItem.job_id, IngestItem.status, func.count())
                           .where(IngestItem.job_id.in_(job_ids))
                           .group_by(IngestItem.job_id, IngestItem.status))
    for job_id, status, count in rows:
        out[job_id][status] = int(count)
    return out


def first_errors(job_id: uuid.UUID, *, session: Session,
                 limit: int = FIRST_ERRORS) -> list[IngestItem]:
    """The job's first failed items, in submission order."""
    return list(session.scalars(select(IngestItem).where(
        IngestItem.job_id == job_id, IngestItem.status == "failed")
        .order_by(IngestItem.id).limit(limit)))


@dataclass
class Progress:
    """A job with its derived counts, rate and ETA."""

    job: IngestJob
    counts: dict[str, int]
    rate: float | None
    eta_s: float | None
    errors: list[IngestItem]


def progress(job: IngestJob, counts: dict[str, int], *, now: datetime,
             errors: list[IngestItem] | None = None) -> Progress:
    """Images per second since the job started, and the seconds left at that rate."""
    processed = counts["done"] + counts["duplicate"] + counts["failed"]
    remaining = counts["pending"] + counts["running"]
    rate = eta = None
    if job.status == EXPANDING:
        return Progress(job, counts, None, None, errors or [])
    if job.started_at is not None:
        elapsed = ((job.finished_at or now) - job.started_at).total_seconds()
        if elapsed > 0:
            rate = processed / elapsed
            if job.status in ACTIVE_JOB_STATUSES and rate > 0:
                eta = remaining / rate
    if job.status in ACTIVE_JOB_STATUSES and remaining == 0:
        eta = 0.0
    return Progress(job, counts, rate, eta, errors or [])


def job_progress(job_id: str | uuid.UUID, *, session: Session) -> Progress:
    """One job's progress with its first errors."""
    job = get_job(job_id, session=session)
    counts = item_counts([job.id], session=session)[job.id]
    now = session.scalar(select(func.now()))
    return progress(job, counts, now=now, errors=first_errors(job.id, session=session))


def list_jobs(*, session: Session, status: str | None, collection: str | None, limit: int,
              cursor: tuple[datetime, uuid.UUID] | None) -> list[Progress]:
    """Jobs newest first after the keyset cursor, with their counts."""
    query = select(IngestJob)
    if status is not None:
        if status not in JOB_STATUSES:
            raise ApiError("invalid_status", f"status must be one of {', '.join(JOB_STATUSES)}")
        query = query.where(IngestJob.status == status)
    if collection is not None:
        query = query.where(IngestJob.collection == collection)
    if cursor is not None:
        created, last = cursor
        query = query.where(or_(IngestJob.created_at < created,
                                and_(IngestJob.created_at == created, IngestJob.id < last)))
    jobs = list(session.scalars(query.order_by(IngestJob.created_at.desc(),
                                               IngestJob.id.desc()).limit(limit)))
    counts = item_counts([j.id for j in jobs], session=session)
    now = session.scalar(select(func.now()))
    return [progress(j, counts[j.id], now=now) for j in jobs]


def list_items(job_id: str | uuid.UUID, *, session: Session, status: str | None, limit: int,
               after: int | None) -> list[IngestItem]:
    """A job's items in submission order after the cursor (an item id)."""
    job = get_job(job_id, session=session)
    query = select(IngestItem).where(IngestItem.job_id == job.id)
    if status is not None:
        if status not in ITEM_STATUSES:
            raise ApiError("invalid_status", f"status must be one of {', '.join(ITEM_STATUSES)}")
        query = query.where(IngestItem.status == status)
    if after is not None:
        query = query.where(IngestItem.id > after)
    return list(session.scalars(query.order_by(IngestItem.id).limit(limit)))
