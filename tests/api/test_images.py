"""Upload, read, list, patch and delete images through the API with a real worker."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.app import create_app
from service.db import session_scope
from service.embedding.models import ImageEmbedding
from service.images.models import Image
from tests.conftest import wait_for_status

pytestmark = pytest.mark.usefixtures("worker")


def upload(client: FlaskClient, path: Path | bytes, *, collection: str = "default",
           metadata: str | None = None, name: str = "photo.jpg") -> Any:
    data = path.read_bytes() if isinstance(path, Path) else path
    form: dict[str, Any] = {"file": (io.BytesIO(data), name), "collection": collection}
    if metadata is not None:
        form["metadata"] = metadata
    return client.post("/api/v1/images", data=form, content_type="multipart/form-data")


def counts(app: Flask) -> int:
    """Image rows (vector counts would race with the worker finishing earlier uploads)."""
    with app.app_context(), session_scope() as session:
        return session.scalar(select(func.count()).select_from(Image))


def stored_files(app: Flask) -> set[str]:
    root = Path(app.config["STORAGE_DIR"])
    return {p.name for p in root.rglob("*") if p.is_file() and "thumbnails" not in p.parts}


def test_upload_becomes_ready_and_is_found_first(client: FlaskClient, photos: list[Path]) -> None:
    resp = upload(client, photos[0], collection="t-ready", metadata='{"label": "Blazer"}')
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert body["status"] == "pending" and len(body["sha256"]) == 64
    ready = wait_for_status(client, body["id"])
    assert ready["status"] == "ready", ready
    assert ready["width"] > 0 and ready["format"] == "JPEG"
    assert ready["metadata"] == {"label": "Blazer"}

    found = client.post("/api/v1/search", data={
        "file": (io.BytesIO(photos[0].read_bytes()), "q.jpg"),
        "query": '{"k": 5, "collection": "t-ready"}'}, content_type="multipart/form-data")
    assert found.status_code == 200, found.get_json()
    results = found.get_json()["results"]
    assert results[0]["id"] == body["id"]
    assert results[0]["score"] >= 0.99


def test_search_by_image_id_excludes_itself_and_ranks_by_similarity(
        client: FlaskClient, photos: list[Path]) -> None:
    ids = [upload(client, p, collection="t-byid").get_json()["id"] for p in photos[:6]]
    for image_id in ids:
        wait_for_status(client, image_id)
    resp = client.post("/api/v1/search", json={"image_id": ids[0], "k": 10,
                                               "collection": "t-byid"})
    assert resp.status_code == 200, resp.get_json()
    results = resp.get_json()["results"]
    assert [r["id"] for r in results if r["id"] == ids[0]] == []
    assert {r["id"] for r in results} == set(ids[1:])
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


def test_duplicate_upload_returns_existing_and_stores_nothing(
        app: Flask, client: FlaskClient, photos: list[Path]) -> None:
    first = upload(client, photos[1], collection="t-dup")
    assert first.status_code == 202
    before = (counts(app), stored_files(app))
    again = upload(client, photos[1], collection="t-dup")
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["duplicate"] is True
    assert (counts(app), stored_files(app)) == before
    # The same bytes in another collection are a different image sharing one file.
    other = upload(client, photos[1], collection="t-dup-2")
    assert other.status_code == 202
    assert other.get_json()["id"] != first.get_json()["id"]
    assert stored_files(app) == before[1]


def test_delete_removes_row_vectors_and_unshared_file(
        app: Flask, client: FlaskClient, photos: list[Path]) -> None:
    # Unique bytes: a file shared with another collection must stay.
    body = upload(client, photos[2].read_bytes() + b"\0t-del", collection="t-del").get_json()
    wait_for_status(client, body["id"])
    assert body["sha256"] in stored_files(app)
    assert client.delete(f"/api/v1/images/{body['id']}").status_code == 204
    assert client.get(f"/api/v1/images/{body['id']}").status_code == 404
    assert client.get(f"/api/v1/images/{body['id']}/file").status_code == 404
    assert body["sha256"] not in stored_files(app)
    with app.app_context(), session_scope() as session:
        left = session.scalar(select(func.count()).select_from(ImageEmbedding)
                              .where(ImageEmbedding.image_id == uuid.UUID(body["id"])))
    assert left == 0
    assert client.delete(f"/api/v1/images/{body['id']}").status_code == 404


def test_metadata_equality_filter(client: FlaskClient, photos: list[Path]) -> None:
    labels = ["Shirt", "Shoes", "Shirt", "Hat", "Shirt"]
    ids = [upload(client, p, collection="t-filter", metadata=f'{{"label": "{label}"}}')
           .get_json()["id"] for p, label in zip(photos[3:8], labels, strict=True)]
    for image_id in ids:
        wait_for_status(client, image_id)
    resp = client.post("/api/v1/search", json={
        "image_id": ids[1], "k": 10, "collection": "t-filter", "filter": {"label": "Shirt"}})
    assert resp.status_code == 200, resp.get_json()
    got = {r["id"] for r in resp.get_json()["results"]}
    assert got == {ids[0], ids[2], ids[4]}


def test_file_thumbnail_patch_and_list(client: FlaskClient, photos: list[Path]) -> None:
    body = upload(client, photos[8], collection="t-misc").get_json()
    original = client.get(f"/api/v1/images/{body['id']}/file")
    assert original.status_code == 200 and original.data == photos[8].read_bytes()
    thumb = client.get(f"/api/v1/images/{body['id']}/thumbnail")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    from PIL import Image as PILImage

    assert max(PILImage.open(io.BytesIO(thumb.data)).size) <= 256
    patched = client.patch(f"/api/v1/images/{body['id']}", json={"metadata": {"a": 1}})
    assert patched.status_code == 200 and patched.get_json()["metadata"] == {"a": 1}
    bad = client.patch(f"/api/v1/images/{body['id']}", json={"metadata": [1, 2]})
    assert bad.status_code == 400 and bad.get_json()["error"]["code"]

    more = [upload(client, p, collection="t-misc").get_json()["id"] for p in photos[9:12]]
    seen: list[str] = []
    cursor = None
    while True:
        query = "collection=t-misc&limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/api/v1/images?{query}").get_json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen[0] == more[-1]
    assert sorted(seen) == sorted([body["id"], *more]) and len(seen) == len(set(seen))


BAD_INPUTS = {
    "not_an_image": (b"hello, this is text\n" * 10, "notes.jpg"),
    "empty_file": (b"", "empty.jpg"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_uploads_are_refused_and_leave_nothing(app: Flask, client: FlaskClient,
                                                   case: str) -> None:
    data, name = BAD_INPUTS[case]
    before = (counts(app), stored_files(app))
    resp = upload(client, data, collection="t-bad", name=name)
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == case
    assert (counts(app), stored_files(app)) == before


def test_truncated_jpeg_is_refused(app: Flask, client: FlaskClient, photos: list[Path]) -> None:
    data = photos[0].read_bytes()
    before = (counts(app), stored_files(app))
    resp = upload(client, data[: len(data) // 2], collection="t-bad")
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "corrupt_image"
    assert (counts(app), stored_files(app)) == before


def test_oversized_upload_is_413(settings: dict[str, Any], photos: list[Path]) -> None:
    small = create_app(dict(settings, MAX_UPLOAD_BYTES=10_000))
    client = small.test_client()
    before = (counts(small), stored_files(small))
    resp = upload(client, photos[0], collection="t-big")
    assert resp.status_code == 413
    assert resp.get_json()["error"]["code"] == "payload_too_large"
    assert (counts(small), stored_files(small)) == before


@pytest.mark.parametrize("path", ["/api/v1/images/{id}", "/api/v1/images/{id}/file",
                                  "/api/v1/images/{id}/thumbnail"])
def test_unknown_and_malformed_ids_are_404(client: FlaskClient, path: str) -> None:
    for image_id in (str(uuid.uuid4()), "not-a-uuid"):
        resp = client.get(path.format(id=image_id))
        assert resp.status_code == 404
        assert resp.get_json()["error"]["code"] == "not_found"


def test_bad_metadata_and_queries_are_400(client: FlaskClient, photos: list[Path]) -> None:
    for meta in ("not json", "[1, 2]", '"text"'):
        resp = upload(client, photos[0], collection="t-bad", metadata=meta)
        assert resp.status_code == 400, meta
        assert resp.get_json()["error"]["code"] == "invalid_metadata"
    for body in ({"k": 0, "vector": [1.0]}, {"k": 10}, {"image_id": "x", "vector": [1.0]},
                 {"vector": [1.0], "unknown": 1}, {"vector": [1.0], "filter": {"$or": []}}):
        resp = client.post("/api/v1/search", json=body)
        assert 400 <= resp.status_code < 500, body
        assert set(resp.get_json()["error"]) == {"code", "message"}


def test_heic_upload_is_embedded(client: FlaskClient) -> None:
    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.new("RGB", (300, 200), (30, 160, 60)).save(out, "HEIF")
    resp = upload(client, out.getvalue(), collection="t-heic", name="phone.heic")
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["format"] == "HEIF" and resp.get_json()["mime"] == "image/heif"
    assert wait_for_status(client, resp.get_json()["id"])["status"] == "ready"
    thumb = client.get(f"/api/v1/images/{resp.get_json()['id']}/thumbnail")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"


def test_huge_upload_is_refused_before_it_is_read(live_server: str) -> None:
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(live_server)
    declared = 300 * 1024 * 1024  # a 300 MB body is announced; only 64 KB is ever sent
    head = (f"POST /api/v1/images HTTP/1.1\r\nHost: {url.netloc}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {declared}\r\nConnection: close\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=20) as sock:
        sock.sendall(head + b"--x\r\n" + b"\0" * 65536)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert time.monotonic() - started < 10
