"""Estimates: a filter's share of a model's vectors stays a share past the counting cap."""

from __future__ import annotations

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import text

from service.db import session_scope
from service.search import estimates
from service.search.vectors import search_vectors
from tests.search.test_compact import DIM, small  # noqa: F401  (the fixture)


def test_past_the_count_cap_the_total_is_the_planners_and_a_third_stays_a_third(
        app: Flask, small, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    model, _, _, _, collection = small
    # 90 rows against a cap of 10 stand for a million against the real cap.
    monkeypatch.setattr(estimates, "COUNT_CAP", 10)
    query = np.random.default_rng(3).normal(size=DIM).astype(np.float32)
    with app.app_context(), session_scope() as session:
        session.execute(text("ANALYZE images"))
        session.execute(text("ANALYZE image_embeddings"))
        session.commit()
        estimates.clear()
        total = estimates.model_rows(model, session=session)
        assert 45 <= total <= 180
        result = search_vectors(query, session=session, model=model, k=5,
                                collection=collection, filter_doc={"band": "a"}, explain=True)
        assert result.plan.estimated_selectivity < 0.75
    estimates.clear()
