"""Hostile archives: traversal, absolute names, links, devices, bombs and non-archives."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.jobs.metadata import parse_metadata, typed_value
from tests.jobs.conftest import all_items, assert_consistent, submit_archive, wait_job


def test_csv_cells_are_typed() -> None:
    assert [typed_value(v) for v in ("12", "-3", "4.5", "1e3", "TRUE", "false", "007",
                                     "2024-05-01", "2024-05-01T10:00:00Z", "nan", "Blazer")] == [
        12, -3, 4.5, 1000.0, True, False, "007", "2024-05-01", "2024-05-01T10:00:00Z",
        "nan", "Blazer"]
    rows = parse_metadata(b"file,a,b\n./x/y.jpg,1,\n", "metadata.csv")
    assert rows == {"x/y.jpg": {"a": 1}}
    assert parse_metadata(b'{"file": "z.jpg", "n": [1, 2]}\n', None) == {"z.jpg": {"n": [1, 2]}}


def _zip_with_link(entries: list[tuple[str, bytes]], link: str, target: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
        info = zipfile.ZipInfo(link)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return out.getvalue()


def _files_named(root: Path, names: set[str]) -> list[Path]:
    return [p for p in root.rglob("*") if p.name in names]


@pytest.mark.usefixtures("jobs_worker")
def test_traversal_absolute_and_link_entries_are_skipped_with_reasons(
        jobs_app: Flask, jobs_client: FlaskClient, photos: list[Path]) -> None:
    jpeg = photos[0].read_bytes()
    storage = Path(jobs_app.config["STORAGE_DIR"])
    hostile = ["../evil-up.jpg", "a/../../evil-deep.jpg", "/tmp/evil-abs.jpg",
               "..\\evil-win.jpg", "C:/evil-drive.jpg"]
    archive = _zip_with_link([(photos[1].name, photos[1].read_bytes())]
                             + [(n, jpeg) for n in hostile], "evil-link.jpg", "/etc/passwd")
    created = submit_archive(jobs_client, archive, collection="j-hostile").get_json()
    job = wait_job(jobs_client, created["id"])
    assert (job["total"], job["done"], job["failed"]) == (7, 1, 6), job
    failed = {i["name"]: i["error"] for i in all_items(jobs_client, created["id"], "failed")}
    assert "traversal" in failed["../evil-up.jpg"]
    assert "traversal" in failed["a/../../evil-deep.jpg"]
    assert "absolute" in failed["/tmp/evil-abs.jpg"]
    assert "links" in failed["evil-link.jpg"]
    assert_consistent(jobs_app, created["id"], "j-hostile")

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        for name, kind in (("sym.jpg", tarfile.SYMTYPE), ("hard.jpg", tarfile.LNKTYPE),
                           ("dev", tarfile.CHRTYPE), ("fifo", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tf.addfile(info)
        info = tarfile.TarInfo("../../evil-tar.jpg")
        info.size = len(jpeg)
        tf.addfile(info, io.BytesIO(jpeg))
    created = submit_archive(jobs_client, tar.getvalue(), name="x.tar",
                             collection="j-hostile").get_json()
    job = wait_job(jobs_client, created["id"])
    # Nothing to process at all: the job fails at once, every entry with its reason.
    assert (job["status"], job["total"], job["failed"]) == ("failed", 5, 5), job
    reasons = {i["name"]: i["error"] for i in all_items(jobs_client, created["id"])}
    assert "links" in reasons["sym.jpg"] and "links" in reasons["hard.jpg"]
    assert "regular" in reasons["dev"] and "regular" in reasons["fifo"]
    assert "traversal" in reasons["../../evil-tar.jpg"]
    # Nothing landed outside the storage directory, nor anywhere under a hostile name.
    evil = {"evil-up.jpg", "evil-deep.jpg", "evil-abs.jpg", "evil-win.jpg", "evil-drive.jpg",
            "evil-link.jpg", "evil-tar.jpg", "sym.jpg", "hard.jpg"}
    assert _files_named(storage.parent, evil) == []
    assert not Path("/tmp/evil-abs.jpg").exists()


def _zeros_zip(size: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("bomb.jpg", "w") as fh:
        chunk = bytes(1024 * 1024)
        for _ in range(size // len(chunk)):
            fh.write(chunk)
    return out.getvalue()


def _zeros_tar_gz(size: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        info = tarfile.TarInfo("bomb.jpg")
        info.size = size
        tf.addfile(info, io.BytesIO(bytes(size)))
    return out.getvalue()


def test_bombs_non_archives_and_oversized_archives_are_refused(
        jobs_app: Flask, jobs_client: FlaskClient, idle_app: Flask, photos: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Path(jobs_app.config["STORAGE_DIR"])
    before = set((storage / "jobs").glob("*")) if (storage / "jobs").exists() else set()
    # Accepted at once; the worker's expansion refuses them and ends the job with the reason.
    refused = []
    for data, name, code in ((_zeros_zip(24 * 1024 * 1024), "bomb.zip", "zip_bomb"),
                             (_zeros_tar_gz(24 * 1024 * 1024), "bomb.tar.gz", "zip_bomb"),
                             (photos[0].read_bytes(), "x.zip", "not_an_archive"),
                             (b"plain text, not an archive", "x.zip", "not_an_archive"),
                             (b"", "x.zip", "not_an_archive")):
        resp = submit_archive(jobs_client, data, name=name, collection="j-bomb")
        assert resp.status_code == 202, resp.get_json()
        refused.append((resp.get_json()["id"], code))
    for job_id, code in refused:
        job = wait_job(jobs_client, job_id)
        assert (job["status"], job["total"]) == ("failed", 0), job
        assert job["error"]["code"] == code and job["error"]["message"], job
    from tests.jobs.conftest import make_archive

    # Limits, with the expansion task's body run here (no worker listens to idle_app's queue).
    from workers.tasks import expand_job

    small = make_archive([(f"{i}.jpg", p.read_bytes()) for i, p in enumerate(photos[:4])])
    idle = idle_app.test_client()
    for key, value in (("ARCHIVE_MAX_ENTRIES", 3), ("ARCHIVE_MAX_TOTAL_BYTES", 1000)):
        monkeypatch.setitem(idle_app.config, key, value)
        job_id = submit_archive(idle, small, collection="j-bomb").get_json()["id"]
        with idle_app.app_context():
            assert expand_job.run(job_id)["status"] == "failed"
        assert idle.get(f"/api/v1/jobs/{job_id}").get_json()["error"]["code"] == (
            "archive_too_large")
        monkeypatch.undo()
    monkeypatch.setitem(jobs_app.config, "MAX_ARCHIVE_BYTES", 1000)
    resp = submit_archive(jobs_client, small, collection="j-bomb")
    assert resp.status_code == 413
    # Refused uploads leave no job folder behind, and the 413 no job either.
    after = set((storage / "jobs").glob("*")) if (storage / "jobs").exists() else set()
    assert after == before
    listed = jobs_client.get("/api/v1/jobs", query_string={"collection": "j-bomb"}).get_json()
    assert len(listed["items"]) == len(refused) + 2
    assert {j["status"] for j in listed["items"]} == {"failed"}
