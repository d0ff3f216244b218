"""The sweeper's side of jobs: stuck items, stalled or lost expansions, sending batches."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, select, text, update
from sqlalchemy.orm import Session

from service.jobs.models import (
    ACTIVE_JOB_STATUSES,
    EXPANDING,
    IngestItem,
    IngestJob,
)
from service.jobs.paths import remove_job_dir
from service.jobs.progress import item_counts
from service.jobs.states import finish_if_complete, lock_job
from service.queue import EXPAND_JOB, INGEST_BATCH, enqueue_or_sweep

# Any constant works: it only has to be the same in every process that sweeps.
SWEEP_LOCK_KEY = 0x10_0C_A1_1C


# Likewise: the class of the per-job advisory locks that expansions hold while they run.
EXPAND_LOCK_CLASS = 0x0E_C5_A1


def batches_for(pending: int, *, batch_size: int, parallelism: int) -> int:
    """How many batch messages to put in flight for this many pending items."""
    return min(max(1, parallelism), math.ceil(pending / max(1, batch_size)))


@dataclass
class SweepReport:
    """What one sweep did."""

    reset: int = 0
    gave_up: int = 0
    finished: int = 0
    enqueue: dict[uuid.UUID, int] = field(default_factory=dict)
    expand: list[uuid.UUID] = field(default_factory=list)
    abandoned: int = 0


def expand_lock_key(job_id: uuid.UUID) -> int:
    """The second key of a job's expansion lock (the first is EXPAND_LOCK_CLASS)."""
    return int.from_bytes(job_id.bytes[:4], "big", signed=True)


def expansion_alive(job_id: uuid.UUID, *, session: Session) -> bool:
    """Whether a worker is expanding the job now: its lock is held (tried for this transaction)."""
    return not session.scalar(text("SELECT pg_try_advisory_xact_lock(:c, :k)"),
                              {"c": EXPAND_LOCK_CLASS, "k": expand_lock_key(job_id)})


def _sweep_expanding(job: IngestJob, *, session: Session, cutoff: Any, max_attempts: int,
                     report: SweepReport) -> bool:
    """An expansion without news for the timeout: re-sent, or given up; True if it failed."""
    stale = session.scalar(select(IngestJob.progress_at < cutoff).where(IngestJob.id == job.id))
    if not stale:
        return False
    if not expansion_alive(job.id, session=session):
        # Its message was lost (Redis) or its worker died: send it again, a limited number of
        # times (an archive that kills the worker must not loop).
        if job.attempts >= max_attempts:
            job.status, job.error_code = "failed", "expansion_abandoned"
            job.error = (f"gave up after {max_attempts} attempts: the worker expanding the "
                         "archive stopped each time")
            job.finished_at = session.scalar(select(func.now()))
            job.started_at = job.started_at or job.finished_at
            report.abandoned += 1
            return True
        report.expand.append(job.id)
    job.progress_at = session.scalar(select(func.now()))
    return False


def sweep(*, session: Session, timeout_s: float, max_attempts: int, batch_size: int,
          parallelism: int, storage_dir: str | Path) -> SweepReport:
    """Recover stuck items, expansions and stalled jobs from PostgreSQL, the durable record.

    Items running longer than the timeout lost their worker: they go back to pending (or fail
    after `max_attempts` claims). A job with pending items and no progress for the timeout
    lost its messages (a Redis restart): the caller enqueues fresh batches for it. An archive
    still expanding after the timeout, with no worker on it, gets a fresh expansion message.
    Commits.
    """
    report = SweepReport()
    # One sweeper at a time, whichever worker the beat message lands on.
    if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK_KEY}):
        session.rollback()
        return report
    cutoff = text("now() - make_interval(secs => :t)").bindparams(t=float(timeout_s))
    job_ids = list(session.scalars(select(IngestJob.id).where(
        IngestJob.status.in_(ACTIVE_JOB_STATUSES))))
    to_finish, abandoned = [], []
    for job_id in job_ids:
        job = lock_job(job_id, session=session)
        if job is None or job.status not in ACTIVE_JOB_STATUSES:
            continue
        if job.status == EXPANDING:
            if _sweep_expanding(job, session=session, cutoff=cutoff, max_attempts=max_attempts,
                                report=report):
                abandoned.append(job_id)
            continue
        stale = and_(IngestItem.job_id == job_id, IngestItem.status == "running",
                     IngestItem.claimed_at < cutoff)
        report.gave_up += session.execute(update(IngestItem).where(
            stale, IngestItem.attempts >= max_attempts).values(
            status="failed", claim_token=None, updated_at=func.now(),
            error=f"gave up after {max_attempts} attempts: the worker processing it stopped "
                  "each time")).rowcount or 0
        reset = session.execute(update(IngestItem).where(stale).values(
            status="pending", claim_token=None, updated_at=func.now())).rowcount or 0
        report.reset += reset
        counts = item_counts([job_id], session=session)[job_id]
        stalled = session.scalar(select(IngestJob.progress_at < cutoff)
                                 .where(IngestJob.id == job_id))
        if counts["pending"] and (reset or stalled):
            report.enqueue[job_id] = batches_for(counts["pending"], batch_size=batch_size,
                                                 parallelism=parallelism)
            job.progress_at = session.scalar(select(func.now()))
        elif not counts["pending"] and not counts["running"]:
            to_finish.append(job_id)
    session.commit()
    for job_id in abandoned:
        remove_job_dir(storage_dir, job_id)
    for job_id in to_finish:
        if finish_if_complete(job_id, session=session, storage_dir=storage_dir):
            report.finished += 1
    return report


def enqueue_batches(job_id: uuid.UUID | str, count: int) -> None:
    """Send `count` batch messages for a job, each with its own claim token; after commit.

    The items are durable: a message the broker refuses is re-sent by the sweeper.
    """
    for _ in range(count):
        if not enqueue_or_sweep(INGEST_BATCH, str(job_id), str(uuid.uuid4())):
            return


def enqueue_expansion(job_id: uuid.UUID | str) -> None:
    """Send an archive job's expansion message; after commit (the sweeper re-sends it)."""
    enqueue_or_sweep(EXPAND_JOB, str(job_id))
