"""What follows an embedding lands in one transaction, for a single upload and a bulk job.

The database itself refuses one of the writes (a trigger), so nothing of the service is
mocked: an image is ready with its vectors, labels, derived vectors and codes, or it is not
ready and none of them exist.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import delete, select, text
from sqlalchemy.exc import DBAPIError

from service.db import session_scope
from service.embedding.defaults import default_model
from service.embedding.models import ImageEmbedding
from service.embedding.service import ensure_model_row, find_model, save_vectors
from service.embedding.session import get_embedder
from service.features.models import HSV_HIST, handcrafted_info
from service.hashing.models import ImageCode
from service.hashing.service import create_code_set, delete_code_set, fit_code_set
from service.images.models import Image
from service.indexing.reindex import drop_model
from service.text.models import ImageClasses
from tests.jobs.conftest import make_archive, submit_archive

REFUSE = "ix_test_refuse"


@dataclass
class Indexing:
    """A collection with hsv-hist enabled and a fitted code set covering it."""

    collection: str
    model_id: int
    hsv_id: int
    code_set_id: int
    seeds: set[uuid.UUID]


@pytest.fixture
def indexing(idle_app: Flask) -> Iterator[Indexing]:
    collection = f"ix-{uuid.uuid4().hex[:8]}"
    with idle_app.app_context(), session_scope() as session:
        had_hsv = find_model(HSV_HIST, session=session) is not None
        hsv = ensure_model_row(handcrafted_info(HSV_HIST), session=session)
        info = get_embedder(idle_app.config["MODEL_DIR"], default_model(session=session)).info
        model = ensure_model_row(info, session=session)
        seeds = [Image(collection=collection, sha256=uuid.uuid4().hex * 2, mime="image/png",
                       format="PNG", width=1, height=1, bytes=1, status="pending")
                 for _ in range(2)]
        session.add_all(seeds)
        session.flush()
        rng = np.random.default_rng(0)
        save_vectors(model, [(s.id, rng.standard_normal(model.dim).astype(np.float32))
                             for s in seeds], session=session)
        code_set = create_code_set(collection, session=session, model=model, method="lsh",
                                   bits=64, collection=collection)
        assert fit_code_set(code_set.id, session=session) == "ready"
        setup = Indexing(collection, model.id, hsv.id, code_set.id, {s.id for s in seeds})
    yield setup
    with idle_app.app_context(), session_scope() as session:
        for table in ("image_embeddings", "image_codes"):
            session.execute(text(f"DROP TRIGGER IF EXISTS {REFUSE} ON {table}"))
        delete_code_set(collection, session=session)
        session.execute(delete(Image).where(Image.collection == collection))
        if not had_hsv:
            drop_model(HSV_HIST, session=session)


def refuse(app: Flask, setup: Indexing, write: str) -> None:
    """Make PostgreSQL refuse the derived vectors' or the codes' rows of the collection."""
    table, condition = {"derived": ("image_embeddings", f"NEW.model_id = {setup.hsv_id}"),
                        "codes": ("image_codes", f"NEW.code_set_id = {setup.code_set_id}")}[write]
    with app.app_context(), session_scope() as session:
        session.execute(text(
            f"CREATE OR REPLACE FUNCTION {REFUSE}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"))
        session.execute(text(f"CREATE TRIGGER {REFUSE} BEFORE INSERT ON {table} FOR EACH ROW "
                             f"WHEN ({condition}) EXECUTE FUNCTION {REFUSE}()"))


def indexed(app: Flask, setup: Indexing) -> dict[uuid.UUID, dict[str, object]]:
    """Per new image of the collection: its status and which of its rows exist."""
    with app.app_context(), session_scope() as session:
        images = session.execute(select(Image.id, Image.status, Image.auto_tags).where(
            Image.collection == setup.collection, Image.id.not_in(setup.seeds))).all()
        out: dict[uuid.UUID, dict[str, object]] = {}
        for image_id, status, tags in images:
            models = set(session.scalars(select(ImageEmbedding.model_id).where(
                ImageEmbedding.image_id == image_id)))
            out[image_id] = {
                "status": status, "vector": setup.model_id in models,
                "derived": setup.hsv_id in models, "tags": bool(tags),
                "labels": session.scalar(select(ImageClasses.image_id).where(
                    ImageClasses.image_id == image_id)) is not None,
                "codes": session.scalar(select(ImageCode.image_id).where(
                    ImageCode.image_id == image_id,
                    ImageCode.code_set_id == setup.code_set_id)) is not None}
        return out


def own_bytes(clothing: Path, n: int) -> list[bytes]:
    """Photos no other test uploads, made unique to this test (a trailer after the JPEG's end).

    Copies of one photo in many collections crowd each other's HNSW candidates out of a
    graph link's search, so these stay clear of the photos other tests share.
    """
    mark = uuid.uuid4().hex.encode()
    return [p.read_bytes() + mark for p in sorted((clothing / "images").glob("*.jpg"))[700:700 + n]]


def single(app: Flask, data: bytes, collection: str) -> uuid.UUID:
    """Upload one image and run its embed task's body here; returns its id."""
    from workers.tasks import embed_image

    resp = app.test_client().post(
        "/api/v1/images", data={"file": (io.BytesIO(data), "x.jpg"), "collection": collection},
        content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    image_id = resp.get_json()["id"]
    with app.app_context():
        embed_image.run(image_id)
    return uuid.UUID(image_id)


def bulk(app: Flask, datas: list[bytes], collection: str) -> dict[str, object]:
    """Submit a job and run its expansion and one batch here; returns the batch's counts."""
    from workers.tasks import expand_job, ingest_batch

    archive = make_archive([(f"{i}.jpg", d) for i, d in enumerate(datas)])
    resp = submit_archive(app.test_client(), archive, collection=collection)
    assert resp.status_code == 202, resp.get_json()
    with app.app_context():
        assert expand_job.run(resp.get_json()["id"])["pending"] == len(datas)
        return ingest_batch.run(resp.get_json()["id"], str(uuid.uuid4()))


COMPLETE = {"status": "ready", "vector": True, "derived": True, "tags": True, "labels": True,
            "codes": True}


def test_a_single_upload_is_ready_with_everything_that_indexes_it(
        idle_app: Flask, indexing: Indexing, clothing: Path) -> None:
    image_id = single(idle_app, own_bytes(clothing, 1)[0], indexing.collection)
    assert indexed(idle_app, indexing) == {image_id: COMPLETE}


def test_a_bulk_job_is_ready_with_everything_that_indexes_it(
        idle_app: Flask, indexing: Indexing, clothing: Path) -> None:
    result = bulk(idle_app, own_bytes(clothing, 3), indexing.collection)
    assert result["done"] == 3, result
    state = indexed(idle_app, indexing)
    assert list(state.values()) == [COMPLETE] * 3


@pytest.mark.parametrize("write", ["derived", "codes"])
def test_a_single_upload_whose_indexing_fails_is_not_ready_and_has_nothing(
        idle_app: Flask, indexing: Indexing, clothing: Path, write: str) -> None:
    refuse(idle_app, indexing, write)
    with pytest.raises(DBAPIError, match="refused by the test"):
        single(idle_app, own_bytes(clothing, 1)[0], indexing.collection)
    [state] = indexed(idle_app, indexing).values()
    assert state == {"status": "pending", "vector": False, "derived": False, "tags": False,
                     "labels": False, "codes": False}


@pytest.mark.parametrize("write", ["derived", "codes"])
def test_a_bulk_batch_whose_indexing_fails_writes_no_image(
        idle_app: Flask, indexing: Indexing, clothing: Path, write: str) -> None:
    refuse(idle_app, indexing, write)
    result = bulk(idle_app, own_bytes(clothing, 3), indexing.collection)
    assert (result["done"], result["failed"]) == (0, 3), result
    assert indexed(idle_app, indexing) == {}
