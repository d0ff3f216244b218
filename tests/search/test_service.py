"""Nearest-neighbour order, plans and paging in PostgreSQL on hand-made vectors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import delete, insert, text

from service.db import session_scope
from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.embedding.registry import ModelInfo
from service.embedding.service import ensure_model_row, save_vectors
from service.images.models import Image
from service.search.types import Cursor, ImageRef, SearchResult
from service.search.vectors import search_vectors
from tests.embedding.builds import wait_for_indexes

VECTORS = {
    "a": [1.0, 0.0, 0.0],
    "b": [0.9, 0.1, 0.0],
    "c": [0.5, 0.5, 0.0],
    "d": [0.0, 1.0, 0.0],
    "e": [0.0, 0.0, 1.0],
}


def make_model(session, dim: int, *, built: bool = True) -> EmbeddingModel:
    """A fresh model; with `built`, its HNSW index is valid on return (built here if need be)."""
    info = ModelInfo(name=f"test-{uuid.uuid4().hex[:8]}", version="1", dim=dim, input_size=1,
                     resize=1, mean=[0, 0, 0], std=[1, 1, 1], input_name="image",
                     outputs=["embedding"], licence="test", sha256="0" * 64)
    model = ensure_model_row(info, session=session)  # committed: the session holds nothing
    if built:
        wait_for_indexes(session.get_bind(), model.id)
    return model


@pytest.fixture
def tiny(app: Flask) -> Iterator[tuple[EmbeddingModel, dict[str, uuid.UUID]]]:
    """Five images with 3-d vectors under a throwaway model, removed afterwards."""
    ids = {}
    collection = f"tiny-{uuid.uuid4().hex[:6]}"
    with app.app_context(), session_scope() as session:
        model = make_model(session, 3)
        for name in VECTORS:
            image = Image(collection=collection, sha256=uuid.uuid4().hex * 2, mime="image/png",
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


def names(result: SearchResult, ids: dict[str, uuid.UUID]) -> list[str]:
    back = {v: k for k, v in ids.items()}
    return [back[h.image.id] for h in result.hits]


@pytest.mark.parametrize("method", ["index", "exact"])
def test_order_is_by_cosine_distance(app: Flask, tiny, method: str) -> None:
    model, ids = tiny
    with app.app_context(), session_scope() as session:
        result = search_vectors(np.array([1.0, 0.05, 0.0]), session=session, model=model, k=5,
                                force_method=method)
        assert names(result, ids) == ["a", "b", "c", "d", "e"]
        assert result.hits[0].score == pytest.approx(0.9988, abs=1e-3)
        assert result.plan.method == method
        result = search_vectors(np.array([0.0, 1.0, 0.1]), session=session, model=model, k=2,
                                force_method=method)
        assert names(result, ids) == ["d", "c"]


@pytest.mark.parametrize("method", ["index", "exact"])
def test_ids_only_ranks_the_same_and_filters_the_same(app: Flask, tiny, method: str) -> None:
    model, ids = tiny
    query = np.array([1.0, 0.05, 0.0])
    with app.app_context(), session_scope() as session:
        for options in ({}, {"filter_doc": {"group": "y"}}, {"exclude_id": ids["a"]}):
            full = search_vectors(query, session=session, model=model, k=4,
                                  force_method=method, **options)
            bare = search_vectors(query, session=session, model=model, k=4,
                                  force_method=method, ids_only=True, **options)
            assert names(bare, ids) == names(full, ids) and len(bare.hits) >= 2
            assert [h.distance for h in bare.hits] == [h.distance for h in full.hits]
            assert all(isinstance(h.image, ImageRef) for h in bare.hits)


@pytest.mark.parametrize("metric,query,expected", [
    ("l2", [2.0, 0.1, 0.0], ["a", "b", "c", "d", "e"]),
    # Inner product favours length: b·q = 0.9*3 + 0.1*3 beats a·q = 3 only with y weighted.
    ("inner_product", [1.0, 3.0, 0.0], ["d", "c", "b", "a", "e"]),
    ("l1", [0.6, 0.5, 0.0], ["c", "b", "a", "d", "e"]),
    ("chebyshev", [0.05, 0.8, 0.0], ["d", "c", "b", "a", "e"]),
])
def test_other_metrics_rank_by_their_exact_distance(app: Flask, tiny, metric: str,
                                                    query: list[float],
                                                    expected: list[str]) -> None:
    model, ids = tiny
    with app.app_context(), session_scope() as session:
        for method in ("index", "exact"):
            result = search_vectors(np.array(query), session=session, model=model, k=5,
                                    metric=metric, force_method=method)
            assert names(result, ids) == expected, method
            distances = [h.distance for h in result.hits]
            assert distances == sorted(distances)


def test_chebyshev_and_l1_distances_are_exact(app: Flask, tiny) -> None:
    model, ids = tiny
    q = np.array([0.2, 0.7, -0.1])
    with app.app_context(), session_scope() as session:
        for metric, fn in (("chebyshev", lambda v: np.abs(v - q).max()),
                           ("l1", lambda v: np.abs(v - q).sum())):
            result = search_vectors(q, session=session, model=model, k=5, metric=metric)
            back = {v: k for k, v in ids.items()}
            for hit in result.hits:
                want = fn(np.array(VECTORS[back[hit.image.id]], dtype=np.float16).astype(float))
                assert hit.distance == pytest.approx(want, abs=1e-3)


def test_filter_and_exclusion(app: Flask, tiny) -> None:
    model, ids = tiny
    with app.app_context(), session_scope() as session:
        result = search_vectors(np.array([1.0, 0.0, 0.0]), session=session, model=model, k=5,
                                filter_doc={"group": "y"})
        assert names(result, ids) == ["b", "d"]
        result = search_vectors(np.array([1.0, 0.0, 0.0]), session=session, model=model, k=2,
                                exclude_id=ids["a"])
        assert names(result, ids) == ["b", "c"]


def test_injection_through_filter_is_inert(app: Flask, tiny) -> None:
    model, ids = tiny
    with app.app_context(), session_scope() as session:
        result = search_vectors(np.array([1.0, 0.0, 0.0]), session=session, model=model, k=5,
                                filter_doc={"group') OR 1=1 --": "x' OR '1'='1"})
        assert result.hits == []
        assert session.query(Image).filter(Image.id.in_(list(ids.values()))).count() == 5


@pytest.fixture(scope="module")
def crowd(app: Flask) -> Iterator[tuple[EmbeddingModel, np.ndarray, list[uuid.UUID], str]]:
    """2,000 random 16-d vectors; three of them carry a rare tag."""
    rng = np.random.default_rng(42)
    vectors = rng.normal(size=(2000, 16)).astype(np.float16).astype(np.float32)
    collection = f"crowd-{uuid.uuid4().hex[:6]}"
    ids = [uuid.uuid4() for _ in range(len(vectors))]
    with app.app_context(), session_scope() as session:
        model = make_model(session, 16)
        session.execute(insert(Image), [
            {"id": ids[i], "collection": collection, "sha256": f"{i:064x}", "mime": "image/png",
             "format": "PNG", "width": 1, "height": 1, "bytes": 1, "status": "ready",
             "meta": {"rare": True, "n": i} if i in (7, 700, 1500) else {"n": i}}
            for i in range(len(vectors))])
        session.execute(insert(ImageEmbedding), [
            {"image_id": ids[i], "model_id": model.id, "vector": vectors[i]}
            for i in range(len(vectors))])
        session.commit()
        session.execute(text("ANALYZE images"))
    yield model, vectors, ids, collection
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.collection == collection))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.id == model.id))


def exact_order(vectors: np.ndarray, query: np.ndarray, rows: list[int]) -> list[int]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = query / np.linalg.norm(query)
    dist = 1.0 - unit[rows] @ q
    return [rows[i] for i in np.lexsort((np.arange(len(rows)), dist))]


def test_selective_filter_returns_exactly_the_matches_in_order(app: Flask, crowd) -> None:
    model, vectors, ids, collection = crowd
    query = vectors[1234]
    with app.app_context(), session_scope() as session:
        for method in (None, "index", "exact"):
            result = search_vectors(query, session=session, model=model, k=10,
                                    collection=collection, filter_doc={"rare": True},
                                    force_method=method, explain=True)
            want = [ids[i] for i in exact_order(vectors, query, [7, 700, 1500])]
            assert [h.image.id for h in result.hits] == want, method
        # The planner estimates the filter as small, so the automatic plan is exact.
        auto = search_vectors(query, session=session, model=model, k=10,
                              collection=collection, filter_doc={"rare": True}, explain=True)
        assert auto.plan.method == "exact"
        assert auto.plan.estimated_selectivity < 0.05
        assert auto.plan.rows_scanned is not None and auto.plan.rows_scanned >= 3


def test_unfiltered_index_search_matches_brute_force(app: Flask, crowd) -> None:
    model, vectors, ids, collection = crowd
    with app.app_context(), session_scope() as session:
        recalls = []
        for qi in (1, 50, 999):
            result = search_vectors(vectors[qi], session=session, model=model, k=10,
                                    collection=collection, force_method="index")
            want = {ids[i] for i in exact_order(vectors, vectors[qi], list(range(2000)))[:10]}
            got = [h.image.id for h in result.hits]
            assert len(got) == 10
            recalls.append(len(want & set(got)) / 10)
            distances = [h.distance for h in result.hits]
            assert distances == sorted(distances)
        assert np.mean(recalls) >= 0.9


@pytest.mark.parametrize("method", ["index", "exact"])
def test_pages_concatenate_to_one_large_query(app: Flask, crowd, method: str) -> None:
    model, vectors, ids, collection = crowd
    query = vectors[5]
    with app.app_context(), session_scope() as session:
        full = search_vectors(query, session=session, model=model, k=60, collection=collection,
                              filter_doc={"n": {"$lt": 1000}}, force_method=method,
                              query_fingerprint="fp")
        pages: list[uuid.UUID] = []
        cursor = None
        for _ in range(6):
            page = search_vectors(query, session=session, model=model, k=10,
                                  collection=collection, filter_doc={"n": {"$lt": 1000}},
                                  force_method=method, query_fingerprint="fp",
                                  cursor=Cursor.decode(cursor, "fp") if cursor else None)
            pages += [h.image.id for h in page.hits]
            assert page.plan.method == method
            cursor = page.next_cursor
        assert pages == [h.image.id for h in full.hits]
        assert len(set(pages)) == 60


def test_min_score_cuts_results(app: Flask, tiny) -> None:
    model, ids = tiny
    with app.app_context(), session_scope() as session:
        result = search_vectors(np.array([1.0, 0.0, 0.0]), session=session, model=model, k=5,
                                min_score=0.7)
        assert names(result, ids) == ["a", "b", "c"]
