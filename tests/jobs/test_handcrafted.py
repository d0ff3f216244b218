"""Bulk ingestion computes the enabled hand-crafted models' vectors too."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image as PILImage
from sqlalchemy import func, select

from service.db import session_scope
from service.embedding.models import ImageEmbedding
from service.embedding.service import ensure_model_row, find_model
from service.features.models import HSV_HIST, PHASH, handcrafted_info
from service.images.models import Image
from service.indexing.reindex import drop_model
from tests.jobs.conftest import make_archive, submit_archive, wait_job

pytestmark = pytest.mark.usefixtures("jobs_worker")


@pytest.fixture
def enabled(jobs_app: Flask) -> Iterator[None]:
    """phash and hsv-hist registered for the test, dropped after it."""
    with jobs_app.app_context(), session_scope() as session:
        for name in (PHASH, HSV_HIST):
            ensure_model_row(handcrafted_info(name), session=session)
    yield
    with jobs_app.app_context(), session_scope() as session:
        for name in (PHASH, HSV_HIST):
            if find_model(name, session=session) is not None:
                drop_model(name, session=session)


def vectors(app: Flask, collection: str, name: str) -> int:
    with app.app_context(), session_scope() as session:
        model = find_model(name, session=session)
        assert model is not None
        return int(session.scalar(
            select(func.count()).select_from(ImageEmbedding)
            .join(Image, Image.id == ImageEmbedding.image_id)
            .where(ImageEmbedding.model_id == model.id, Image.collection == collection)) or 0)


def test_job_images_get_hand_crafted_vectors_and_phash_duplicates(
        jobs_app: Flask, jobs_client: FlaskClient, clothing: Path, enabled: None) -> None:
    files = sorted((clothing / "images").glob("*.jpg"))[200:210]
    with PILImage.open(files[0]) as img:
        small = img.convert("RGB").resize((img.width * 3 // 10, img.height * 3 // 10),
                                          PILImage.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=90)
    archive = make_archive([(p.name, p.read_bytes()) for p in files]
                           + [("small.jpg", buf.getvalue())])
    collection = f"j-hand-{uuid.uuid4().hex[:6]}"
    resp = submit_archive(jobs_client, archive, collection=collection)
    assert resp.status_code == 202, resp.get_json()
    job = wait_job(jobs_client, resp.get_json()["id"])
    assert (job["status"], job["done"]) == ("done", 11), job
    # Written in the batch's own transaction: a done job has them all.
    assert vectors(jobs_app, collection, PHASH) == 11
    assert vectors(jobs_app, collection, HSV_HIST) == 11
    body = jobs_client.get(f"/api/v1/duplicates?collection={collection}&tiers=exact,phash")
    assert body.status_code == 200, body.get_json()
    [group] = body.get_json()["clusters"]
    assert group["size"] == 2 and group["tier"] == "phash"
    names = {jobs_client.get(f"/api/v1/images/{i}").get_json()["filename"] for i in group["ids"]}
    assert names == {files[0].name, "small.jpg"}
