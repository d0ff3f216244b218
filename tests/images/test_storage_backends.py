"""Originals in object storage: S3 over real HTTP (moto's server), and local disk alike.

An upload lands in the bucket, the real worker embeds it from there, search finds it, /file
and /thumbnail serve it, a delete removes its objects; a request that fails after the bytes
were put leaves no object behind.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from flask import Flask
from PIL import Image as PILImage
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from service.app import create_app
from service.config import load_settings
from service.db import session_scope
from service.embedding.session import get_embedder
from service.images import service as images
from service.images.orphans import orphaned_digests, remove_orphans
from service.images.s3 import S3ContentStore
from service.images.storage import ContentTooLarge, LocalContentStore, open_store
from service.jobs import expansion, pipeline
from tests.conftest import wait_for_status
from tests.images.conftest import BUCKET, PREFIX, Backend, bucket_keys, s3_client
from tests.jobs.conftest import make_archive, submit_archive


def random_png(seed: int, side: int = 32) -> bytes:
    """A PNG whose bytes no other test uploads."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _post(app: Flask, data: bytes, collection: str, name: str = "x.jpg") -> Any:
    return app.test_client().post("/api/v1/images", data={
        "file": (io.BytesIO(data), name), "collection": collection},
        content_type="multipart/form-data")


@pytest.fixture
def rejecting(app: Flask) -> Iterator[str]:
    """A collection whose rows a real CHECK constraint refuses: the insert fails, as a DB
    error would, after the bytes were already put."""
    collection = f"refused-{uuid.uuid4().hex[:8]}"
    name = f"lookalike_test_refuse_{collection[8:]}"
    with app.app_context(), session_scope() as session:
        session.execute(text(f"ALTER TABLE images ADD CONSTRAINT {name} "
                             f"CHECK (collection <> '{collection}') NOT VALID"))
        session.commit()
    try:
        yield collection
    finally:
        with app.app_context(), session_scope() as session:
            session.execute(text(f"ALTER TABLE images DROP CONSTRAINT {name}"))
            session.commit()


def test_an_upload_lives_in_the_bucket_from_upload_to_delete(
        s3_app: Flask, s3_settings: dict[str, Any], s3_worker: subprocess.Popen[bytes],
        photos: list[Path]) -> None:
    endpoint = s3_settings["STORAGE_S3_ENDPOINT_URL"]
    client = s3_app.test_client()
    data = photos[3].read_bytes() + b"s3-roundtrip"  # bytes of this test's own
    collection = f"s3-{uuid.uuid4().hex[:6]}"
    resp = _post(s3_app, data, collection, "blazer.jpg")
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    digest = body["sha256"]
    key = f"{PREFIX}/{digest[:2]}/{digest[2:4]}/{digest}"
    assert key in bucket_keys(endpoint)
    stored = s3_client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert stored == data
    # Nothing on local disk: the worker can only have read the bytes from the bucket.
    assert not LocalContentStore(s3_settings["STORAGE_DIR"]).exists(digest)
    ready = wait_for_status(client, body["id"])
    assert ready["status"] == "ready", ready
    found = client.post("/api/v1/search", data={
        "file": (io.BytesIO(data), "q.jpg"), "query": f'{{"k": 3, "collection": "{collection}"}}'},
        content_type="multipart/form-data")
    assert found.status_code == 200, found.get_json()
    assert found.get_json()["results"][0]["id"] == body["id"]

    got = client.get(f"/api/v1/images/{body['id']}/file")
    assert got.status_code == 200 and got.data == data
    assert got.headers["Content-Length"] == str(len(data))
    assert got.mimetype == "image/jpeg"
    thumb = client.get(f"/api/v1/images/{body['id']}/thumbnail")
    assert thumb.status_code == 200 and thumb.data[:2] == b"\xff\xd8"
    thumb_key = f"{PREFIX}/thumbnails/{digest[:2]}/{digest}.jpg"
    assert thumb_key in bucket_keys(endpoint)
    assert client.get(f"/api/v1/images/{body['id']}/thumbnail").data == thumb.data

    assert client.delete(f"/api/v1/images/{body['id']}").status_code == 204
    left = bucket_keys(endpoint)
    assert key not in left and thumb_key not in left


def test_the_file_is_streamed_by_gunicorn_from_the_bucket(s3_live_server: str) -> None:
    data = random_png(uuid.uuid4().int % 2**32, side=400)
    up = requests.post(f"{s3_live_server}/api/v1/images", files={"file": ("big.png", data)},
                       data={"collection": f"s3-stream-{uuid.uuid4().hex[:6]}"}, timeout=30)
    assert up.status_code == 202, up.text
    with requests.get(f"{s3_live_server}/api/v1/images/{up.json()['id']}/file", stream=True,
                      timeout=30) as got:
        assert got.status_code == 200
        assert got.headers["Content-Length"] == str(len(data))
        chunks = list(got.iter_content(64 * 1024))
    assert b"".join(chunks) == data


def test_an_upload_whose_insert_fails_leaves_no_object(backend: Backend, rejecting: str) -> None:
    data = random_png(uuid.uuid4().int % 2**32)
    digest = hashlib.sha256(data).hexdigest()
    resp = _post(backend.app, data, rejecting, "refused.png")
    assert resp.status_code == 500, resp.get_json()
    assert resp.get_json()["error"]["code"] == "internal_error"
    assert not backend.has_original(digest), f"{backend.name}: an orphan object was left"


def test_a_batch_whose_commit_fails_leaves_no_object(backend: Backend, rejecting: str,
                                                     settings: dict[str, Any]) -> None:
    # A queue no worker consumes: the batch runs here, and its commit meets the constraint.
    idle = create_app({**backend.settings, "JOB_BATCH_SIZE": 8,
                       "CELERY": {"task_default_queue": f"idle-{uuid.uuid4().hex[:6]}"}})
    seed = uuid.uuid4().int % 2**32
    files = [(f"{i}.png", random_png(seed + i)) for i in range(3)]
    digests = [hashlib.sha256(d).hexdigest() for _, d in files]
    resp = submit_archive(idle.test_client(), make_archive(files), collection=rejecting)
    assert resp.status_code == 202, resp.get_json()
    job_id = uuid.UUID(resp.get_json()["id"])
    with idle.app_context(), session_scope() as session:
        expanded = expansion.expand_job(job_id, session=session,
                                        settings=expansion.expand_settings(idle.config))
        assert expanded.pending == 3
        embedder = get_embedder(settings["MODEL_DIR"], settings["DEFAULT_MODEL"])
        with pytest.raises(IntegrityError):
            pipeline.process_batch(job_id, uuid.uuid4(), session=session,
                                   store=idle.extensions["content_store"], embedder=embedder,
                                   settings=pipeline.batch_settings(idle.config))
    left = [d for d in digests if backend.has_original(d)]
    assert left == [], f"{backend.name}: {len(left)} of 3 originals left without a row"


def test_an_oversized_object_under_a_digest_is_refused_not_loaded(backend: Backend) -> None:
    data = random_png(uuid.uuid4().int % 2**32)
    with backend.app.app_context(), session_scope() as session:
        image = images.store_image(data, session=session, store=backend.store,
                                   collection=f"big-{uuid.uuid4().hex[:6]}", metadata={},
                                   filename="x.png", max_pixels=10**7).image
    small = open_store({**backend.settings, "STORAGE_MAX_OBJECT_BYTES": len(data) - 1})
    with pytest.raises(ContentTooLarge):
        small.get(image.sha256)
    assert small.size(image.sha256) == len(data)  # streaming for /file is not bounded


def test_digests_lists_originals_only(backend: Backend) -> None:
    data = random_png(uuid.uuid4().int % 2**32)
    with backend.app.app_context(), session_scope() as session:
        image = images.store_image(data, session=session, store=backend.store,
                                   collection=f"list-{uuid.uuid4().hex[:6]}", metadata={},
                                   filename="x.png", max_pixels=10**7).image
        images.thumbnail(image, session=session, store=backend.store, max_pixels=10**7)
    listed = set(backend.store.digests())
    assert image.sha256 in listed
    assert all(len(d) == 64 for d in listed)


@pytest.mark.parametrize("digest", ["../" * 5 + "etc/passwd", "A" * 64, "ab/cd", "", "0" * 63])
def test_keys_are_only_hex_digests(backend: Backend, digest: str) -> None:
    for call in (backend.store.get, backend.store.exists, backend.store.delete,
                 backend.store.open, backend.store.get_thumbnail):
        with pytest.raises(ValueError):
            call(digest)
    with pytest.raises(ValueError):
        backend.store.put(digest, b"x")


@pytest.mark.parametrize("url", ["s3://", "s3://Bad_Bucket/x", "s3://bucket/../x", "ftp://x",
                                 "s3://bucket/a b", "/plain/path"])
def test_a_malformed_storage_url_is_refused_at_start(settings: dict[str, Any], url: str) -> None:
    with pytest.raises(ValueError):
        open_store(load_settings({**settings, "STORAGE_URL": url}))


def test_the_s3_prefix_keeps_the_local_layout() -> None:
    store = S3ContentStore("bucket", "/a/b/", endpoint_url="http://127.0.0.1:1")
    digest = "ab" + "c" * 62
    assert store.key(digest) == f"a/b/ab/cc/{digest}"
    assert store.thumbnail_key(digest) == f"a/b/thumbnails/ab/{digest}.jpg"


def test_orphans_are_found_and_removed_and_referenced_bytes_kept(backend: Backend) -> None:
    orphan = random_png(uuid.uuid4().int % 2**32)
    kept = random_png(uuid.uuid4().int % 2**32)
    orphan_digest = hashlib.sha256(orphan).hexdigest()
    with backend.app.app_context(), session_scope() as session:
        image = images.store_image(kept, session=session, store=backend.store,
                                   collection=f"orph-{uuid.uuid4().hex[:6]}", metadata={},
                                   filename="x.png", max_pixels=10**7).image
        kept_digest = image.sha256
        backend.store.put(orphan_digest, orphan)  # as a process killed before its commit
        found = set(orphaned_digests(session=session, store=backend.store))
        assert orphan_digest in found and kept_digest not in found
        assert remove_orphans(session=session, store=backend.store) >= 1
    assert not backend.has_original(orphan_digest)
    assert backend.has_original(kept_digest)


def test_a_missing_bucket_is_503_and_writes_no_row(s3_settings: dict[str, Any]) -> None:
    app = create_app({**s3_settings, "STORAGE_URL": "s3://no-such-bucket-here/x"})
    collection = f"nobucket-{uuid.uuid4().hex[:6]}"
    resp = _post(app, random_png(uuid.uuid4().int % 2**32), collection, "x.png")
    assert resp.status_code == 503, resp.get_json()
    assert resp.get_json()["error"]["code"] == "storage_unavailable"
    listed = app.test_client().get("/api/v1/images", query_string={"collection": collection})
    assert listed.get_json()["items"] == []
