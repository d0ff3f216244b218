"""`check`: stored files, image rows, vectors and job items against each other; `repair`.

What is looked for, and what a repair does (only what cannot lose anything a user still has):

| kind | what | repair |
|---|---|---|
| orphan | bytes in the store that no image row names | removed under their content lock |
| missing | an image, not failed, whose original is gone | failed, `original_missing` |
| corrupt | stored bytes whose sha256 is not their name | removed; their images failed |
| unembedded | a ready image without a ready vector of the default model | pending, embed sent |
| stale_pending | an image pending past the job timeout (its message was lost) | embed sent |
| stale_item | an item running past the timeout; pending items of a stalled job | a sweep |
| stranded_item | an item pending or running in a job that has ended | failed with the reason |

Images created after the check began are left out of `missing`: their bytes may have landed
after the store was listed.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session

from service.embedding.models import ImageEmbedding
from service.embedding.service import find_model
from service.images.models import Image
from service.images.service import lock_content, mark_failed, remove_if_unreferenced
from service.images.storage import ContentMissing, ContentStore
from service.jobs.models import ACTIVE_JOB_STATUSES, IngestItem, IngestJob

ALL = {"all_collections": True}
CHUNK = 1000
KINDS = ("orphan", "missing", "corrupt", "unembedded", "stale_pending", "stale_item",
         "stranded_item")


@dataclass(frozen=True)
class Finding:
    """One thing wrong: its kind, what it is about (a digest, an image or item id), details."""

    kind: str
    subject: str
    detail: str = ""


@dataclass
class CheckReport:
    """What a check looked at and what it found."""

    objects: int = 0
    hashed: int = 0
    images: int = 0
    findings: list[Finding] = field(default_factory=list)
    repaired: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Findings per kind, every kind named."""
        return {kind: sum(1 for f in self.findings if f.kind == kind) for kind in KINDS}

    def of(self, kind: str) -> list[Finding]:
        """The findings of one kind."""
        return [f for f in self.findings if f.kind == kind]


def _sha256(store: ContentStore, digest: str) -> str | None:
    """The sha256 of stored bytes, or None when they went meanwhile."""
    try:
        opened = store.open(digest)
    except ContentMissing:
        return None
    sha = hashlib.sha256()
    with closing(opened.stream):
        while chunk := opened.stream.read(1024 * 1024):
            sha.update(chunk)
    return sha.hexdigest()


def _chunks(items: Iterator[str]) -> Iterator[list[str]]:
    while chunk := list(islice(items, CHUNK)):
        yield chunk


def check_store(report: CheckReport, *, session: Session, store: ContentStore,
                verify_bytes: bool) -> set[str]:
    """Orphans and corrupt objects; returns every listed digest."""
    listed: set[str] = set()
    for chunk in _chunks(store.digests()):
        listed.update(chunk)
        report.objects += len(chunk)
        referenced = set(session.scalars(select(Image.sha256).where(Image.sha256.in_(chunk)),
                                         execution_options=ALL))
        session.rollback()
        for digest in chunk:
            if digest not in referenced:
                report.findings.append(Finding("orphan", digest))
            elif verify_bytes:
                got = _sha256(store, digest)
                report.hashed += got is not None
                if got is not None and got != digest:
                    report.findings.append(Finding("corrupt", digest, f"sha256 is {got}"))
    return listed


def check_rows(report: CheckReport, listed: set[str], *, session: Session, model_name: str,
               started: Any, timeout_s: float) -> None:
    """Missing originals, unembedded and stale images, stale and stranded job items."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, timeout_s)
    last: uuid.UUID | None = None
    while True:
        query = (select(Image.id, Image.sha256, Image.status).where(Image.created_at < started)
                 .order_by(Image.id).limit(CHUNK))
        rows = session.execute(query.where(Image.id > last) if last else query,
                               execution_options=ALL).all()
        if not rows:
            break
        last = rows[-1].id
        report.images += len(rows)
        report.findings += [Finding("missing", str(r.id), r.sha256) for r in rows
                            if r.status != "failed" and r.sha256 not in listed]
    model = find_model(model_name, session=session)
    if model is not None:
        vector = exists().where(ImageEmbedding.image_id == Image.id,
                                ImageEmbedding.model_id == model.id,
                                ImageEmbedding.status == "ready")
        report.findings += [Finding("unembedded", str(i), model_name) for i in session.scalars(
            select(Image.id).where(Image.status == "ready", ~vector), execution_options=ALL)]
    report.findings += [Finding("stale_pending", str(i)) for i in session.scalars(
        select(Image.id).where(Image.status == "pending", Image.updated_at < cutoff),
        execution_options=ALL)]
    active = IngestJob.status.in_(ACTIVE_JOB_STATUSES)
    items = select(IngestItem.id, IngestItem.job_id, IngestItem.status).join(IngestJob)
    report.findings += [Finding("stale_item", str(r.id), f"job {r.job_id}") for r in
                        session.execute(items.where(active, IngestItem.status == "running",
                                                    IngestItem.claimed_at < cutoff))]
    report.findings += [Finding("stale_item", str(r.id), f"job {r.job_id}, stalled") for r in
                        session.execute(items.where(active, IngestItem.status == "pending",
                                                    IngestJob.progress_at < cutoff))]
    report.findings += [Finding("stranded_item", str(r.id), f"job {r.job_id} ended")
                        for r in session.execute(items.where(
                            ~active, IngestItem.status.in_(("pending", "running"))))]
    session.rollback()


def check(*, session: Session, store: ContentStore, model_name: str, timeout_s: float,
          verify_bytes: bool = True) -> CheckReport:
    """Look for every kind of disagreement (see the module's table); writes nothing."""
    report = CheckReport()
    started = session.scalar(select(func.now()))
    session.rollback()
    listed = check_store(report, session=session, store=store, verify_bytes=verify_bytes)
    check_rows(report, listed, session=session, model_name=model_name, started=started,
               timeout_s=timeout_s)
    return report


def remove_corrupt(digest: str, *, session: Session, store: ContentStore) -> bool:
    """Under the content lock, if the bytes are still wrong: delete them, fail their images."""
    lock_content([digest], session=session)
    got = _sha256(store, digest)
    if got is None or got == digest:
        session.rollback()
        return False
    store.delete(digest)
    session.execute(
        update(Image).where(Image.sha256 == digest).values(
            status="failed", error="original_corrupt: the stored bytes no longer matched "
                                   "their sha256 and were removed; upload the file again"),
        execution_options=ALL)
    session.commit()
    return True


def fail_missing(image_id: str, digest: str, *, session: Session, store: ContentStore) -> bool:
    """Fail an image whose original is still missing, under the content lock."""
    lock_content([digest], session=session)
    if store.exists(digest):
        session.rollback()
        return False
    mark_failed(uuid.UUID(image_id), "original_missing: the stored original is gone; upload "
                "the file again", session=session)
    return True


def requeue_unembedded(image_ids: list[str], *, session: Session) -> list[uuid.UUID]:
    """Ready images without their vector back to pending; the ids to send for embedding."""
    ids = [uuid.UUID(i) for i in image_ids]
    moved = list(session.scalars(update(Image).where(Image.id.in_(ids), Image.status == "ready")
                                 .values(status="pending", attempts=0).returning(Image.id),
                                 execution_options=ALL))
    session.commit()
    return moved


def fail_stranded(item_ids: list[str], *, session: Session) -> int:
    """Items left pending or running in a job that has ended: failed with the reason."""
    done = session.execute(update(IngestItem).where(
        IngestItem.id.in_([int(i) for i in item_ids]),
        IngestItem.status.in_(("pending", "running")),
        exists().where(and_(IngestJob.id == IngestItem.job_id,
                            IngestJob.status.not_in(ACTIVE_JOB_STATUSES)))).values(
        status="failed", claim_token=None,
        error="its job ended before it was processed")).rowcount or 0
    session.commit()
    return int(done)


def remove_orphan(digest: str, *, session: Session, store: ContentStore) -> bool:
    """Remove an orphan unless a row names it by now."""
    return remove_if_unreferenced(digest, session=session, store=store)

