"""Nearest-neighbour order in PostgreSQL on tiny hand-made vectors."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import delete

from service.db import session_scope
from service.embedding.models import EmbeddingModel
from service.embedding.registry import ModelInfo
from service.embedding.service import ensure_model_row, save_vectors
from service.images.models import Image
from service.search.service import search_vectors

VECTORS = {
    "a": [1.0, 0.0, 0.0],
    "b": [0.9, 0.1, 0.0],
    "c": [0.5, 0.5, 0.0],
    "d": [0.0, 1.0, 0.0],
    "e": [0.0, 0.0, 1.0],
}


@pytest.fixture
def tiny(app: Flask):
    """Five images with 3-d vectors under a throwaway model, removed afterwards."""
    info = ModelInfo(name=f"tiny-{uuid.uuid4().hex[:8]}", version="1", dim=3, input_size=1,
                     resize=1, mean=[0, 0, 0], std=[1, 1, 1], input_name="image",
                     outputs=["embedding"], licence="test", sha256="0" * 64)
    ids = {}
    with app.app_context(), session_scope() as session:
        model = ensure_model_row(info, session=session)
        for name, _vec in VECTORS.items():
            image = Image(collection="tiny", sha256=uuid.uuid4().hex * 2, mime="image/png",
                          format="PNG", width=1, height=1, bytes=1, status="pending",
                          meta={"group": "x" if name in "ace" else "y"})
            session.add(image)
            session.flush()
            ids[name] = image.id
        save_vectors(model, [(ids[n], np.array(v, dtype=np.float32)) for n, v in VECTORS.items()],
                     session=session)
    yield model, ids
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.id.in_(list(ids.values()))))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.id == model.id))


def names(hits, ids) -> list[str]:
    back = {v: k for k, v in ids.items()}
    return [back[h.image.id] for h in hits]


def test_order_is_by_cosine_distance(app: Flask, tiny) -> None:
    model, ids = tiny
    with app.app_context(), session_scope() as session:
        hits = search_vectors(np.array([1.0, 0.05, 0.0]), session=session, model=model, k=5)
        assert names(hits, ids) == ["a", "b", "c", "d", "e"]
        assert hits[0].score == pytest.approx(0.9988, abs=1e-3)
        hits = search_vectors(np.array([0.0, 1.0, 0.1]), session=session, model=model, k=2)
        assert names(hits, ids) == ["d", "c"]


def test_filter_and_exclusion(app: Flask, tiny) -> None:
    model, ids = tiny
    with app.app_context(), session_scope() as session:
        hits = search_vectors(np.array([1.0, 0.0, 0.0]), session=session, model=model, k=5,
                              filter_doc={"group": "y"})
        assert names(hits, ids) == ["b", "d"]
        hits = search_vectors(np.array([1.0, 0.0, 0.0]), session=session, model=model, k=2,
                              exclude_id=ids["a"])
        assert names(hits, ids) == ["b", "c"]


def test_injection_through_filter_is_inert(app: Flask, tiny) -> None:
    model, ids = tiny
    with app.app_context(), session_scope() as session:
        hits = search_vectors(np.array([1.0, 0.0, 0.0]), session=session, model=model, k=5,
                              filter_doc={"group') OR 1=1 --": "x' OR '1'='1"})
        assert hits == []
        assert session.query(Image).filter(Image.collection == "tiny").count() == 5
