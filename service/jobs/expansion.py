"""Archive jobs: the request saves the upload; a worker expands it (`lookalike.expand_job`).

The request only streams the parts into the job's folder and records the job as `expanding`,
so it answers at once whatever the archive holds. The expansion extracts and records the items
in a worker, one run at a time per job (a PostgreSQL advisory lock held on its own connection,
so a worker that dies releases it), and starts again from a clean folder when re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.errors import ApiError
from service.images.validation import validate_collection
from service.jobs.archives import METADATA_MAX_BYTES, ArchiveLimits, Entry, extract_archive
from service.jobs.metadata import MetadataIndex, normalise_key, parse_metadata
from service.jobs.models import ACTIVE_JOB_STATUSES, EXPANDING, IngestJob
from service.jobs.paths import job_dir, remove_job_dir
from service.jobs.service import NewItem, insert_items, typed_items
from service.jobs.states import lock_job
from service.jobs.sweeper import EXPAND_LOCK_CLASS, expand_lock_key

UPLOAD = "upload"
SIDE_METADATA = "metadata"
SIDE_METADATA_NAME = "metadata-name.json"
PARTS = "parts"


class UploadSink:
    """A werkzeug stream factory: each uploaded file part goes to a file in the job's folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def __call__(self, total_content_length: int | None, content_type: str | None,
                 filename: str | None, content_length: int | None = None) -> IO[bytes]:
        """A fresh file for the next part (the folder is created by the first one)."""
        parts = self.folder / PARTS
        parts.mkdir(parents=True, exist_ok=True)
        self.count += 1
        return (parts / f"{self.count:04d}").open("wb+")


def create_archive_job(job_id: uuid.UUID, upload: IO[bytes], *, session: Session,
                       storage_dir: str | Path, collection: str, filename: str | None,
                       metadata: IO[bytes] | bytes | None,
                       metadata_name: str | None) -> IngestJob:
    """Keep the saved upload (and metadata) in the job's folder and record the job; no commit."""
    collection = validate_collection(collection)
    folder = job_dir(storage_dir, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    _keep(upload, folder / UPLOAD)
    if metadata is not None:
        target = folder / SIDE_METADATA
        if isinstance(metadata, bytes):
            target.write_bytes(metadata)
        else:
            _keep(metadata, target)
        if target.stat().st_size > METADATA_MAX_BYTES:
            raise ApiError("invalid_metadata",
                           f"the metadata file is larger than {METADATA_MAX_BYTES} bytes")
        (folder / SIDE_METADATA_NAME).write_text(json.dumps({"name": metadata_name}))
    shutil.rmtree(folder / PARTS, ignore_errors=True)
    job = IngestJob(id=job_id, collection=collection, kind="archive",
                    source=filename[:2000] if filename else None, status=EXPANDING, total=0)
    session.add(job)
    session.flush()
    return job


def _keep(stream: IO[bytes], target: Path) -> None:
    """Move a part UploadSink wrote to its place (or copy a stream that is not one)."""
    name = getattr(stream, "name", None)
    if isinstance(name, str) and Path(name).parent.name == PARTS:
        stream.close()
        os.replace(name, target)
        return
    stream.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(stream, out, 1024 * 1024)


def _side_metadata(folder: Path) -> tuple[bytes, str | None] | None:
    path = folder / SIDE_METADATA
    if not path.exists():
        return None
    name = json.loads((folder / SIDE_METADATA_NAME).read_text()).get("name")
    return path.read_bytes(), name


@dataclass(frozen=True)
class ExpandSettings:
    """What an expansion needs from the configuration."""

    storage_dir: str
    limits: ArchiveLimits
    max_metadata_bytes: int


def expand_settings(config: Any) -> ExpandSettings:
    """The expansion settings from the app's configuration."""
    return ExpandSettings(
        storage_dir=str(config["STORAGE_DIR"]),
        limits=ArchiveLimits(max_entries=int(config["ARCHIVE_MAX_ENTRIES"]),
                             max_total_bytes=int(config["ARCHIVE_MAX_TOTAL_BYTES"]),
                             max_ratio=float(config["ARCHIVE_MAX_RATIO"]),
                             max_entry_bytes=int(config["MAX_UPLOAD_BYTES"])),
        max_metadata_bytes=int(config["MAX_METADATA_BYTES"]))


@dataclass(frozen=True)
class Expansion:
    """What one run did: `busy`, `skipped` (not expanding), `failed`, `queued` or final."""

    status: str
    pending: int = 0


@contextmanager
def expansion_lock(session: Session, job_id: uuid.UUID) -> Iterator[bool]:
    """Whether this run holds the job's expansion lock (on a connection of its own)."""
    conn = session.get_bind().connect()  # type: ignore[union-attr]
    try:
        held = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:c, :k)"),
                                {"c": EXPAND_LOCK_CLASS, "k": expand_lock_key(job_id)}))
        conn.commit()
        yield held
        if held:
            with suppress(Exception):  # a lost connection released it anyway
                conn.execute(text("SELECT pg_advisory_unlock(:c, :k)"),
                             {"c": EXPAND_LOCK_CLASS, "k": expand_lock_key(job_id)})
                conn.commit()
    finally:
        with suppress(Exception):
            conn.close()


def expand_job(job_id: uuid.UUID, *, session: Session, settings: ExpandSettings) -> Expansion:
    """Extract a job's archive and record its items; idempotent, one run per job at a time."""
    with expansion_lock(session, job_id) as held:
        if not held:
            return Expansion("busy")
        job = lock_job(job_id, session=session)
        if job is None or job.status != EXPANDING:
            session.rollback()
            return Expansion("skipped")
        job.attempts += 1
        job.progress_at = session.scalar(select(func.now()))
        session.commit()
        folder = job_dir(settings.storage_dir, job_id)
        # What a run that crashed had extracted: this run starts again from the upload.
        shutil.rmtree(folder / "files", ignore_errors=True)
        try:
            if not (folder / UPLOAD).is_file():
                raise ApiError("upload_missing", "the uploaded archive is no longer on the "
                               "server; submit it again")
            items = archive_items(folder, settings)
        except ApiError as exc:
            failed = fail_expansion(job_id, exc.code, exc.message, session=session,
                                    storage_dir=settings.storage_dir)
            return Expansion("failed" if failed else "skipped")
        return _record_items(job_id, items, session=session, storage_dir=settings.storage_dir)


def archive_items(folder: Path, settings: ExpandSettings) -> list[NewItem]:
    """Extract the folder's upload and make one item per file (metadata joined in)."""
    side = _side_metadata(folder)
    side_digest = hashlib.sha256(side[0]).hexdigest() if side is not None else None
    extracted = extract_archive(folder / UPLOAD, folder, settings.limits,
                                fingerprint=lambda name: _names_side(name, side))
    # A metadata file sent beside the archive wins over one inside it.
    if side is not None:
        index, meta_dir = MetadataIndex(parse_metadata(*side)), ""
    else:
        index = MetadataIndex(parse_metadata(extracted.metadata, extracted.metadata_name)
                              if extracted.metadata is not None else {})
        meta_dir = extracted.metadata_dir
    items = [_item(e, index, meta_dir) for e in extracted.entries
             if not (side is not None and e.sha256 == side_digest
                     and e.size == len(side[0]) and _names_side(e.name, side))]
    return typed_items(items, max_metadata_bytes=settings.max_metadata_bytes)


def _names_side(name: str, side: tuple[bytes, str | None] | None) -> bool:
    """Whether an entry has the side metadata file's name, at the top or one folder down."""
    # `lookalike ingest DIR --metadata DIR/labels.csv` sends the file both ways; as an item
    # it could only fail ("not an image").
    if side is None or not side[1]:
        return False
    parts = normalise_key(name).split("/")
    return parts[-1] == side[1] and len(parts) <= 2


def _item(entry: Entry, index: MetadataIndex, meta_dir: str) -> NewItem:
    if entry.error is not None or entry.path is None:
        return NewItem(entry.name, None, error=entry.error or "not extracted")
    key = normalise_key(entry.name)
    if meta_dir and key.startswith(meta_dir + "/"):
        key = key[len(meta_dir) + 1:]
    return NewItem(entry.name, str(entry.path), index.lookup(key))


def _record_items(job_id: uuid.UUID, items: list[NewItem], *, session: Session,
                  storage_dir: str | Path) -> Expansion:
    job = lock_job(job_id, session=session)
    if job is None or job.status != EXPANDING:
        # Cancelled (or deleted) while extracting: nothing is recorded, nothing stays.
        session.rollback()
        if job is None or job.status not in ACTIVE_JOB_STATUSES:
            remove_job_dir(storage_dir, job_id)
        return Expansion("skipped")
    pending = insert_items(job, items, session=session)
    job.progress_at = session.scalar(select(func.now()))
    status = job.status
    session.commit()
    folder = job_dir(storage_dir, job_id)
    if status not in ACTIVE_JOB_STATUSES:
        remove_job_dir(storage_dir, job_id)
    else:
        for name in (UPLOAD, SIDE_METADATA, SIDE_METADATA_NAME):
            (folder / name).unlink(missing_ok=True)
    return Expansion(status, pending)


def fail_expansion(job_id: uuid.UUID, code: str, message: str, *, session: Session,
                   storage_dir: str | Path) -> bool:
    """End an expanding job as failed with its reason and remove its files; commits."""
    session.rollback()
    job = lock_job(job_id, session=session)
    if job is None or job.status != EXPANDING:
        session.rollback()
        return False
    job.status, job.error_code, job.error = "failed", code[:64], message[:2000]
    job.finished_at = session.scalar(select(func.now()))
    job.started_at = job.started_at or job.finished_at
    session.commit()
    remove_job_dir(storage_dir, job_id)
    return True


def remove_stray_dirs(storage_dir: str | Path, *, session: Session, older_than_s: float) -> int:
    """Remove job folders no open job owns (an upload cut off, a crash before clean-up)."""
    root = Path(storage_dir) / "jobs"
    try:
        folders = {uuid.UUID(p.name): p for p in root.iterdir() if _is_uuid(p.name)}
    except FileNotFoundError:
        return 0
    if not folders:
        return 0
    open_ids = set(session.scalars(select(IngestJob.id).where(
        IngestJob.id.in_(list(folders)), IngestJob.status.in_(ACTIVE_JOB_STATUSES))))
    cutoff, removed = time.time() - older_than_s, 0
    for job_id, folder in folders.items():
        if job_id not in open_ids and _newest_mtime(folder) < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _is_uuid(name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return True


def _newest_mtime(folder: Path) -> float:
    """The latest change in the folder or one level below (where uploads are written)."""
    newest = 0.0
    with suppress(OSError):
        newest = folder.stat().st_mtime
        for child in folder.iterdir():
            newest = max(newest, child.stat().st_mtime)
            if child.is_dir() and child.name == PARTS:
                newest = max([newest, *(p.stat().st_mtime for p in child.iterdir())])
    return newest
