"""A delete racing an upload of the same bytes never removes content that a row references."""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from typing import Any

import numpy as np
import pytest
import requests
from flask import Flask
from PIL import Image as PILImage

from service.db import session_scope
from service.errors import NotFound
from service.images import service as images
from service.images.models import Image
from service.images.storage import ContentStore, open_store
from tests.images.conftest import Backend

TRIES = 40


def random_png(seed: int) -> bytes:
    """A small PNG whose bytes no other test uploads."""
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _store(settings: dict[str, Any]) -> ContentStore:
    return open_store(settings)


def test_delete_waits_for_an_uncommitted_row_of_the_same_bytes(backend: Backend) -> None:
    """A batch insert not yet committed holds the content: the delete keeps the file."""
    app, store = backend.app, backend.store
    data = random_png(uuid.uuid4().int % 2**32)
    with app.app_context():
        with session_scope() as session:
            first = images.store_image(data, session=session, store=store,
                                       collection=f"raceA-{uuid.uuid4().hex[:6]}", metadata={},
                                       filename="x.png", max_pixels=10**7).image
        digest = first.sha256
        new = images.NewImage(data=data, digest=digest, filename="x.png", format="PNG",
                              width=24, height=24, metadata={})
        sm = app.extensions["db_sessionmaker"]
        in_flight = sm()
        deleted = threading.Event()

        def delete() -> None:
            with app.app_context(), session_scope() as session:
                images.delete_image(first.id, session=session, store=store)
            deleted.set()

        try:
            images.store_images([new], session=in_flight, store=store,
                                collection=f"raceB-{uuid.uuid4().hex[:6]}")
            worker = threading.Thread(target=delete)
            worker.start()
            # The delete must wait for the in-flight transaction instead of deciding now.
            assert not deleted.wait(1.5), "the delete did not wait for the in-flight row"
            in_flight.commit()
            worker.join(30)
            assert deleted.is_set()
        finally:
            in_flight.close()
        assert store.exists(digest), "the original of a committed row was removed"


def race_once(base: str, image_id: str, data: bytes, collection: str
              ) -> dict[str, requests.Response]:
    """DELETE one image and upload its bytes to another collection at the same moment."""
    barrier = threading.Barrier(2)
    answers: dict[str, requests.Response] = {}

    def delete() -> None:
        barrier.wait()
        answers["delete"] = requests.delete(f"{base}/api/v1/images/{image_id}", timeout=30)

    def upload() -> None:
        barrier.wait()
        answers["upload"] = requests.post(f"{base}/api/v1/images",
                                          files={"file": ("same.png", data)},
                                          data={"collection": collection}, timeout=30)

    threads = [threading.Thread(target=delete), threading.Thread(target=upload)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def test_delete_racing_an_upload_to_another_collection_over_http(backend: Backend) -> None:
    """The attacker's race, repeated: every accepted upload keeps its original."""
    live_server, store = backend.live_server(), backend.store
    run = uuid.uuid4().hex[:6]
    lost: list[int] = []
    for attempt in range(TRIES):
        data = random_png(hash((run, attempt)) % 2**32)
        first = requests.post(f"{live_server}/api/v1/images",
                              files={"file": (f"{attempt}.png", data)},
                              data={"collection": f"raceA-{run}"}, timeout=30)
        assert first.status_code == 202, first.text
        answers = race_once(live_server, first.json()["id"], data, f"raceB-{run}")
        assert answers["delete"].status_code == 204
        assert answers["upload"].status_code == 202, answers["upload"].text
        if not store.exists(answers["upload"].json()["sha256"]):
            lost.append(attempt)
            continue
        got = requests.get(f"{live_server}/api/v1/images/{answers['upload'].json()['id']}/file",
                           timeout=30)
        assert got.status_code == 200 and got.content == data
    assert lost == [], f"{len(lost)} of {TRIES} uploads lost their original"


def test_a_row_whose_original_is_gone_is_failed_not_a_lasting_503(backend: Backend) -> None:
    """Bytes removed behind the service's back: the image is marked failed with the reason."""
    data = random_png(uuid.uuid4().int % 2**32)
    client = backend.app.test_client()
    body = client.post("/api/v1/images", data={
        "file": (io.BytesIO(data), "gone.png"), "collection": f"gone-{uuid.uuid4().hex[:6]}"},
        content_type="multipart/form-data").get_json()
    assert backend.has_original(body["sha256"])
    backend.remove_behind_the_back(body["sha256"])
    for route in ("file", "thumbnail"):
        got = client.get(f"/api/v1/images/{body['id']}/{route}")
        assert got.status_code == 410, (route, got.status_code, got.get_data(as_text=True))
        assert got.get_json()["error"]["code"] == "original_missing"
    after = client.get(f"/api/v1/images/{body['id']}").get_json()
    assert after["status"] == "failed"
    assert "missing" in after["error"]


def _stored(app: Flask, settings: dict[str, Any], collection: str) -> Image:
    with app.app_context(), session_scope() as session:
        return images.store_image(random_png(uuid.uuid4().int % 2**32), session=session,
                                  store=_store(settings), collection=collection, metadata={},
                                  filename="x.png", max_pixels=10**7).image


def _delete_meanwhile(app: Flask, settings: dict[str, Any], image_id: uuid.UUID) -> None:
    """Delete the image from another session while the caller is between read and write."""
    def delete() -> None:
        with app.app_context(), session_scope() as session, contextlib.suppress(NotFound):
            images.delete_image(image_id, session=session, store=_store(settings))

    worker = threading.Thread(target=delete)
    worker.start()
    worker.join(1.5)  # done at once unless the caller's lock holds it back


def test_a_patch_racing_a_delete_is_a_404_or_a_200(app: Flask, settings: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    image = _stored(app, settings, f"patch-{uuid.uuid4().hex[:6]}")
    real = images.validate_metadata  # the name replace_metadata calls

    def validate_while_deleted(meta: Any, *, max_bytes: int) -> dict[str, Any]:
        _delete_meanwhile(app, settings, image.id)
        return real(meta, max_bytes=max_bytes)

    monkeypatch.setattr(images, "validate_metadata", validate_while_deleted)
    with app.app_context(), session_scope() as session:
        try:
            patched = images.replace_metadata(image.id, {"a": 1}, session=session,
                                              max_bytes=65536)
            assert patched.meta == {"a": 1}
        except NotFound:
            pass


def test_a_thumbnail_made_while_its_image_is_deleted_is_not_left_behind(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    app, settings, store = backend.app, backend.settings, backend.store
    image = _stored(app, settings, f"thumb-{uuid.uuid4().hex[:6]}")
    real = images.to_rgb

    def convert_while_deleted(img: PILImage.Image) -> PILImage.Image:
        _delete_meanwhile(app, settings, image.id)
        return real(img)

    monkeypatch.setattr(images, "to_rgb", convert_while_deleted)
    with app.app_context(), session_scope() as session:
        data = images.thumbnail(image, session=session, store=store, max_pixels=10**7)
    assert data[:2] == b"\xff\xd8"
    assert not store.exists(image.sha256)
    assert not backend.has_thumbnail(image.sha256), "a deleted image left a thumbnail"
    assert store.get_thumbnail(image.sha256) is None
