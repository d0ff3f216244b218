"""Compact vectors in PostgreSQL: every route ranks like brute force, k rows under any filter."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import delete, func, insert, select, text, update

from service.db import session_scope
from service.embedding import compact, projection
from service.embedding.models import EmbeddingModel, ImageEmbedding, IndexProjection
from service.embedding.service import save_vectors
from service.images.models import Image
from service.search import estimates
from service.search.vectors import search_vectors
from tests.search.test_service import exact_order, make_model

DIM = 512
FILTERS: list[dict[str, Any] | None] = [
    None, {"band": "a"}, {"rare": True}, {"n": {"$gte": 40}},
    {"$and": [{"band": {"$in": ["a", "b"]}}, {"n": {"$lt": 70}}]}, {"missing": True},
]
ROUTES = ["compact-graph", "compact-scan", "exact", None]
FORCE = {"compact-graph": "index", "compact-scan": "scan", "exact": "exact", None: None}


def matches(meta: list[dict[str, Any]], doc: dict[str, Any] | None) -> list[int]:
    """Rows of the hand-made metadata that a filter of FILTERS keeps."""
    def keep(m: dict[str, Any]) -> bool:
        if doc is None:
            return True
        if "$and" in doc:
            return m["band"] in ("a", "b") and m["n"] < 70
        key, want = next(iter(doc.items()))
        if isinstance(want, dict):
            return m["n"] >= 40
        return m.get(key) == want
    return [i for i, m in enumerate(meta) if keep(m)]


def populate(app: Flask, n: int, seed: int) -> tuple[EmbeddingModel, np.ndarray, list[uuid.UUID],
                                                     list[dict[str, Any]], str]:
    """n images with random vectors under a fresh model, written as the indexing path does."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float16).astype(np.float32)
    meta = [{"n": i, "band": "abc"[i % 3], **({"rare": True} if i % 37 == 5 else {})}
            for i in range(n)]
    collection = f"compact-{uuid.uuid4().hex[:6]}"
    ids = [uuid.uuid4() for _ in range(n)]
    with app.app_context(), session_scope() as session:
        model = make_model(session, DIM)
        session.execute(insert(Image), [
            {"id": ids[i], "collection": collection, "sha256": f"{i:064x}", "mime": "image/png",
             "format": "PNG", "width": 1, "height": 1, "bytes": 1, "status": "pending",
             "meta": meta[i]} for i in range(n)])
        save_vectors(model, list(zip(ids, vectors, strict=True)), session=session)
        session.commit()
    return model, vectors, ids, meta, collection


def remove(app: Flask, model: EmbeddingModel, collection: str) -> None:
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.collection == collection))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.id == model.id))
        session.commit()
    projection.forget(int(model.id))


@pytest.fixture
def small(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, ...]]:
    """90 images (fewer than a pool) with compact vectors ready."""
    monkeypatch.setattr(projection, "PROJECTION_MIN_ROWS", 50)
    model, vectors, ids, meta, collection = populate(app, 90, seed=1)
    with app.app_context(), session_scope() as session:
        assert compact.prepare(int(model.id), session=session) == "ready"
    estimates.clear()
    yield model, vectors, ids, meta, collection
    remove(app, model, collection)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("doc", FILTERS)
def test_every_route_ranks_like_brute_force(app: Flask, small, route: str | None,
                                            doc: dict[str, Any] | None) -> None:
    model, vectors, ids, meta, collection = small
    rows = matches(meta, doc)
    rng = np.random.default_rng(3)
    with app.app_context(), session_scope() as session:
        for _ in range(3):
            query = rng.normal(size=DIM).astype(np.float32)
            result = search_vectors(query, session=session, model=model, k=10,
                                    collection=collection, filter_doc=doc,
                                    force_method=FORCE[route], explain=True)
            want = [ids[i] for i in exact_order(vectors, query, rows)[:10]]
            assert [h.image.id for h in result.hits] == want
            if route is not None:
                assert result.plan.method == route
            else:  # unforced: the planner picks a compact route
                assert result.plan.method in ("compact-graph", "compact-scan")


def test_pages_continue_in_exact_order(app: Flask, small) -> None:
    model, vectors, ids, meta, collection = small
    query = np.random.default_rng(9).normal(size=DIM).astype(np.float32)
    want = [ids[i] for i in exact_order(vectors, query, list(range(len(ids))))]
    with app.app_context(), session_scope() as session:
        got, cursor = [], None
        for _ in range(4):
            result = search_vectors(query, session=session, model=model, k=7,
                                    collection=collection, cursor=cursor, force_method="index")
            got += [h.image.id for h in result.hits]
            from service.search.types import Cursor
            cursor = Cursor.decode(result.next_cursor, "")
        assert got == want[:28]


@pytest.fixture
def medium(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, ...]]:
    """600 images (a pool is a sixth of them) with compact vectors ready."""
    monkeypatch.setattr(projection, "PROJECTION_MIN_ROWS", 50)
    model, vectors, ids, meta, collection = populate(app, 600, seed=2)
    with app.app_context(), session_scope() as session:
        assert compact.prepare(int(model.id), session=session) == "ready"
        session.execute(text("ANALYZE image_embeddings"))
        session.commit()
    estimates.clear()
    yield model, vectors, ids, meta, collection
    remove(app, model, collection)


@pytest.mark.parametrize("route", ROUTES)
def test_every_filter_gets_min_k_matches_rows(app: Flask, medium, route: str | None) -> None:
    model, vectors, ids, meta, collection = medium
    query = np.random.default_rng(4).normal(size=DIM).astype(np.float32)
    with app.app_context(), session_scope() as session:
        for doc in FILTERS:
            for k in (10, 100):
                result = search_vectors(query, session=session, model=model, k=k,
                                        collection=collection, filter_doc=doc,
                                        force_method=FORCE[route])
                rows = set(matches(meta, doc))
                got = [ids.index(h.image.id) for h in result.hits]
                assert len(got) == min(k, len(rows)), (doc, k)
                assert set(got) <= rows
                distances = [h.distance for h in result.hits]
                assert distances == sorted(distances)


def test_vectors_without_a_compact_form_are_still_found(app: Flask, small) -> None:
    model, vectors, ids, meta, collection = small
    with app.app_context(), session_scope() as session:
        # A writer that still trusted its cached "no projection" stored this one.
        session.execute(update(ImageEmbedding).where(
            ImageEmbedding.model_id == model.id, ImageEmbedding.image_id == ids[17])
            .values(compact=None))
        session.commit()
        for method in ("index", "scan"):
            result = search_vectors(vectors[17], session=session, model=model, k=1,
                                    collection=collection, force_method=method)
            assert result.hits[0].image.id == ids[17]
        compact.fill(model, session=session)
        left = session.scalar(select(func.count()).where(
            ImageEmbedding.model_id == model.id, ImageEmbedding.compact.is_(None)))
        assert left == 0


def test_filter_columns_follow_the_image_row(app: Flask, small) -> None:
    model, vectors, ids, meta, collection = small
    with app.app_context(), session_scope() as session:
        session.execute(update(Image).where(Image.id == ids[3]).values(meta={"fresh": 1}))
        session.execute(update(Image).where(Image.id == ids[4]).values(status="failed"))
        session.commit()
        row = session.execute(select(ImageEmbedding.meta, ImageEmbedding.collection).where(
            ImageEmbedding.image_id == ids[3])).one()
        assert row.meta == {"fresh": 1} and row.collection == collection
        for method in ("index", "scan", "exact"):
            hit = search_vectors(vectors[3], session=session, model=model, k=1,
                                 collection=collection, filter_doc={"fresh": 1},
                                 force_method=method)
            assert [h.image.id for h in hit.hits] == [ids[3]]
            near = search_vectors(vectors[4], session=session, model=model, k=90,
                                  collection=collection, force_method=method)
            assert ids[4] not in {h.image.id for h in near.hits}
            assert len(near.hits) == 89


def test_explain_names_the_route_and_the_rows_it_read(app: Flask, medium) -> None:
    model, vectors, ids, meta, collection = medium
    with app.app_context(), session_scope() as session:
        result = search_vectors(vectors[0], session=session, model=model, k=10,
                                collection=collection, filter_doc={"band": "a"},
                                force_method="scan", explain=True)
        assert result.plan.method == "compact-scan"
        assert result.plan.rows_scanned is not None and result.plan.rows_scanned >= 200
        assert any("compact" in note for note in result.plan.notes)


def test_prepare_is_idempotent_and_skips_small_models(app: Flask, small) -> None:
    model, *_ = small
    with app.app_context(), session_scope() as session:
        assert compact.prepare(int(model.id), session=session) == "ready"
        assert session.scalar(select(func.count()).select_from(IndexProjection).where(
            IndexProjection.model_id == model.id)) == 1
        assert int(model.id) not in compact.due(session=session)
        tiny = make_model(session, 3)
        session.commit()
        assert compact.prepare(int(tiny.id), session=session) == "skipped"
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.id == tiny.id))
        session.commit()
