"""Alpha query expansion and diffusion: the math on hand-made data, and through search."""

from __future__ import annotations

import numpy as np
from flask import Flask
from flask.testing import FlaskClient

from service.db import session_scope
from service.graph.reranking import alpha_query_expansion, diffusion_scores
from service.graph.service import rebuild_graph
from tests.graph.test_service import world  # noqa: F401  (the fixture)


def test_aqe_moves_the_query_towards_its_close_neighbours() -> None:
    q = np.array([1.0, 0.0, 0.0])
    near = np.array([[0.9, 0.3, 0.0], [0.95, 0.2, 0.1]])
    expanded = alpha_query_expansion(q, near)
    assert np.isclose(np.linalg.norm(expanded), 1.0)
    assert expanded[1] > 0.05 and expanded[0] > 0.9
    # A far neighbour (similarity 0) adds nothing.
    assert np.allclose(alpha_query_expansion(q, np.array([[0.0, 1.0, 0.0]])), q)


def test_diffusion_follows_the_manifold() -> None:
    # A chain 0-1-2-3-4 of strong links and a separate pair 5-6; node 4 is far from the seed
    # in one step but reachable along the chain, unlike 5 and 6.
    src = np.array([0, 1, 2, 3, 5])
    dst = np.array([1, 2, 3, 4, 6])
    sim = np.array([0.9, 0.9, 0.9, 0.9, 0.9])
    f = diffusion_scores(7, src, dst, sim, seeds=np.array([0]), seed_weights=np.array([1.0]))
    assert set(np.argsort(-f)[:5]) == {0, 1, 2, 3, 4}
    assert f[1] > f[4]
    assert f[4] > 0 and f[5] == 0 and f[6] == 0


def test_search_with_aqe_and_diffusion(app: Flask, client: FlaskClient, world) -> None:  # noqa: F811
    model, vectors, ids, collection = world
    with app.app_context(), session_scope() as session:
        rebuild_graph(collection, session=session, model=model, k=5)
    base = {"image_id": str(ids[3]), "k": 9, "model": model.name, "collection": collection}
    plain = client.post("/api/v1/search", json=base).get_json()
    group = {str(i) for i in ids[:10]} - {str(ids[3])}
    assert {r["id"] for r in plain["results"]} == group
    for kind in ("aqe", "diffusion"):
        body = client.post("/api/v1/search", json={**base, "rerank": kind,
                                                   "explain": True}).get_json()
        assert {r["id"] for r in body["results"]} == group, kind
        assert any(kind in note for note in body["explain"]["notes"]), kind
        assert body["next_cursor"] is None
