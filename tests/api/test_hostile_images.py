"""Hostile images through the real API, worker and bulk pipeline: size lies, memory, EXIF."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image as PILImage
from sqlalchemy import select

from service.app import create_app
from service.db import session_scope
from service.images.models import Image
from tests.api.test_images import counts, stored_files, upload
from tests.conftest import wait_for_status
from tests.embedding.test_transforms import encode, hostile, lying_jpeg

pytestmark = pytest.mark.usefixtures("worker")


def rotated_jpeg(orientation: int = 6) -> bytes:
    """A 600x300 JPEG (red left half) whose EXIF says to turn it a quarter."""
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    img = PILImage.new("RGB", (600, 300), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 300, 300))
    return encode(img, "JPEG", exif=exif.tobytes())


def test_jpeg_claiming_8000x8000_from_a_few_bytes_is_refused(app: Flask,
                                                            client: FlaskClient) -> None:
    before = (counts(app), stored_files(app))
    resp = upload(client, lying_jpeg(), collection="t-hostile")
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["code"] == "truncated_image"
    assert (counts(app), stored_files(app)) == before


def test_upload_beyond_the_decoded_bytes_limit_is_refused(settings: dict[str, Any]) -> None:
    small = create_app(dict(settings, MAX_DECODED_BYTES=3_000_000))
    data, _ = hostile("RGBA", 1000)  # 4 MB of RGBA pixels from a few KB
    before = (counts(small), stored_files(small))
    resp = upload(small.test_client(), data, collection="t-hostile", name="wide.png")
    assert resp.status_code == 400, resp.get_json()
    body = resp.get_json()["error"]
    assert body["code"] == "image_too_large" and "3000000" in body["message"]
    assert (counts(small), stored_files(small)) == before


@pytest.mark.parametrize("orientation", [6, 8])
def test_rotated_photo_reports_its_size_after_orientation(client: FlaskClient,
                                                          orientation: int) -> None:
    resp = upload(client, rotated_jpeg(orientation), collection="t-hostile")
    assert resp.status_code == 202, resp.get_json()
    assert (resp.get_json()["width"], resp.get_json()["height"]) == (300, 600)
    body = wait_for_status(client, resp.get_json()["id"])
    assert body["status"] == "ready" and (body["width"], body["height"]) == (300, 600)
    thumb = client.get(f"/api/v1/images/{body['id']}/thumbnail")
    assert PILImage.open(io.BytesIO(thumb.data)).size == (128, 256)


def test_bulk_items_report_their_size_after_orientation() -> None:
    from service.jobs.reading import header as _header

    assert _header(rotated_jpeg(6)) == ("JPEG", 300, 600)
    assert _header(rotated_jpeg(8)) == ("JPEG", 300, 600)


def test_bulk_batch_fails_the_lying_jpeg_alone(settings: dict[str, Any]) -> None:
    from service.embedding.session import get_embedder
    from service.jobs.reading import embed_valid

    embedder = get_embedder(settings["MODEL_DIR"], settings["DEFAULT_MODEL"])
    embedded, errors = embed_valid(embedder, [rotated_jpeg(), lying_jpeg()],
                                   max_pixels=64_000_000)
    assert embedded.vectors.shape[0] == 1
    assert list(errors) == [1] and "truncated" in errors[1]


def test_worker_fails_a_stored_lying_jpeg_with_the_reason(app: Flask,
                                                          client: FlaskClient) -> None:
    # Stored as an older service version would have stored it, then embedded by the worker.
    from service.images.service import NewImage, store_images
    from service.queue import EMBED_IMAGE, enqueue

    data = lying_jpeg(6000)
    digest = hashlib.sha256(data).hexdigest()
    with app.app_context(), session_scope() as session:
        stored = store_images([NewImage(data=data, digest=digest, filename="lie.jpg",
                                        format="JPEG", width=6000, height=6000, metadata={})],
                              session=session, store=app.extensions["content_store"],
                              collection="t-hostile")
        session.commit()
        image_id = str(stored[digest][0])
    with app.app_context():
        enqueue(EMBED_IMAGE, image_id)
    body = wait_for_status(client, image_id)
    assert body["status"] == "failed"
    with app.app_context(), session_scope() as session:
        error = session.scalar(select(Image.error).where(Image.id == stored[digest][0]))
    assert "truncated" in (error or "")
