"""Jobs domain: durable items, progress, listing, cancel and the sweeper.

Archives are expanded by a worker (service/jobs/expansion.py); server directories and
manifests are expanded here, in the request.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from service.errors import ApiError, NotFound, parse_uuid
from service.images.service import validate_collection, validate_metadata
from service.jobs.metadata import METADATA_NAMES, MetadataIndex, normalise_key, parse_metadata
from service.jobs.models import (
    ACTIVE_JOB_STATUSES,
    BATCH_JOB_STATUSES,
    EXPANDING,
    ITEM_STATUSES,
    JOB_STATUSES,
    IngestItem,
    IngestJob,
)
from service.queue import EXPAND_JOB, INGEST_BATCH, enqueue_or_sweep

INSERT_CHUNK = 5_000
FIRST_ERRORS = 10
# Any constant works: it only has to be the same in every process that sweeps.
SWEEP_LOCK_KEY = 0x10_0C_A1_1C
# Likewise: the class of the per-job advisory locks that expansions hold while they run.
EXPAND_LOCK_CLASS = 0x0E_C5_A1


@dataclass
class NewItem:
    """An item about to be recorded: pending with a source, or already failed with a reason."""

    name: str
    source: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---- where job files live, and which server paths may be read ------------------------------
def job_dir(storage_dir: str | Path, job_id: uuid.UUID) -> Path:
    """The folder of one job's extracted files."""
    return Path(storage_dir) / "jobs" / str(job_id)


def remove_job_dir(storage_dir: str | Path, job_id: uuid.UUID) -> None:
    """Delete a job's extracted files (their bytes are in the content store by then)."""
    shutil.rmtree(job_dir(storage_dir, job_id), ignore_errors=True)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_under_roots(raw: str, roots: Iterable[str]) -> Path:
    """The real path of `raw` if it lies under one of the roots (after symlinks), else 400."""
    roots = [Path(os.path.realpath(r)) for r in roots if r]
    if not roots:
        raise ApiError("path_not_allowed", "server paths are disabled (INGEST_ROOTS is empty)")
    if not isinstance(raw, str) or not raw or "\x00" in raw or not os.path.isabs(raw):
        raise ApiError("path_not_allowed", "a server path must be absolute")
    real = Path(os.path.realpath(raw))
    if not any(_under(real, root) for root in roots):
        raise ApiError("path_not_allowed", f"{raw} is outside the configured INGEST_ROOTS")
    return real


def readable_source(source: str, *, storage_dir: str | Path, roots: Iterable[str]) -> Path:
    """Re-check at read time that an item's file is still where jobs may read (symlink swaps)."""
    real = Path(os.path.realpath(source))
    allowed = [Path(os.path.realpath(Path(storage_dir) / "jobs"))]
    allowed += [Path(os.path.realpath(r)) for r in roots if r]
    if not any(_under(real, root) for root in allowed):
        raise PermissionError("the file is outside the storage directory and INGEST_ROOTS")
    return real


# ---- expansion --------------------------------------------------------------------------------
def _metadata_index(data: bytes | None, name: str | None) -> MetadataIndex:
    return MetadataIndex(parse_metadata(data, name) if data is not None else {})


def typed_items(items: list[NewItem], *, max_metadata_bytes: int) -> list[NewItem]:
    """Items whose metadata is too large or not JSON fail alone rather than the whole job."""
    for item in items:
        if item.error is None:
            try:
                validate_metadata(item.metadata, max_bytes=max_metadata_bytes)
            except ApiError as exc:
                item.error, item.metadata = exc.message, {}
    return items


def insert_items(job: IngestJob, items: list[NewItem], *, session: Session) -> int:
    """Insert a job's items in chunks of multi-row inserts and set its total; no commit.

    A job with nothing to process (empty, or every entry refused) is finished here. Returns
    the number of pending items.
    """
    rows = [{"job_id": job.id, "name": it.name, "source": it.source, "meta": it.metadata,
             "status": "failed" if it.error else "pending", "error": it.error}
            for it in items]
    for start in range(0, len(rows), INSERT_CHUNK):
        session.execute(insert(IngestItem), rows[start:start + INSERT_CHUNK])
    job.total = len(items)
    pending = sum(1 for it in items if it.error is None)
    if pending:
        job.status = "queued"
    else:
        job.status = "failed" if items else "done"
        job.started_at = job.finished_at = session.scalar(select(func.now()))
    return pending


def _record(items: list[NewItem], *, session: Session, collection: str, kind: str,
            source: str | None) -> IngestJob:
    """Insert the job and its items; nothing is committed."""
    job = IngestJob(id=uuid.uuid4(), collection=collection, kind=kind,
                    source=source[:2000] if source else None, status="queued", total=0)
    session.add(job)
    session.flush()
    insert_items(job, items, session=session)
    return job


def _is_the_metadata(name: str, path: Path | None,
                     metadata: tuple[bytes, str | None] | None) -> bool:
    """The metadata file sent beside the files, found among them too (same name and bytes)."""
    # `lookalike ingest DIR --metadata DIR/labels.csv` sends the file both ways; as an item
    # it could only fail ("not an image").
    if metadata is None or not metadata[1] or path is None:
        return False
    data, filename = metadata
    parts = normalise_key(name).split("/")
    if parts[-1] != filename or len(parts) > 2:
        return False
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def create_path_job(path: str, *, session: Session, roots: list[str], collection: str,
                    metadata: tuple[bytes, str | None] | None, max_entries: int,
                    max_metadata_bytes: int) -> IngestJob:
    """Record one item per file of a server directory under INGEST_ROOTS."""
    collection = validate_collection(collection)
    root = resolve_under_roots(path, roots)
    if not root.is_dir():
        raise ApiError("not_a_directory", f"{path} is not a directory on the server")
    if metadata is None:
        for name in METADATA_NAMES:
            candidate = root / name
            if candidate.is_file() and not candidate.is_symlink():
                metadata = (candidate.read_bytes(), name)
                break
    index = _metadata_index(*metadata) if metadata is not None else MetadataIndex({})
    items = []
    for rel, full, problem in _walk(root, max_entries=max_entries):
        if rel in METADATA_NAMES or (problem is None and _is_the_metadata(rel, full, metadata)):
            continue
        items.append(NewItem(rel, None, error=problem) if problem
                     else NewItem(rel, str(full), index.lookup(rel)))
    return _record(typed_items(items, max_metadata_bytes=max_metadata_bytes), session=session,
                   collection=collection, kind="path", source=str(root))


def _walk(root: Path, *, max_entries: int) -> list[tuple[str, Path, str | None]]:
    """Files under `root` in name order; links and special files come back with a reason."""
    out: list[tuple[str, Path, str | None]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        for entry in entries:
            full = Path(entry.path)
            rel = full.relative_to(root).as_posix()
            if entry.name in (".DS_Store", "Thumbs.db") or entry.name.startswith("._"):
                continue
            if entry.is_symlink():
                out.append((rel, full, "links are not followed in server paths"))
            elif entry.is_dir(follow_symlinks=False):
                stack.append(full)
                continue
            elif not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                out.append((rel, full, "not a regular file"))
            else:
                out.append((rel, full, None))
            if len(out) > max_entries:
                raise ApiError("too_many_files", f"the directory has more than {max_entries} "
                               "files")
    return sorted(out, key=lambda t: t[0])


def create_manifest_job(entries: list[tuple[str, dict[str, Any]]], *, session: Session,
                        roots: list[str], collection: str, max_entries: int,
                        max_metadata_bytes: int) -> IngestJob:
    """Record one item per listed server file; any path outside INGEST_ROOTS refuses all."""
    collection = validate_collection(collection)
    if len(entries) > max_entries:
        raise ApiError("too_many_files", f"the manifest lists more than {max_entries} files")
    items = []
    for raw, meta in entries:
        real = resolve_under_roots(raw, roots)
        if not real.is_file():
            items.append(NewItem(raw, None, error="no such file on the server"))
        else:
            items.append(NewItem(raw, str(real), dict(meta)))
    return _record(typed_items(items, max_metadata_bytes=max_metadata_bytes), session=session,
                   collection=collection, kind="manifest",
                   source=f"manifest of {len(items)} files")


# ---- reading ----------------------------------------------------------------------------------
def get_job(job_id: str | uuid.UUID, *, session: Session) -> IngestJob:
    """The job, or 404."""
    job = session.get(IngestJob, parse_uuid(job_id, what="job"))
    if job is None:
        raise NotFound("not_found", f"no job {job_id}")
    return job


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


# ---- state changes ----------------------------------------------------------------------------
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
