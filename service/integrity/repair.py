"""`repair`: each finding of a check mended the one safe way (the table in `service.py`)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from service.images.service import claim_stale_pending
from service.images.storage import ContentStore
from service.integrity.service import (
    CheckReport,
    fail_missing,
    fail_stranded,
    remove_corrupt,
    remove_orphan,
    requeue_unembedded,
)
from service.jobs.sweeper import enqueue_batches, enqueue_expansion, sweep
from service.queue import EMBED_IMAGE, enqueue_or_sweep


def repair(report: CheckReport, *, session: Session, store: ContentStore, timeout_s: float,
           max_attempts: int, batch_size: int, parallelism: int, storage_dir: str,
           progress: Callable[[str, int, int], None] | None = None) -> dict[str, int]:
    """Mend what the report found; returns how many of each kind were mended."""
    done = {kind: 0 for kind in report.counts()}

    def step(kind: str, mend: Callable[[str, str], bool | int]) -> None:
        found = report.of(kind)
        for n, finding in enumerate(found, 1):
            done[kind] += bool(mend(finding.subject, finding.detail))
            if progress:
                progress(kind, n, len(found))

    step("orphan", lambda digest, _: remove_orphan(digest, session=session, store=store))
    step("corrupt", lambda digest, _: remove_corrupt(digest, session=session, store=store))
    step("missing", lambda image_id, digest: fail_missing(image_id, digest, session=session,
                                                          store=store))
    # Enqueued after their commits, as every producer does; the tasks are idempotent.
    unembedded = [f.subject for f in report.of("unembedded")]
    for image_id in requeue_unembedded(unembedded, session=session):
        done["unembedded"] += enqueue_or_sweep(EMBED_IMAGE, str(image_id))
    if report.of("stale_pending"):
        for image_id in claim_stale_pending(session=session, older_than_s=timeout_s):
            done["stale_pending"] += enqueue_or_sweep(EMBED_IMAGE, str(image_id))
    if report.of("stale_item"):
        swept = sweep(session=session, timeout_s=timeout_s, max_attempts=max_attempts,
                      batch_size=batch_size, parallelism=parallelism, storage_dir=storage_dir)
        for job_id, count in swept.enqueue.items():
            enqueue_batches(job_id, count)
        for job_id in swept.expand:
            enqueue_expansion(job_id)
        done["stale_item"] = swept.reset + swept.gave_up
    stranded = [f.subject for f in report.of("stranded_item")]
    if stranded:
        done["stranded_item"] = fail_stranded(stranded, session=session)
    return done
