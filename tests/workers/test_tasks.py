"""The embed_image task in a real worker: idempotent, and failing with a reason when it must."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.db import session_scope
from service.embedding.models import ImageEmbedding
from service.queue import EMBED_IMAGE, enqueue
from tests.conftest import wait_for_status

pytestmark = pytest.mark.usefixtures("worker")


def _upload(client: FlaskClient, path: Path, collection: str) -> str:
    resp = client.post("/api/v1/images", data={"file": (io.BytesIO(path.read_bytes()), "x.jpg"),
                                               "collection": collection},
                       content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def _vectors_of(app: Flask, image_id: str) -> int:
    with app.app_context(), session_scope() as session:
        return session.scalar(select(func.count()).select_from(ImageEmbedding)
                              .where(ImageEmbedding.image_id == uuid.UUID(image_id)))


def test_rerunning_the_task_neither_duplicates_nor_corrupts(
        app: Flask, client: FlaskClient, photos: list[Path]) -> None:
    image_id = _upload(client, photos[0], "t-idem")
    assert wait_for_status(client, image_id)["status"] == "ready"
    search = {"image_id": image_id, "k": 1}
    with app.app_context():
        for _ in range(3):
            enqueue(EMBED_IMAGE, image_id)
    # A later task proves the queue drained past the re-runs.
    marker = _upload(client, photos[1], "t-idem")
    wait_for_status(client, marker)
    assert _vectors_of(app, image_id) == 1
    assert client.get(f"/api/v1/images/{image_id}").get_json()["status"] == "ready"
    assert client.post("/api/v1/search", json=search).status_code == 200


def test_undecodable_stored_file_marks_image_failed_with_reason(
        app: Flask, client: FlaskClient, photos: list[Path], tmp_path: Path) -> None:
    # Bytes of this test's own (a trailer after the JPEG's end): the store is content-addressed
    # and shared by the session, so corrupting a shared photo's file would break later tests.
    own = tmp_path / "own.jpg"
    own.write_bytes(photos[2].read_bytes() + b"t-fail")
    data = own.read_bytes()
    store = app.extensions["content_store"]
    image_id = _upload(client, own, "t-fail")
    # The upload's own task must be done first: finishing after the reset below, it would
    # leave the image ready and the second task would find nothing to do.
    wait_for_status(client, image_id)
    import hashlib

    store.path(hashlib.sha256(data).hexdigest()).write_bytes(data[:200])
    with app.app_context(), session_scope() as session:
        session.execute(ImageEmbedding.__table__.delete().where(
            ImageEmbedding.image_id == uuid.UUID(image_id)))
        from service.images.models import Image

        session.get(Image, uuid.UUID(image_id)).status = "pending"
    with app.app_context():
        enqueue(EMBED_IMAGE, image_id)
    body = wait_for_status(client, image_id, want=("failed",))
    assert body["status"] == "failed"
    assert "decoded" in body["error"] or "not an image" in body["error"]
    assert _vectors_of(app, image_id) == 0


def test_task_for_deleted_image_is_a_no_op(app: Flask, client: FlaskClient,
                                           photos: list[Path]) -> None:
    image_id = str(uuid.uuid4())
    with app.app_context():
        enqueue(EMBED_IMAGE, image_id)
    marker = _upload(client, photos[3], "t-gone")
    assert wait_for_status(client, marker)["status"] == "ready"


def test_sweeper_requeues_uploads_whose_message_was_lost(app: Flask, client: FlaskClient,
                                                         photos: list[Path]) -> None:
    from sqlalchemy import update

    from service.images.models import Image
    from service.images.service import claim_stale_pending

    data = photos[4].read_bytes() + b"lost-message"
    # An upload stored while the broker was unreachable: the row exists, no message does.
    with app.app_context(), session_scope() as session:
        from service.images.service import store_image

        stored = store_image(data, session=session, store=app.extensions["content_store"],
                             collection="t-lost", metadata={}, filename="x.jpg",
                             max_pixels=10**8)
        image_id = stored.image.id
        session.execute(update(Image).where(Image.id == image_id).values(
            updated_at=Image.updated_at - __import__("datetime").timedelta(hours=1)))
        session.commit()
    with app.app_context():
        enqueue("lookalike.sweep_jobs")  # what beat sends every JOB_SWEEP_INTERVAL
    assert wait_for_status(client, str(image_id))["status"] == "ready"
    with app.app_context(), session_scope() as session:
        # Claimed once: the sweep touched it, so it is not sent again right away.
        assert claim_stale_pending(session=session, older_than_s=600) == []
