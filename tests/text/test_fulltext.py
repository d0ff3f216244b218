"""Full-text and hybrid (RRF) search over a small collection with known answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, insert

from service.db import session_scope
from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.images.models import Image
from service.search.strategies.hybrid import RRF_K
from tests.search.test_service import make_model

# name: (metadata, filename, automatic tags, 4-d vector)
DOCS: dict[str, tuple[dict[str, Any], str, list[dict[str, Any]], list[float]]] = {
    "a": ({"tags": ["red", "dress"], "kind": "x"}, "summer.jpg", [], [-1, 0, 0.2, 0]),
    "b": ({"tags": ["blue", "dress"], "kind": "x"}, "b.jpg", [], [1, 0, 0, 0]),
    "c": ({"colour": "red", "kind": "y"}, "red_shoes.jpg", [], [0, 1, 0, 0]),
    "d": ({"kind": "y"}, "d.png", [{"label": "cowboy hat", "p": 0.9}], [0, 0, 0, 1]),
    "e": ({"note": "a red dress on sale", "kind": "x"}, "e.jpg", [], [0.9, 0.3, 0, 0]),
}


@pytest.fixture(scope="module")
def shop(app: Flask) -> Iterator[tuple[str, str, dict[str, str]]]:
    """Five images with tags, file names, automatic tags and 4-d vectors."""
    ids = {name: uuid.uuid4() for name in DOCS}
    collection = f"text-{uuid.uuid4().hex[:6]}"
    with app.app_context(), session_scope() as session:
        model = make_model(session, 4)
        session.execute(insert(Image), [
            {"id": ids[n], "collection": collection, "sha256": uuid.uuid4().hex * 2,
             "mime": "image/png", "format": "PNG", "width": 1, "height": 1, "bytes": 1,
             "status": "ready", "meta": meta, "filename": filename, "auto_tags": tags}
            for n, (meta, filename, tags, _) in DOCS.items()])
        session.execute(insert(ImageEmbedding), [
            {"image_id": ids[n], "model_id": model.id, "vector": np.array(vec, np.float32)}
            for n, (_, _, _, vec) in DOCS.items()])
        session.commit()
        name = model.name
    yield collection, name, {str(v): k for k, v in ids.items()}
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.collection == collection))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.name == name))


def names(body: dict[str, Any], shop: tuple[str, str, dict[str, str]]) -> list[str]:
    return [shop[2][r["id"]] for r in body["results"]]


@pytest.mark.parametrize("text,want", [
    ("red dress", ["a", "e"]),           # user tags (weight A) rank above other metadata (D)
    ("dresses", None),                   # stemmed: a, b, e in some order
    ("hat", ["d"]),                      # automatic tags
    ("shoes", ["c"]),                    # the file name
    ("red -dress", ["c"]),               # web-search syntax: exclusion
    ('"dress on sale"', ["e"]),          # phrase
])
def test_fulltext_known_answers(client: FlaskClient, shop, text: str,
                                want: list[str] | None) -> None:
    resp = client.post("/api/v1/search", json={"text": text, "collection": shop[0], "k": 10})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    got = names(body, shop)
    if want is None:
        assert sorted(got) == ["a", "b", "e"]
    else:
        assert got == want
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_fulltext_applies_filter_paging_and_errors(client: FlaskClient, shop) -> None:
    both = client.post("/api/v1/search", json={
        "text": "red", "collection": shop[0], "filter": {"kind": "y"}}).get_json()
    assert names(both, shop) == ["c"]
    other = client.post("/api/v1/search", json={"text": "red dress", "collection": "nope"})
    assert other.get_json()["results"] == []
    first = client.post("/api/v1/search", json={
        "text": "dress", "collection": shop[0], "k": 2}).get_json()
    second = client.post("/api/v1/search", json={
        "text": "dress", "collection": shop[0], "k": 2,
        "cursor": first["next_cursor"]}).get_json()
    assert len(first["results"]) == 2 and len(second["results"]) == 1
    assert sorted(names(first, shop) + names(second, shop)) == ["a", "b", "e"]
    stop = client.post("/api/v1/search", json={"text": "the of", "collection": shop[0]})
    assert stop.status_code == 400 and stop.get_json()["error"]["code"] == "invalid_query"
    bad = client.post("/api/v1/search", json={"text": "x", "text_weight": 2})
    assert bad.status_code == 400
    nul = client.post("/api/v1/search", json={"text": "red\u0000dress"})
    assert nul.status_code == 400 and nul.get_json()["error"]["code"] == "invalid_query"


def test_hybrid_rrf_fuses_ranks_in_sql(client: FlaskClient, shop) -> None:
    query = {"text": "red dress", "vector": [1, 0, 0, 0], "model": shop[1],
             "collection": shop[0], "k": 5}
    body = client.post("/api/v1/search", json=query).get_json()
    # Text ranks: a 1, e 2. Vector ranks (cosine to b): b 1, e 2, c and d (0), a last.
    got = names(body, shop)
    assert got[:3] == ["e", "a", "b"], got
    assert body["results"][0]["score"] == pytest.approx(0.5 / (RRF_K + 2) + 0.5 / (RRF_K + 2))
    assert body["metric"] == "rrf"
    only_image = client.post("/api/v1/search", json=dict(query, text_weight=0.0)).get_json()
    assert names(only_image, shop)[:2] == ["b", "e"]
    only_text = client.post("/api/v1/search", json=dict(query, text_weight=1.0)).get_json()
    assert names(only_text, shop)[:2] == ["a", "e"]
    filtered = client.post("/api/v1/search", json=dict(query, filter={"kind": "x"})).get_json()
    assert set(names(filtered, shop)) == {"a", "b", "e"}
    first = client.post("/api/v1/search", json=dict(query, k=2)).get_json()
    assert names(first, shop) == ["e", "a"] and first["next_cursor"]
    second = client.post("/api/v1/search", json=dict(query, k=2,
                                                     cursor=first["next_cursor"])).get_json()
    assert names(second, shop) == got[2:4]


def test_tags_are_validated_and_searchable_after_patch(client: FlaskClient, shop) -> None:
    image_id = next(i for i, n in shop[2].items() if n == "d")
    bad = client.patch(f"/api/v1/images/{image_id}", json={"metadata": {"tags": "wool"}})
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalid_metadata"
    ok = client.patch(f"/api/v1/images/{image_id}",
                      json={"metadata": {"kind": "y", "tags": ["felt", "western"]}})
    assert ok.status_code == 200
    body = client.post("/api/v1/search", json={"text": "western felt",
                                               "collection": shop[0]}).get_json()
    assert names(body, shop) == ["d"]
