"""Archive expansion in a worker task: a fast POST, re-runs after a crash, cancel, the sweeper."""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

from flask import Flask
from sqlalchemy import select, update

from service.db import session_scope
from service.jobs.expansion import remove_stray_dirs
from service.jobs.models import IngestItem, IngestJob
from service.jobs.paths import job_dir
from service.jobs.sweeper import sweep
from tests.jobs.conftest import make_archive, submit_archive


def _job(app: Flask, job_id: str) -> IngestJob:
    with app.app_context(), session_scope() as session:
        job = session.get(IngestJob, uuid.UUID(job_id))
        assert job is not None
        session.expunge(job)
        return job


def _item_sources(app: Flask, job_id: str) -> list[str | None]:
    with app.app_context(), session_scope() as session:
        return list(session.scalars(select(IngestItem.source).where(
            IngestItem.job_id == uuid.UUID(job_id)).order_by(IngestItem.id)))


def test_the_post_only_saves_the_upload_and_a_rerun_after_a_crash_starts_clean(
        idle_app: Flask, photos: list[Path]) -> None:
    from workers.tasks import expand_job

    client = idle_app.test_client()
    archive = make_archive([(p.name, p.read_bytes()) for p in photos[:5]]
                           + [("notes.txt", b"not an image")], kind="tar")
    resp = submit_archive(client, archive, name="a.tar", collection="x-rerun")
    assert resp.status_code == 202
    assert resp.get_json()["status"] == "expanding" and resp.get_json()["total"] == 0
    job_id = resp.get_json()["id"]
    folder = job_dir(idle_app.config["STORAGE_DIR"], uuid.UUID(job_id))
    # Nothing was extracted in the request: only the saved upload is there.
    assert sorted(p.name for p in folder.iterdir()) == ["upload"]
    assert (folder / "upload").read_bytes() == archive
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert (body["status"], body["eta_s"], body["error"]) == ("expanding", None, None)
    # What a worker killed mid-expansion leaves: half the files, an attempt counted.
    (folder / "files").mkdir()
    for name in ("00000001", "00000002", "stray"):
        (folder / "files" / name).write_bytes(b"partial")
    with idle_app.app_context(), session_scope() as session:
        session.execute(update(IngestJob).where(IngestJob.id == uuid.UUID(job_id))
                        .values(attempts=1))
    with idle_app.app_context():
        assert expand_job.run(job_id) == {"status": "queued", "pending": 5}
        # Idempotent: a redelivered message finds the job expanded and changes nothing.
        assert expand_job.run(job_id)["status"] == "skipped"
    job = _job(idle_app, job_id)
    assert (job.status, job.total, job.attempts) == ("queued", 6, 2)
    sources = _item_sources(idle_app, job_id)
    assert len(sources) == 6 and sources.count(None) == 1
    extracted = sorted(p.name for p in (folder / "files").iterdir())
    assert extracted == sorted(Path(s).name for s in sources if s) and "stray" not in extracted
    assert all(Path(s).read_bytes() != b"partial" for s in sources if s)
    assert not (folder / "upload").exists()
    client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert not folder.exists()


def test_a_job_cancelled_while_expanding_records_nothing_and_keeps_no_files(
        idle_app: Flask, photos: list[Path]) -> None:
    from workers.tasks import expand_job

    client = idle_app.test_client()
    job_id = submit_archive(client, make_archive([(photos[0].name, photos[0].read_bytes())]),
                            collection="x-cancel").get_json()["id"]
    cancelled = client.post(f"/api/v1/jobs/{job_id}/cancel").get_json()
    assert cancelled["status"] == "cancelled"
    with idle_app.app_context():
        assert expand_job.run(job_id)["status"] == "skipped"
    assert _item_sources(idle_app, job_id) == []
    assert not job_dir(idle_app.config["STORAGE_DIR"], uuid.UUID(job_id)).exists()


def test_the_sweeper_resends_a_lost_expansion_then_gives_up_on_one_that_keeps_dying(
        idle_app: Flask, photos: list[Path]) -> None:
    client = idle_app.test_client()
    job_id = submit_archive(client, make_archive([(photos[1].name, photos[1].read_bytes())]),
                            collection="x-sweep").get_json()["id"]
    config = idle_app.config

    def run_sweep(attempts: int) -> list[uuid.UUID]:
        with idle_app.app_context(), session_scope() as session:
            session.execute(update(IngestJob).where(IngestJob.id == uuid.UUID(job_id)).values(
                attempts=attempts, progress_at=IngestJob.progress_at - timedelta(hours=1)))
            session.commit()
            report = sweep(session=session, timeout_s=60, max_attempts=3, batch_size=8,
                           parallelism=2, storage_dir=config["STORAGE_DIR"])
        return report.expand

    # No worker holds its lock: its message was lost, or its worker died.
    assert run_sweep(attempts=1) == [uuid.UUID(job_id)]
    assert _job(idle_app, job_id).status == "expanding"
    assert run_sweep(attempts=3) == []
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["status"] == "failed" and body["error"]["code"] == "expansion_abandoned"
    assert not job_dir(config["STORAGE_DIR"], uuid.UUID(job_id)).exists()


def test_folders_no_open_job_owns_are_removed_once_old(idle_app: Flask, photos: list[Path]) -> None:
    client = idle_app.test_client()
    storage = idle_app.config["STORAGE_DIR"]
    job_id = submit_archive(client, make_archive([(photos[2].name, photos[2].read_bytes())]),
                            collection="x-stray").get_json()["id"]
    # An upload cut off mid-request: a folder and a part, no job row.
    orphan = job_dir(storage, uuid.uuid4())
    (orphan / "parts").mkdir(parents=True)
    (orphan / "parts" / "0001").write_bytes(b"half an upload")
    fresh = job_dir(storage, uuid.uuid4())
    fresh.mkdir()
    old = time.time() - 3600
    owned = job_dir(storage, uuid.UUID(job_id))
    for path in (orphan / "parts" / "0001", orphan / "parts", orphan, owned / "upload", owned):
        os.utime(path, (old, old))
    with idle_app.app_context(), session_scope() as session:
        assert remove_stray_dirs(storage, session=session, older_than_s=600) == 1
    assert not orphan.exists() and fresh.exists()
    assert owned.exists()  # its job is still expanding
    fresh.rmdir()
    client.post(f"/api/v1/jobs/{job_id}/cancel")
