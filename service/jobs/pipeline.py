"""Processing one batch of a job's items: claim, read, dedup, decode+embed once, write in bulk.

Over 300 lines: claiming, deduplicating and committing a batch form one state machine whose
steps share the claim's ownership checks; split, each half would re-derive them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, String, Text, cast, column, func, select, update, values
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import Session

from service.embedding.service import ensure_model_row
from service.embedding.session import Embedder, Embeddings
from service.features.models import DerivedVectors, compute_derived, enabled_names
from service.images.models import Image
from service.images.service import NewImage, remove_if_unreferenced, store_images
from service.images.storage import ContentStore
from service.indexing.service import EmbeddedImage, index_embedded
from service.jobs.models import BATCH_JOB_STATUSES, IngestItem, IngestJob
from service.jobs.reading import (
    BatchSettings,
    ClaimedItem,
    embed_valid,
    header,
    read_item,
    read_reason,
)
from service.jobs.states import finish_if_complete, lock_job

log = logging.getLogger(__name__)
# Items claimed this many times already are retried one at a time, so a file that kills the
# worker cannot take a whole batch down with it again.
ALONE_AFTER_ATTEMPTS = 2
FILE_WRITERS = 4


@dataclass
class BatchResult:
    """What one batch did, and whether the job has more pending items."""

    claimed: int = 0
    done: int = 0
    duplicates: int = 0
    failed: int = 0
    more: bool = False
    finished: str | None = None
    collection: str | None = None  # the job's, for what follows a finished job
    outcome: dict[int, dict[str, Any]] = field(default_factory=dict)


def claim(job_id: uuid.UUID, token: uuid.UUID, *, session: Session, batch_size: int,
          max_attempts: int = 3) -> list[ClaimedItem]:
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
    items = _settle_repeated_claims(sorted(items, key=lambda i: i.id),
                                    max_attempts=max_attempts, session=session)
    claimed = [ClaimedItem(i.id, i.name, i.source, dict(i.meta)) for i in items]
    if job.status == "queued":
        job.status = "running"
        job.started_at = session.scalar(select(func.now()))
    session.commit()
    return claimed


def _settle_repeated_claims(items: list[IngestItem], *, max_attempts: int,
                            session: Session) -> list[IngestItem]:
    """Items claimed again and again (a file that kills the worker) go alone, then fail.

    A message redelivered after its worker died claims the same items: past
    ALONE_AFTER_ATTEMPTS all but one go back to pending (each is then claimed alone), and an
    item claimed more than `max_attempts` times fails with the reason instead of looping.
    """
    spent = [i for i in items if i.attempts > max_attempts]
    if spent:
        session.execute(update(IngestItem).where(IngestItem.id.in_([i.id for i in spent]))
                        .values(status="failed", claim_token=None, updated_at=func.now(),
                                error=f"the worker stopped {max_attempts} times while "
                                      "processing this file (too large, or malformed?)"))
    items = [i for i in items if i.attempts <= max_attempts]
    if len(items) > 1 and items[0].attempts >= ALONE_AFTER_ATTEMPTS:
        # Released unprocessed: this claim does not count against them.
        session.execute(update(IngestItem).where(IngestItem.id.in_([i.id for i in items[1:]]))
                        .values(status="pending", claim_token=None, updated_at=func.now(),
                                attempts=IngestItem.attempts - 1))
        items = items[:1]
    return items


def process_batch(job_id: uuid.UUID, token: uuid.UUID, *, session: Session, store: ContentStore,
                  embedder: Embedder, settings: BatchSettings) -> BatchResult:
    """Claim and process one batch of a job; idempotent under redelivery and retries."""
    result = BatchResult()
    items = claim(job_id, token, session=session, batch_size=settings.batch_size,
                  max_attempts=settings.max_attempts)
    result.claimed = len(items)
    collection = session.scalar(select(IngestJob.collection).where(IngestJob.id == job_id))
    result.collection = collection
    if not items:
        result.finished = finish_if_complete(job_id, session=session,
                                             storage_dir=settings.storage_dir)
        return result
    outcome: dict[int, dict[str, Any]] = {}
    readable: list[tuple[ClaimedItem, bytes, str]] = []
    for item in items:
        try:
            data = read_item(item, settings)
        except (OSError, ValueError) as exc:
            outcome[item.id] = {"status": "failed", "error": read_reason(exc)}
            continue
        readable.append((item, data, hashlib.sha256(data).hexdigest()))
    # Exact duplicates are not decoded or embedded at all.
    digests = {d for _, _, d in readable}
    existing = dict(session.execute(select(Image.sha256, Image.id).where(
        Image.collection == collection, Image.sha256.in_(digests))).all()) if digests else {}
    derived_models = enabled_names(embedder.info.name, session=session)
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
            fmt, width, height = header(data)
        except Exception as exc:  # noqa: BLE001 (decoded by the embedder, but be safe)
            outcome[item.id] = {"status": "failed", "error": f"unreadable header: {exc}"}
            continue
        new.append((item, NewImage(data=data, digest=digest, filename=item.name, format=fmt,
                                   width=width, height=height, metadata=item.meta), row))
    # The derived models' decodes and crops run here, before the job's lock is taken; only
    # their rows are written under it, with the images that they belong to.
    derived = compute_derived(derived_models, {image.digest: image.data for _, image, _ in new},
                              embedder=embedder, max_pixels=settings.max_pixels)
    try:
        _commit_results(job_id, token, items, new, embedded, outcome, session=session,
                        store=store, embedder=embedder, collection=collection, derived=derived)
    except BaseException:
        # The files written above belong to rows that will never commit: an object is kept
        # only while a row references it, whatever failed (and a retry writes them again).
        session.rollback()
        for i, (_, _, digest) in enumerate(to_embed):
            if created.get(digest) and i not in errors:
                remove_if_unreferenced(digest, session=session, store=store)
        raise
    for entry in outcome.values():
        key = {"done": "done", "duplicate": "duplicates", "failed": "failed"}.get(entry["status"])
        if key is not None:
            setattr(result, key, getattr(result, key) + 1)
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
                    embedder: Embedder, collection: str, derived: DerivedVectors) -> None:
    """Images, all that indexes them and item states in one transaction, for owned items."""
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
    _requeue_vanished_duplicates(outcome, session=session)
    stored = store_images([image for _, image, _ in new], session=session, store=store,
                          collection=collection)
    fresh: list[EmbeddedImage] = []
    for item, image, row in new:
        image_id, duplicate = stored[image.digest]
        if duplicate:
            outcome[item.id] = {"status": "duplicate", "image_id": image_id}
        else:
            outcome[item.id] = {"status": "done", "image_id": image_id}
            logits = None if embedded.logits is None else embedded.logits[row]
            fresh.append(EmbeddedImage(image_id, image.digest, embedded.vectors[row], logits))
    for item_id, entry in list(outcome.items()):
        if "same_as" in entry:
            # A second copy of a file in the same batch shares the first copy's fate.
            first = outcome.get(entry["same_as"], {"status": "failed", "error": "not processed"})
            outcome[item_id] = ({"status": "duplicate", "image_id": first.get("image_id")}
                                if first["status"] != "failed" else dict(first))
    # Multi-row statements: vectors, labels, derived vectors, codes; the images turn ready.
    index_embedded(model, fresh, session=session, collection=collection, derived=derived)
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


def _requeue_vanished_duplicates(outcome: dict[int, dict[str, Any]], *,
                                 session: Session) -> None:
    """Copies of images deleted since the batch looked them up go back to pending.

    The lookup ran before this transaction; the rows that still exist are locked against
    deletion (FOR KEY SHARE) until the commit, and the items of the others are processed
    again by a later batch, as new files.
    """
    copies = {e["image_id"] for e in outcome.values()
              if e["status"] == "duplicate" and e.get("image_id") is not None}
    if not copies:
        return
    alive = set(session.scalars(select(Image.id).where(Image.id.in_(copies))
                                .with_for_update(key_share=True),
                                execution_options={"all_collections": True}))
    for entry in outcome.values():
        if entry["status"] == "duplicate" and entry.get("image_id") in copies - alive:
            entry.clear()
            entry["status"] = "pending"


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


def done_image_ids(job_id: uuid.UUID, *, session: Session) -> list[uuid.UUID]:
    """The images a job created (its done items'), for linking them into the kNN graph."""
    return list(session.scalars(select(IngestItem.image_id).where(
        IngestItem.job_id == job_id, IngestItem.status == "done",
        IngestItem.image_id.is_not(None))))


def batch_settings(config: Any) -> BatchSettings:
    """The batch settings from the app's configuration."""
    return BatchSettings(
        storage_dir=str(config["STORAGE_DIR"]), roots=list(config.get("INGEST_ROOTS") or []),
        batch_size=int(config["JOB_BATCH_SIZE"]), max_pixels=int(config["MAX_IMAGE_PIXELS"]),
        max_bytes=int(config["MAX_UPLOAD_BYTES"]), max_attempts=int(config["JOB_MAX_ATTEMPTS"]))
