"""Jobs domain: creating jobs from server directories and manifests (expanded in the request).

Archives are expanded by a worker (service/jobs/expansion.py).
"""

from __future__ import annotations

import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from service.errors import ApiError, NotFound, parse_uuid
from service.images.validation import validate_collection, validate_metadata
from service.jobs.metadata import METADATA_NAMES, MetadataIndex, normalise_key, parse_metadata
from service.jobs.models import IngestItem, IngestJob
from service.jobs.paths import resolve_under_roots

INSERT_CHUNK = 5_000


@dataclass
class NewItem:
    """An item about to be recorded: pending with a source, or already failed with a reason."""

    name: str
    source: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


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


def get_job(job_id: str | uuid.UUID, *, session: Session) -> IngestJob:
    """The job, or 404."""
    job = session.get(IngestJob, parse_uuid(job_id, what="job"))
    if job is None:
        raise NotFound("not_found", f"no job {job_id}")
    return job


def request_id_of(job_id: str | uuid.UUID, *, session: Session) -> str | None:
    """The request id that created a job (None for an unknown id or an older job)."""
    try:
        key = uuid.UUID(str(job_id))
    except ValueError:
        return None
    return session.scalar(select(IngestJob.request_id).where(IngestJob.id == key))
