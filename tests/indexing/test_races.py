"""An image deleted while its single-upload task indexes it: a clean outcome, never an error."""

from __future__ import annotations

import io
import threading
import uuid
from pathlib import Path

import pytest
from flask import Flask

from service.db import session_scope
from service.images import service as images
from service.indexing import service as indexing


def test_a_delete_during_indexing_waits_for_the_commit(
        idle_app: Flask, photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    client = idle_app.test_client()
    body = client.post("/api/v1/images", data={
        "file": (io.BytesIO(photos[6].read_bytes() + b"ix-race"), "r.jpg"),
        "collection": f"ix-race-{uuid.uuid4().hex[:6]}"},
        content_type="multipart/form-data").get_json()
    real = indexing.index_embedded
    deleted = threading.Event()

    def delete_meanwhile(*args: object, **kwargs: object) -> None:
        def delete() -> None:
            with idle_app.app_context(), session_scope() as session:
                images.delete_image(body["id"], session=session,
                                    store=idle_app.extensions["content_store"])
            deleted.set()

        threading.Thread(target=delete).start()
        deleted.wait(1.5)  # at once, unless the task holds the row
        real(*args, **kwargs)

    monkeypatch.setattr(indexing, "index_embedded", delete_meanwhile)
    with idle_app.app_context(), session_scope() as session:
        status = indexing.embed_image(
            uuid.UUID(body["id"]), session=session, store=idle_app.extensions["content_store"],
            model_dir=idle_app.config["MODEL_DIR"], model_name="efficientnet-lite0",
            max_pixels=int(idle_app.config["MAX_IMAGE_PIXELS"]))
    assert status == "ready"
    assert deleted.wait(30), "the delete never ran"
    assert client.get(f"/api/v1/images/{body['id']}").status_code == 404


def test_an_upload_that_keeps_killing_its_worker_fails_with_the_reason(
        idle_app: Flask, photos: list[Path]) -> None:
    """Each redelivery counts; past JOB_MAX_ATTEMPTS starts the image fails, not loops."""
    from sqlalchemy import update

    from service.images.models import Image
    from workers.tasks import embed_image

    client = idle_app.test_client()
    body = client.post("/api/v1/images", data={
        "file": (io.BytesIO(photos[7].read_bytes() + b"ix-loop"), "l.jpg"),
        "collection": f"ix-loop-{uuid.uuid4().hex[:6]}"},
        content_type="multipart/form-data").get_json()
    with idle_app.app_context(), session_scope() as session:
        # Three starts that died with their worker (the count is committed before the model).
        session.execute(update(Image).where(Image.id == uuid.UUID(body["id"]))
                        .values(attempts=int(idle_app.config["JOB_MAX_ATTEMPTS"])))
    with idle_app.app_context():
        assert embed_image.run(body["id"]) == "failed"
    after = client.get(f"/api/v1/images/{body['id']}").get_json()
    assert after["status"] == "failed" and "worker stopped" in after["error"]
