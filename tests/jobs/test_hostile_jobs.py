"""Hostile bulk jobs: all-bad batches, masses of non-images, huge manifests, cut archives."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError, ProgrammingError

from service.db import session_scope
from service.jobs.models import IngestItem
from tests.jobs.conftest import all_items, make_archive, submit_archive, wait_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _items(app: Flask, job_id: str) -> tuple[int, int]:
    """How many items the job has and the most claims any of them had."""
    with app.app_context(), session_scope() as session:
        count, attempts = session.execute(select(func.count(), func.max(IngestItem.attempts))
                                          .where(IngestItem.job_id == uuid.UUID(job_id))).one()
    return int(count), int(attempts or 0)


@pytest.mark.usefixtures("jobs_worker")
def test_a_batch_of_only_undecodable_files_fails_at_once_with_their_reasons(
        jobs_app: Flask, jobs_client: FlaskClient) -> None:
    # They start like a JPEG and a PNG, so they reach the worker, and every item fails there:
    # the batch's state update then carries only NULL image ids.
    archive = make_archive([("a.jpg", b"\xff\xd8\xff" + b"not a jpeg" * 50),
                            ("b.png", PNG_SIGNATURE + b"not a png" * 50)])
    created = submit_archive(jobs_client, archive, collection="h-allbad").get_json()
    job = wait_job(jobs_client, created["id"], timeout=60)
    assert (job["status"], job["total"], job["failed"]) == ("failed", 2, 2), job
    items = all_items(jobs_client, created["id"])
    assert [i["attempts"] for i in items] == [1, 1]  # not retried as if transient
    for item in items:
        assert item["error"] and "gave up" not in item["error"] and "internal" not in (
            item["error"]), item
    # The attacker's own archive: not images at all, so no worker ever claims them.
    plain = make_archive([("a.txt", b"hello"), ("b.png", b"not a png either")])
    created = submit_archive(jobs_client, plain, collection="h-allbad").get_json()
    job = wait_job(jobs_client, created["id"], timeout=60)
    assert (job["status"], job["failed"]) == ("failed", 2), job
    assert all("not an image" in i["error"] and i["attempts"] == 0
               for i in all_items(jobs_client, created["id"]))


def test_only_connection_trouble_is_transient() -> None:
    import psycopg

    from workers.tasks import TRANSIENT

    assert not issubclass(ProgrammingError, TRANSIENT)
    assert issubclass(OperationalError, TRANSIENT)
    # Deadlocks and serialization failures reach SQLAlchemy as OperationalError.
    assert issubclass(psycopg.errors.DeadlockDetected, psycopg.OperationalError)
    assert issubclass(psycopg.errors.SerializationFailure, psycopg.OperationalError)


def test_an_unexpected_error_fails_the_batch_claim_at_once(
        idle_app: Flask, photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from service.jobs import pipeline
    from workers.tasks import expand_job, ingest_batch

    client = idle_app.test_client()
    archive = make_archive([(p.name, p.read_bytes() + b"h-internal") for p in photos[:3]])
    job_id = submit_archive(client, archive, collection="h-internal").get_json()["id"]

    def broken(*args: object, **kwargs: object) -> None:
        raise ProgrammingError("UPDATE ingest_items …", {}, Exception("a bug"))

    with idle_app.app_context():
        assert expand_job.run(job_id)["pending"] == 3
        monkeypatch.setattr(pipeline, "_commit_results", broken)
        # The task body as the worker runs it: a programming error is not retried.
        result = ingest_batch.run(job_id, str(uuid.uuid4()))
    assert result["failed"] == 3 and result["finished"] == "failed", result
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert (job["status"], job["failed"], job["running"]) == ("failed", 3, 0), job
    assert {e["error"] for e in job["errors"]} == {"internal error: ProgrammingError"}


@pytest.mark.usefixtures("jobs_worker")
def test_a_hundred_thousand_empty_files_fail_at_expansion_without_workers(
        jobs_app: Flask, jobs_client: FlaskClient) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for i in range(100_000):
            tf.addfile(tarfile.TarInfo(f"e/{i:06d}.jpg"), io.BytesIO(b""))
    resp = submit_archive(jobs_client, out.getvalue(), name="empty.tar.gz", collection="h-empty")
    assert resp.status_code == 202
    job = wait_job(jobs_client, resp.get_json()["id"], timeout=180)
    assert (job["status"], job["total"], job["failed"]) == ("failed", 100_000, 100_000), job
    assert "empty" in job["errors"][0]["error"]
    # Refused at expansion: no worker claimed a single one.
    assert _items(jobs_app, job["id"]) == (100_000, 0)


def test_the_signature_check_refuses_nothing_the_decoder_opens() -> None:
    from PIL import Image

    from service.images.decode import ImageDecodeError, open_image
    from service.jobs.signatures import image_problem

    samples: dict[str, bytes] = {}
    picture = Image.new("RGB", (24, 16), (180, 40, 90))
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"):
        buf = io.BytesIO()
        try:
            picture.save(buf, fmt)
        except (KeyError, OSError):
            continue  # no encoder for it in this build
        samples[fmt] = buf.getvalue()
    buf = io.BytesIO()
    picture.save(buf, "TIFF", compression="tiff_lzw")
    samples["TIFF-LZW"] = buf.getvalue()
    # Big-endian TIFF and BigTIFF headers (the plugins accept both byte orders).
    samples["TIFF-MM"] = b"MM\x00*\x00\x00\x00\x08" + bytes(64)
    samples["BIGTIFF"] = b"II+\x00\x08\x00\x00\x00" + bytes(64)
    samples.update({"svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "pdf": b"%PDF-1.7\n",
                    "text": b"hello", "empty": b"", "zeros": bytes(64)})
    assert {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF"} <= set(samples)
    for name, data in samples.items():
        try:
            open_image(data, max_pixels=10**7)
            opens = True
        except ImageDecodeError:
            opens = False
        if opens:
            assert image_problem(data) is None, name
    for name in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "TIFF-LZW", "HEIF", "TIFF-MM",
                 "BIGTIFF"):
        assert image_problem(samples[name]) is None, name
    for name in ("svg", "pdf", "text", "zeros"):
        assert "not an image" in (image_problem(samples[name]) or ""), name
    assert "empty" in (image_problem(b"") or "")
    if "AVIF" in samples:  # AVIF is not among the allowed formats: refused like the decoder
        assert (image_problem(samples["AVIF"]) is None) == _opens(samples["AVIF"])


def _opens(data: bytes) -> bool:
    from service.images.decode import ImageDecodeError, open_image

    try:
        open_image(data, max_pixels=10**7)
    except ImageDecodeError:
        return False
    return True


def test_a_manifest_of_a_million_bad_items_is_refused_briefly(
        jobs_app: Flask, jobs_client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps({"items": [0] * 1_000_000})
    resp = jobs_client.post("/api/v1/jobs", data=body, content_type="application/json")
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "too_many_files"
    assert len(resp.data) < 1024
    # Under the item cap, each bad item is a validation error: only the first few are told.
    body = json.dumps({"items": [0] * 50_000})
    resp = jobs_client.post("/api/v1/jobs", data=body, content_type="application/json")
    assert resp.status_code == 400 and len(resp.data) < 4096, len(resp.data)
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_request" and "and 49990 more errors" in error["message"]
    monkeypatch.setitem(jobs_app.config, "MANIFEST_MAX_BYTES", 1000)
    resp = jobs_client.post("/api/v1/jobs", data=json.dumps({"items": [{"path": "/x" * 600}]}),
                            content_type="application/json")
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "payload_too_large"


def _cut(kind: str, files: list[tuple[str, bytes]]) -> bytes:
    """The archive cut short: in half, or (`…@8`) right after its 8th entry, end marker lost."""
    if not kind.endswith("@8"):
        data = make_archive(files, kind=kind)
        return data[: len(data) // 2]
    raw = make_archive(files, kind="tar")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        ninth = tf.getmembers()[8].offset
    # Every header and every byte of the first 8 entries is intact: tarfile alone sees 8 files.
    return gzip.compress(raw[:ninth]) if kind.startswith("tar.gz") else raw[:ninth]


@pytest.mark.usefixtures("jobs_worker")
@pytest.mark.parametrize("kind", ["tar.gz", "tar", "zip", "tar.gz@8", "tar@8"])
def test_a_truncated_archive_fails_the_job_as_corrupt(
        jobs_app: Flask, jobs_client: FlaskClient, photos: list[Path], kind: str) -> None:
    files = [(p.name, p.read_bytes() + kind.encode()) for p in photos[:12]]
    resp = submit_archive(jobs_client, _cut(kind, files), name="cut." + kind.split("@")[0],
                          collection="h-cut")
    assert resp.status_code == 202, resp.get_json()
    job = wait_job(jobs_client, resp.get_json()["id"], timeout=60)
    assert (job["status"], job["total"]) == ("failed", 0), job
    assert job["error"]["code"] == "corrupt_archive" and "truncated" in job["error"]["message"]
    assert _items(jobs_app, job["id"]) == (0, 0)
    assert not (Path(jobs_app.config["STORAGE_DIR"]) / "jobs" / job["id"]).exists()


def test_a_batch_that_keeps_killing_its_worker_splits_then_fails_alone(
        idle_app: Flask, photos: list[Path]) -> None:
    """A redelivered message (its worker died) must not claim the same files forever."""
    from service.db import session_scope
    from service.jobs import pipeline
    from workers.tasks import expand_job

    client = idle_app.test_client()
    archive = make_archive([(p.name, p.read_bytes() + b"h-crash") for p in photos[:3]])
    job_id = submit_archive(client, archive, collection="h-crash").get_json()["id"]
    token = uuid.uuid4()
    with idle_app.app_context():
        assert expand_job.run(job_id)["pending"] == 3
        with session_scope() as session:
            first = pipeline.claim(uuid.UUID(job_id), token, session=session, batch_size=8)
            assert len(first) == 3
            # The worker died; the same message comes back: one item stays, two go back.
            again = pipeline.claim(uuid.UUID(job_id), token, session=session, batch_size=8)
            assert [i.id for i in again] == [first[0].id]
            assert pipeline.claim(uuid.UUID(job_id), token, session=session, batch_size=8)
            # Claimed three times, and the worker died each time: it fails with the reason.
            assert pipeline.claim(uuid.UUID(job_id), token, session=session, batch_size=8,
                                  max_attempts=3) == []
    items = {i["id"]: i for i in client.get(f"/api/v1/jobs/{job_id}/items").get_json()["items"]}
    assert items[first[0].id]["status"] == "failed"
    assert "worker stopped 3 times" in items[first[0].id]["error"]
    assert sorted(i["status"] for i in items.values()) == ["failed", "pending", "pending"]


def test_a_copy_of_an_image_deleted_during_the_batch_is_ingested_again(
        idle_app: Flask, photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch looked up the existing copy before its transaction; it was deleted since."""
    from service.db import session_scope
    from service.images import service as images
    from service.jobs import pipeline
    from workers.tasks import expand_job, ingest_batch

    client = idle_app.test_client()
    data = photos[4].read_bytes() + b"h-vanish"
    original = client.post("/api/v1/images", data={
        "file": (io.BytesIO(data), "orig.jpg"), "collection": "h-vanish"},
        content_type="multipart/form-data").get_json()
    archive = make_archive([("copy.jpg", data), ("new.jpg", photos[5].read_bytes() + b"h-v")])
    job_id = submit_archive(client, archive, collection="h-vanish").get_json()["id"]
    real = pipeline._commit_results

    def delete_then_commit(*args: object, **kwargs: object) -> None:
        with session_scope() as session:
            images.delete_image(original["id"], session=session,
                                store=idle_app.extensions["content_store"])
        real(*args, **kwargs)

    with idle_app.app_context():
        assert expand_job.run(job_id)["pending"] == 2
        monkeypatch.setattr(pipeline, "_commit_results", delete_then_commit)
        first = ingest_batch.run(job_id, str(uuid.uuid4()))
        monkeypatch.setattr(pipeline, "_commit_results", real)
        second = ingest_batch.run(job_id, str(uuid.uuid4()))
    assert first["failed"] == 0 and first["done"] == 1, first
    assert second["done"] == 1 and second["finished"] == "done", second
    items = {i["name"]: i for i in client.get(f"/api/v1/jobs/{job_id}/items").get_json()["items"]}
    assert items["copy.jpg"]["status"] == "done" and items["copy.jpg"]["image_id"]
    stored = client.get(f"/api/v1/images/{items['copy.jpg']['image_id']}/file")
    assert stored.status_code == 200 and stored.data == data
