"""Processing one batch of a job's items: claim, read, dedup, decode+embed once, write in bulk."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, String, Text, cast, column, func, select, update, values
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import Session

from service.embedding.service import ensure_model_row, save_vectors
from service.embedding.session import Embedder, Embeddings
from service.embedding.transforms import batch, preprocess
from service.hashing.service import encode_images
from service.images.decode import ImageDecodeError, image_header
from service.images.models import Image
from service.images.service import NewImage, remove_if_unreferenced, store_images
from service.images.storage import ContentStore
from service.jobs.models import BATCH_JOB_STATUSES, IngestItem, IngestJob
from service.jobs.service import finish_if_complete, lock_job, readable_source

log = logging.getLogger(__name__)
# Items claimed this many times already are retried one at a time, so a file that kills the
# worker cannot take a whole batch down with it again.
ALONE_AFTER_ATTEMPTS = 2
FILE_WRITERS = 4


@dataclass
class BatchSettings:
    """What a batch needs from the configuration."""

    storage_dir: str
    roots: list[str]
    batch_size: int
    max_pixels: int
    max_bytes: int


@dataclass(frozen=True)
class ClaimedItem:
    """A claimed item's fields, copied out so that later rollbacks cause no lazy reloads."""

    id: int
    name: str
    source: str | None
    meta: dict[str, Any]


@dataclass
class BatchResult:
    """What one batch did, and whether the job has more pending items."""

    claimed: int = 0
    done: int = 0
    duplicates: int = 0
    failed: int = 0
    more: bool = False
    finished: str | None = None
    outcome: dict[int, dict[str, Any]] = field(default_factory=dict)


def claim(job_id: uuid.UUID, token: uuid.UUID, *, session: Session,
          batch_size: int) -> list[ClaimedItem]:
    """Claim up to `batch_size` pending items with SKIP LOCKED, so workers share a job; commits.

    A redelivered or retried message (same token) gets back the items it had claimed.
    """
    job = lock_job(job_id, session=session)
    if job is None or job.status not in BATCH_JOB_STATUSES:
        session.rollback()
        return []
    base = select(IngestItem.id).where(IngestItem.job_id == job_id)
    ids = list(session.scalars(base.where(IngestItem.status == "running",
                                          IngestItem.claim_token == token)
                               .with_for_update(skip_locked=True)))
    if not ids:
        pending = base.where(IngestItem.status == "pending").order_by(IngestItem.id)
        ids = list(session.scalars(pending.where(IngestItem.attempts < ALONE_AFTER_ATTEMPTS)
                                   .limit(batch_size).with_for_update(skip_locked=True)))
        if not ids:
            ids = list(session.scalars(pending.limit(1).with_for_update(skip_locked=True)))
    if not ids:
        session.rollback()
        return []
    items = list(session.scalars(
        update(IngestItem).where(IngestItem.id.in_(ids))
        .values(status="running", claim_token=token, claimed_at=func.now(),
                attempts=IngestItem.attempts + 1, updated_at=func.now())
        .returning(IngestItem).execution_options(populate_existing=True)))
    claimed = sorted((ClaimedItem(i.id, i.name, i.source, dict(i.meta)) for i in items),
                     key=lambda i: i.id)
    if job.status == "queued":
        job.status = "running"
        job.started_at = session.scalar(select(func.now()))
    session.commit()
    return claimed


def read_item(item: ClaimedItem, settings: BatchSettings) -> bytes:
    """The item's bytes: a regular file, not through a final symlink, within the size limit."""
    if not item.source:
        raise FileNotFoundError("the item has no file")
    path = readable_source(item.source, storage_dir=settings.storage_dir, roots=settings.roots)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > settings.max_bytes:
            raise ValueError(f"the file is larger than the limit of {settings.max_bytes} bytes")
        return fh.read(settings.max_bytes + 1)


def _read_reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the file no longer exists"
    if isinstance(exc, PermissionError):
        return f"the file may not be read: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"the file could not be read: {exc.strerror}"
    return str(exc)


def embed_valid(embedder: Embedder, datas: list[bytes], *,
                max_pixels: int) -> tuple[Embeddings, dict[int, str]]:
    """Vectors (and logits) of the decodable files, in order, and why the others failed.

    One `embed_bytes` call in the common case; a bad file makes it decode each file alone to
    find the culprits, then runs the model once over the rest.
    """
    if not datas:
        return Embeddings(np.zeros((0, embedder.info.dim), np.float32), None), {}
    try:
        return embedder.embed_bytes(datas, max_pixels=max_pixels), {}
    except Exception:  # noqa: BLE001 (any decoder failure: find which file it was below)
        pass
    arrays, errors = [], {}
    for i, data in enumerate(datas):
        try:
            arrays.append(preprocess(data, embedder.info.preprocessing, max_pixels=max_pixels))
        except ImageDecodeError as exc:
            errors[i] = exc.message
        except Exception as exc:  # noqa: BLE001 (Pillow raises many types on hostile input)
            errors[i] = f"the image could not be decoded: {exc}"
    if not arrays:
        return Embeddings(np.zeros((0, embedder.info.dim), np.float32), None), errors
    return embedder.run(batch(arrays)), errors


def _header(data: bytes) -> tuple[str, int, int]:
    """Format and size after EXIF orientation (the pixels were decoded by the embedder)."""
    return image_header(data)


def process_batch(job_id: uuid.UUID, token: uuid.UUID, *, session: Session, store: ContentStore,
                  embedder: Embedder, settings: BatchSettings) -> BatchResult:
    """Claim and process one batch of a job; idempotent under redelivery and retries."""
    result = BatchResult()
    items = claim(job_id, token, session=session, batch_size=settings.batch_size)
    result.claimed = len(items)
    if not items:
        result.finished = finish_if_complete(job_id, session=session,
                                             storage_dir=settings.storage_dir)
        return result
    collection = session.scalar(select(IngestJob.collection).where(IngestJob.id == job_id))
    outcome: dict[int, dict[str, Any]] = {}
    readable: list[tuple[ClaimedItem, bytes, str]] = []
    for item in items:
        try:
            data = read_item(item, settings)
        except (OSError, ValueError) as exc:
            outcome[item.id] = {"status": "failed", "error": _read_reason(exc)}
            continue
        readable.append((item, data, hashlib.sha256(data).hexdigest()))
    # Exact duplicates are not decoded or embedded at all.
    digests = {d for _, _, d in readable}
    existing = dict(session.execute(select(Image.sha256, Image.id).where(
        Image.collection == collection, Image.sha256.in_(digests))).all()) if digests else {}
    session.rollback()
    to_embed: list[tuple[ClaimedItem, bytes, str]] = []
    first_of: dict[str, int] = {}
    for item, data, digest in readable:
        if digest in existing:
            outcome[item.id] = {"status": "duplicate", "image_id": existing[digest]}
        elif digest in first_of:
            outcome[item.id] = {"status": "duplicate", "same_as": first_of[digest]}
        else:
            first_of[digest] = item.id
            to_embed.append((item, data, digest))
    # Originals are written (and fsynced) by threads while the model runs: the waits overlap
    # the CPU work instead of adding to it. They must be durable before the rows commit.
    with ThreadPoolExecutor(max_workers=FILE_WRITERS) as pool:
        writes = {digest: pool.submit(store.put, digest, data) for _, data, digest in to_embed}
        embedded, errors = embed_valid(embedder, [d for _, d, _ in to_embed],
                                       max_pixels=settings.max_pixels)
        created = {digest: future.result() for digest, future in writes.items()}
    for i in errors:
        digest = to_embed[i][2]
        if created.get(digest):
            remove_if_unreferenced(digest, session=session, store=store)
    # Each new image with its row in `embedded` (vectors, and logits for automatic tags).
    new: list[tuple[ClaimedItem, NewImage, int]] = []
    row = -1
    for i, (item, data, digest) in enumerate(to_embed):
        if i in errors:
            outcome[item.id] = {"status": "failed", "error": errors[i]}
            continue
        row += 1
        try:
            fmt, width, height = _header(data)
        except Exception as exc:  # noqa: BLE001 (decoded by the embedder, but be safe)
            outcome[item.id] = {"status": "failed", "error": f"unreadable header: {exc}"}
            continue
        new.append((item, NewImage(data=data, digest=digest, filename=item.name, format=fmt,
                                   width=width, height=height, metadata=item.meta), row))
    _commit_results(job_id, token, items, new, embedded, outcome, session=session, store=store,
                    embedder=embedder, collection=collection)
    for entry in outcome.values():
        key = {"done": "done", "duplicate": "duplicates", "failed": "failed"}[entry["status"]]
        setattr(result, key, getattr(result, key) + 1)
    _save_derived(new, outcome, session=session, embedder=embedder,
                  max_pixels=settings.max_pixels)
    result.outcome = outcome
    result.more = session.scalar(select(select(IngestItem.id).where(
        IngestItem.job_id == job_id, IngestItem.status == "pending").exists())) or False
    session.rollback()
    if not result.more:
        result.finished = finish_if_complete(job_id, session=session,
                                             storage_dir=settings.storage_dir)
    return result


def _commit_results(job_id: uuid.UUID, token: uuid.UUID, items: list[ClaimedItem],
                    new: list[tuple[ClaimedItem, NewImage, int]], embedded: Embeddings,
                    outcome: dict[int, dict[str, Any]], *, session: Session, store: ContentStore,
                    embedder: Embedder, collection: str) -> None:
    """Images, vectors and item states in one transaction, only for items this claim owns."""
    model = ensure_model_row(embedder.info, session=session)
    job = lock_job(job_id, session=session)
    owned = set(session.scalars(select(IngestItem.id).where(
        IngestItem.id.in_([i.id for i in items]), IngestItem.status == "running",
        IngestItem.claim_token == token).with_for_update()))
    if job is None or job.status not in BATCH_JOB_STATUSES or not owned:
        # Cancelled, or the sweeper handed these items to another worker: write nothing.
        session.rollback()
        outcome.clear()
        return
    new = [n for n in new if n[0].id in owned]
    stored = store_images([image for _, image, _ in new], session=session, store=store,
                          collection=collection)
    fresh: list[tuple[uuid.UUID, int]] = []
    for item, image, row in new:
        image_id, duplicate = stored[image.digest]
        if duplicate:
            outcome[item.id] = {"status": "duplicate", "image_id": image_id}
        else:
            outcome[item.id] = {"status": "done", "image_id": image_id}
            fresh.append((image_id, row))
    for item_id, entry in list(outcome.items()):
        if "same_as" in entry:
            # A second copy of a file in the same batch shares the first copy's fate.
            first = outcome.get(entry["same_as"], {"status": "failed", "error": "not processed"})
            outcome[item_id] = ({"status": "duplicate", "image_id": first.get("image_id")}
                                if first["status"] != "failed" else dict(first))
    # One multi-row statement for the vectors; it also marks the new images ready.
    rows = [row for _, row in fresh]
    save_vectors(model, [(image_id, embedded.vectors[row]) for image_id, row in fresh],
                 session=session,
                 logits=embedded.logits[rows] if embedded.logits is not None else None)
    # Binary codes (issue 6) under the code sets that cover the collection, if any.
    encode_images([image_id for image_id, _ in fresh], collection, session=session)
    for key in [k for k in outcome if k not in owned]:
        del outcome[key]
    if outcome:
        # Every item's new state in one UPDATE … FROM (VALUES …), not a round trip per item.
        states = values(column("id", BigInteger), column("status", String),
                        column("error", Text), column("image_id", PG_UUID(as_uuid=True)),
                        name="states").data(
            [(item_id, e["status"], e.get("error"), e.get("image_id"))
             for item_id, e in outcome.items()])
        # A VALUES column of only NULLs is typed text; the casts keep it the column's type.
        session.execute(update(IngestItem).where(IngestItem.id == states.c.id).values(
            status=states.c.status, error=cast(states.c.error, Text),
            image_id=cast(states.c.image_id, PG_UUID(as_uuid=True)),
            claim_token=None, updated_at=func.now()))
    job.progress_at = session.scalar(select(func.now()))
    session.commit()


def _save_derived(new: list[tuple[ClaimedItem, NewImage, int]],
                  outcome: dict[int, dict[str, Any]], *, session: Session, embedder: Embedder,
                  max_pixels: int) -> None:
    """Vectors of enabled hand-crafted and region models (issue 6) of the batch's new images."""
    from service.features.models import save_derived

    # After the batch's commit, outside the job lock: another worker's batch need not wait
    # for these. An image is ready a moment before they exist; a reindex fills any gap.
    pairs = [(outcome[item.id]["image_id"], image.data) for item, image, _ in new
             if outcome.get(item.id, {}).get("status") == "done"]
    if pairs and save_derived(pairs, session=session, embedder=embedder, max_pixels=max_pixels):
        session.commit()


def fail_claim(job_id: uuid.UUID, token: uuid.UUID, reason: str, *,
               session: Session) -> tuple[int, bool]:
    """Fail the items a batch still holds, after an error it could not handle; commits.

    Returns how many it failed and whether the job has pending items left.
    """
    session.rollback()
    job = lock_job(job_id, session=session)
    if job is None or job.status not in BATCH_JOB_STATUSES:
        session.rollback()
        return 0, False
    failed = session.execute(update(IngestItem).where(
        IngestItem.job_id == job_id, IngestItem.status == "running",
        IngestItem.claim_token == token).values(
        status="failed", error=reason[:2000], claim_token=None,
        updated_at=func.now())).rowcount or 0
    if failed:
        job.progress_at = session.scalar(select(func.now()))
    more = bool(session.scalar(select(select(IngestItem.id).where(
        IngestItem.job_id == job_id, IngestItem.status == "pending").exists())))
    session.commit()
    return failed, more


def batch_settings(config: Any) -> BatchSettings:
    """The batch settings from the app's configuration."""
    return BatchSettings(
        storage_dir=str(config["STORAGE_DIR"]), roots=list(config.get("INGEST_ROOTS") or []),
        batch_size=int(config["JOB_BATCH_SIZE"]), max_pixels=int(config["MAX_IMAGE_PIXELS"]),
        max_bytes=int(config["MAX_UPLOAD_BYTES"]))
