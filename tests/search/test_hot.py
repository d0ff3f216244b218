"""Hot filters: a filter searched often gets a partial compact index, and searches walk it."""

from __future__ import annotations

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import select, text

from service.db import session_scope
from service.embedding import indexes
from service.embedding.models import IndexBuild
from service.search import estimates, hot
from service.search.vectors import search_vectors
from tests.embedding.builds import wait_for_indexes
from tests.search.test_compact import DIM, matches, small  # noqa: F401  (the fixture)
from tests.search.test_service import exact_order


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds for a 90-row table: the third search of any filter asks.

    The size bounds are off: on a table that earlier tests filled, a new collection's rows are
    estimated from statistics that do not know it yet.
    """
    monkeypatch.setattr(hot, "HOT_AFTER", 3)
    monkeypatch.setattr(hot, "MIN_ROWS", 0)
    monkeypatch.setattr(hot, "MAX_SELECTIVITY", 1.0)
    hot.forget()
    yield
    hot.forget()


def test_a_frequent_filter_gets_its_partial_index_and_searches_walk_it(
        app: Flask, small, eager) -> None:  # noqa: F811
    model, vectors, ids, meta, collection = small
    doc = {"band": "a"}
    rows = matches(meta, doc)
    rng = np.random.default_rng(5)
    queries = rng.normal(size=(5, DIM)).astype(np.float32)
    with app.app_context(), session_scope() as session:
        session.execute(text("ANALYZE image_embeddings"))  # the estimate decides eligibility
        session.commit()
        estimates.clear()
        for query in queries[:3]:
            result = search_vectors(query, session=session, model=model, k=10,
                                    collection=collection, filter_doc=doc, explain=True)
            assert result.plan.method == "compact-scan"
        build = session.scalar(select(IndexBuild).where(
            IndexBuild.name.startswith(hot.prefix(int(model.id)))))
        assert build is not None and build.status in ("pending", "building", "ready")
        build_id = int(build.id)
        session.commit()
        # Another filter, searched once, asks for nothing.
        search_vectors(queries[0], session=session, model=model, k=10, collection=collection,
                       filter_doc={"band": "b"})
        assert session.scalar(select(IndexBuild.id).where(
            IndexBuild.name.startswith(hot.prefix(int(model.id))),
            IndexBuild.id != build_id)) is None
        session.commit()
    with app.app_context():
        from service.db import get_engine

        # Here, or by the suite's worker if it took the message first.
        assert indexes.build(build_id, engine=get_engine()) in ("built", "ready", "busy")
        wait_for_indexes(get_engine(), int(model.id))
    hot.forget()
    with app.app_context(), session_scope() as session:
        for query in queries:
            result = search_vectors(query, session=session, model=model, k=10,
                                    collection=collection, filter_doc=doc, explain=True)
            assert result.plan.method == "compact-graph"
            assert build.name in result.plan.indexes
            want = [ids[i] for i in exact_order(vectors, query, rows)[:10]]
            assert [h.image.id for h in result.hits] == want
        # A query by a stored image adds a condition of its own: the index still serves it.
        by_image = search_vectors(vectors[0], session=session, model=model, k=5,
                                  collection=collection, filter_doc=doc, exclude_id=ids[0],
                                  explain=True)
        assert build.name in by_image.plan.indexes
        assert ids[0] not in {h.image.id for h in by_image.hits}
