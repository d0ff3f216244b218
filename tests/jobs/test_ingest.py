"""Bulk ingestion through the jobs API with a real worker: archives, server paths, manifests."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.jobs.conftest import (
    all_items,
    assert_consistent,
    make_archive,
    submit_archive,
    wait_job,
)

pytestmark = pytest.mark.usefixtures("jobs_worker")


def labels_for(clothing: Path, files: list[Path]) -> dict[str, dict[str, str]]:
    import csv

    with (clothing / "labels.csv").open() as fh:
        rows = {r["file"]: r for r in csv.DictReader(fh)}
    return {p.name: rows[f"images/{p.name}"] for p in files}


def test_archive_with_metadata_csv_is_ingested_with_typed_values(
        jobs_app: Flask, jobs_client: FlaskClient, clothing: Path) -> None:
    files = sorted((clothing / "images").glob("*.jpg"))[100:120]
    labels = labels_for(clothing, files)
    csv_text = "file,label,sender_id,kids,price,taken\n" + "".join(
        f"images/{p.name},{labels[p.name]['label']},{labels[p.name]['sender_id']},"
        f"{labels[p.name]['kids']},{i}.5,2024-05-0{i % 9 + 1}\n" for i, p in enumerate(files))
    archive = make_archive([(f"images/{p.name}", p.read_bytes()) for p in files]
                           + [("metadata.csv", csv_text.encode())])
    resp = submit_archive(jobs_client, archive, collection="j-archive")
    assert resp.status_code == 202, resp.get_json()
    created = resp.get_json()
    # Answered before the archive is read: a worker expands it.
    assert created["total"] == 0 and created["status"] == "expanding"
    job = wait_job(jobs_client, created["id"])
    assert job["status"] == "done", job
    assert (job["total"], job["done"], job["failed"], job["duplicates"]) == (20, 20, 0, 0)
    assert job["rate"] > 0 and job["finished_at"] and job["started_at"]
    counts = assert_consistent(jobs_app, created["id"], "j-archive")
    assert counts == {"done": 20}

    items = all_items(jobs_client, created["id"])
    assert len(items) == 20 and [i["name"] for i in items] == [
        f"images/{p.name}" for p in files]
    first = items[0]
    meta = first["metadata"]
    assert meta["label"] == labels[files[0].name]["label"]
    assert meta["sender_id"] == int(labels[files[0].name]["sender_id"])
    assert meta["kids"] is (labels[files[0].name]["kids"] == "true")
    assert meta["price"] == 0.5 and meta["taken"] == "2024-05-01"
    image = jobs_client.get(f"/api/v1/images/{first['image_id']}").get_json()
    assert image["status"] == "ready" and image["metadata"] == meta
    assert image["filename"] == files[0].name
    # Bulk-ingested images join the kNN graph: it is rebuilt once the job is done.
    deadline = time.monotonic() + 30
    while True:
        related = jobs_client.get(f"/api/v1/images/{first['image_id']}/related")
        assert related.status_code == 200, related.get_json()
        if related.get_json()["items"]:
            break
        assert time.monotonic() < deadline, "the job's images never joined the graph"
        time.sleep(0.3)

    found = jobs_client.post("/api/v1/search", data={
        "file": (io.BytesIO(files[3].read_bytes()), "q.jpg"),
        "query": '{"k": 1, "collection": "j-archive"}'}, content_type="multipart/form-data")
    assert found.get_json()["results"][0]["id"] == items[3]["image_id"]
    # The extracted copies are gone once the job is finished.
    storage = Path(jobs_app.config["STORAGE_DIR"])
    assert not (storage / "jobs" / created["id"]).exists()
    listed = jobs_client.get("/api/v1/jobs", query_string={"collection": "j-archive"})
    assert [j["id"] for j in listed.get_json()["items"]] == [created["id"]]


def test_resubmitting_the_same_archive_creates_no_new_images(
        jobs_app: Flask, jobs_client: FlaskClient, photos: list[Path]) -> None:
    # The same photo twice inside one archive counts once as well.
    entries = [(p.name, p.read_bytes()) for p in photos[:8]] + [
        ("copy.jpg", photos[0].read_bytes())]
    archive = make_archive(entries, kind="tar.gz")
    first = submit_archive(jobs_client, archive, name="a.tar.gz", collection="j-dup").get_json()
    done = wait_job(jobs_client, first["id"])
    assert (done["done"], done["duplicates"], done["failed"]) == (8, 1, 0), done
    again = submit_archive(jobs_client, archive, name="a.tar.gz", collection="j-dup").get_json()
    repeat = wait_job(jobs_client, again["id"])
    assert (repeat["status"], repeat["done"], repeat["duplicates"]) == ("done", 0, 9), repeat
    assert_consistent(jobs_app, again["id"], "j-dup")
    images = jobs_client.get("/api/v1/images", query_string={"collection": "j-dup"}).get_json()
    assert len(images["items"]) == 8
    first_ids = {i["name"]: i["image_id"] for i in all_items(jobs_client, first["id"])}
    again_ids = {i["name"]: i["image_id"] for i in all_items(jobs_client, again["id"])}
    assert first_ids == again_ids


def test_bad_items_fail_alone_with_reasons(
        jobs_app: Flask, jobs_client: FlaskClient, photos: list[Path]) -> None:
    good = [(f"ok/{p.name}", p.read_bytes()) for p in photos[:10]]
    bad = [("notes.txt", b"not an image"), ("truncated.jpg", photos[10].read_bytes()[:3000]),
           ("empty.png", b""), ("fake.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>")]
    archive = make_archive(good[:5] + bad + good[5:], kind="tar")
    created = submit_archive(jobs_client, archive, name="mixed.tar",
                             collection="j-bad").get_json()
    job = wait_job(jobs_client, created["id"])
    assert job["status"] == "done"
    assert (job["total"], job["done"], job["failed"]) == (14, 10, 4), job
    failed = {i["name"]: i["error"] for i in all_items(jobs_client, created["id"], "failed")}
    assert set(failed) == {"notes.txt", "truncated.jpg", "empty.png", "fake.svg"}
    assert all(failed.values())
    assert "empty" in failed["empty.png"]
    assert {e["name"] for e in job["errors"]} == set(failed)
    assert assert_consistent(jobs_app, created["id"], "j-bad") == {"done": 10, "failed": 4}


def test_server_directory_is_ingested_and_paths_outside_the_roots_are_refused(
        jobs_app: Flask, jobs_client: FlaskClient, photos: list[Path], ingest_root: Path,
        tmp_path: Path) -> None:
    folder = ingest_root / "shop"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(photos[:6]):
        (folder / ("sub" if i % 2 else ".") / p.name).write_bytes(p.read_bytes())
    (folder / "metadata.jsonl").write_text(
        f'{{"file": "{photos[0].name}", "label": "Blazer", "tags": ["a", "b"]}}\n')
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(photos[7].read_bytes())
    (folder / "link.jpg").symlink_to(outside / "x.jpg")

    resp = jobs_client.post("/api/v1/jobs", json={"source": {"path": str(folder)},
                                                  "collection": "j-path"})
    assert resp.status_code == 202, resp.get_json()
    job = wait_job(jobs_client, resp.get_json()["id"])
    assert (job["total"], job["done"], job["failed"]) == (7, 6, 1), job
    items = {i["name"]: i for i in all_items(jobs_client, job["id"])}
    assert items[photos[0].name]["metadata"] == {"label": "Blazer", "tags": ["a", "b"]}
    assert items["link.jpg"]["status"] == "failed" and "link" in items["link.jpg"]["error"]
    assert f"sub/{photos[1].name}" in items
    assert_consistent(jobs_app, job["id"], "j-path")

    for path in (str(outside), str(ingest_root / ".." / outside.name), "relative/dir",
                 str(folder / "link.jpg")):
        refused = jobs_client.post("/api/v1/jobs", json={"source": {"path": path}})
        assert refused.status_code == 400, (path, refused.get_json())
        assert refused.get_json()["error"]["code"] in ("path_not_allowed", "not_a_directory")
    (ingest_root / "escape").symlink_to(outside)
    refused = jobs_client.post("/api/v1/jobs", json={"source": {"path": str(
        ingest_root / "escape")}})
    assert refused.get_json()["error"]["code"] == "path_not_allowed"


def test_manifest_of_server_files_with_metadata(
        jobs_app: Flask, jobs_client: FlaskClient, photos: list[Path], ingest_root: Path,
        tmp_path: Path) -> None:
    folder = ingest_root / "manifest"
    folder.mkdir()
    paths = []
    for p in photos[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
        paths.append(str(folder / p.name))
    body = {"collection": "j-manifest", "items": [
        {"path": path, "metadata": {"n": i, "ok": True}} for i, path in enumerate(paths)]
        + [{"path": str(folder / "missing.jpg")}]}
    resp = jobs_client.post("/api/v1/jobs", json=body)
    assert resp.status_code == 202, resp.get_json()
    job = wait_job(jobs_client, resp.get_json()["id"])
    assert (job["total"], job["done"], job["failed"]) == (5, 4, 1), job
    items = all_items(jobs_client, job["id"])
    assert [i["metadata"] for i in items[:4]] == [{"n": i, "ok": True} for i in range(4)]
    assert_consistent(jobs_app, job["id"], "j-manifest")
    outside = tmp_path / "o.jpg"
    outside.write_bytes(photos[0].read_bytes())
    refused = jobs_client.post("/api/v1/jobs", json={"items": [{"path": str(outside)}]})
    assert refused.status_code == 400
    assert refused.get_json()["error"]["code"] == "path_not_allowed"




def test_job_images_are_linked_one_by_one_in_large_collections(
        jobs_app: Flask, jobs_client: FlaskClient, clothing: Path) -> None:
    from sqlalchemy import delete

    from service.db import session_scope
    from service.graph.models import GraphEdge
    from workers.tasks import link_job_images

    files = sorted((clothing / "images").glob("*.jpg"))[200:206]
    resp = submit_archive(jobs_client, make_archive([(p.name, p.read_bytes()) for p in files]),
                          collection="j-link")
    job = wait_job(jobs_client, resp.get_json()["id"])
    assert job["status"] == "done" and job["done"] == 6
    items = all_items(jobs_client, job["id"])
    ids = [item["image_id"] for item in items]
    with jobs_app.app_context():
        with session_scope() as session:  # as if the collection were too big to rebuild
            session.execute(delete(GraphEdge).where(GraphEdge.source_id.in_(ids)))
        # The task body, run here in-process on the real database.
        assert link_job_images.run(job["id"]) == 6
    related = jobs_client.get(f"/api/v1/images/{ids[0]}/related").get_json()["items"]
    assert {r["id"] for r in related} <= set(ids) and related
