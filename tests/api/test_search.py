"""The search endpoint's options over HTTP: metrics, explain, cursors, min_score, errors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, insert, text

from service.db import session_scope
from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.images.models import Image
from tests.search.test_service import make_model


@pytest.fixture(scope="module")
def grid(app: Flask) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """300 images with 8-d vectors; `even` marks half of them."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, 8)).astype(np.float16).astype(np.float32)
    ids = [uuid.uuid4() for _ in vectors]
    collection = f"grid-{uuid.uuid4().hex[:6]}"
    with app.app_context(), session_scope() as session:
        model = make_model(session, 8)
        session.execute(insert(Image), [
            {"id": ids[i], "collection": collection, "sha256": f"{i:064x}", "mime": "image/png",
             "format": "PNG", "width": 1, "height": 1, "bytes": 1, "status": "ready",
             "meta": {"i": i, "even": i % 2 == 0}} for i in range(len(ids))])
        session.execute(insert(ImageEmbedding), [
            {"image_id": ids[i], "model_id": model.id, "vector": vectors[i]}
            for i in range(len(ids))])
        session.commit()
        session.execute(text("ANALYZE images"))
        name = model.name
    yield name, [str(i) for i in ids], vectors
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.collection == collection))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.name == name))


def test_pages_over_http_concatenate_without_gaps(client: FlaskClient, grid) -> None:
    model, ids, vectors = grid
    body = {"vector": vectors[0].tolist(), "model": model, "k": 50,
            "filter": {"even": True}}
    full = client.post("/api/v1/search", json=body).get_json()
    assert len(full["results"]) == 50
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        page = client.post("/api/v1/search", json=dict(body, k=10, cursor=cursor)).get_json()
        seen += [r["id"] for r in page["results"]]
        cursor = page["next_cursor"]
    assert seen == [r["id"] for r in full["results"]]
    # A cursor is tied to its query.
    other = client.post("/api/v1/search", json=dict(body, k=10, filter={"even": False},
                                                    cursor=cursor))
    assert other.status_code == 400 and other.get_json()["error"]["code"] == "invalid_cursor"
    garbage = client.post("/api/v1/search", json=dict(body, cursor="not-a-cursor"))
    assert garbage.status_code == 400


def test_explain_metric_and_min_score(client: FlaskClient, grid) -> None:
    model, ids, vectors = grid
    resp = client.post("/api/v1/search", json={
        "vector": vectors[1].tolist(), "model": model, "k": 5, "explain": True,
        "metric": "l2", "filter": {"i": {"$in": [0, 1, 2]}}})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["metric"] == "l2"
    assert body["explain"]["method"] == "exact"
    assert body["explain"]["estimated_selectivity"] < 0.2
    assert [r["id"] for r in body["results"]][0] == ids[1]
    assert body["results"][0]["distance"] == pytest.approx(0.0, abs=1e-6)
    assert body["results"][0]["score"] == pytest.approx(1.0)
    assert len(body["results"]) == 3
    cut = client.post("/api/v1/search", json={
        "vector": vectors[1].tolist(), "model": model, "k": 50, "min_score": 0.5})
    scores = [r["score"] for r in cut.get_json()["results"]]
    assert scores and min(scores) >= 0.5 and len(scores) < 50


@pytest.mark.parametrize("body,code", [
    ({"metric": "manhattan"}, "invalid_request"),
    ({"metric": "hamming"}, "invalid_metric"),  # only for binary models (phash)
    ({"vector": [1.0, 2.0]}, "invalid_vector"),
    ({"vector": [float("nan")] * 8}, "invalid_vector"),
    ({"filter": {"i": {"$near": 1}}}, "invalid_filter"),
    ({"k": 1001}, "invalid_request"),
])
def test_bad_search_requests(client: FlaskClient, grid, body: dict, code: str) -> None:
    model, _, vectors = grid
    request = {"vector": vectors[0].tolist(), "model": model, **body}
    resp = client.post("/api/v1/search", json=request)
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["code"] == code
