"""Code sets in PostgreSQL: stored codes, Hamming search, re-ranking, the API and the task."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, insert, select

from service.db import session_scope
from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.embedding.registry import ModelInfo
from service.embedding.service import ensure_model_row
from service.hashing.encoders import encode, to_bitstring
from service.hashing.models import CodeSet, ImageCode
from service.hashing.service import create_code_set, fit_code_set, params_of
from service.images.models import Image
from service.search.strategies.codes import hash_search
from service.search.vectors import search_vectors

N, DIM = 60, 16


def make_model(session: Any, dim: int) -> EmbeddingModel:
    info = ModelInfo(name=f"test-{uuid.uuid4().hex[:8]}", version="1", dim=dim, input_size=1,
                     resize=1, mean=[0, 0, 0], std=[1, 1, 1], input_name="image",
                     outputs=["embedding"], licence="test", sha256="0" * 64)
    return ensure_model_row(info, session=session)


@pytest.fixture(scope="module")
def small(app: Flask) -> Iterator[tuple[EmbeddingModel, np.ndarray, list[uuid.UUID], str]]:
    """60 non-negative 16-d vectors in one collection under a throwaway model."""
    rng = np.random.default_rng(11)
    vectors = np.abs(rng.normal(size=(N, DIM))).astype(np.float16).astype(np.float32)
    collection = f"hash-{uuid.uuid4().hex[:6]}"
    ids = [uuid.uuid4() for _ in range(N)]
    with app.app_context(), session_scope() as session:
        model = make_model(session, DIM)
        session.execute(insert(Image), [
            {"id": ids[i], "collection": collection, "sha256": uuid.uuid4().hex * 2,
             "mime": "image/png", "format": "PNG", "width": 1, "height": 1, "bytes": 1,
             "status": "ready", "meta": {"n": i}} for i in range(N)])
        session.execute(insert(ImageEmbedding), [
            {"image_id": ids[i], "model_id": model.id, "vector": vectors[i]} for i in range(N)])
    yield model, vectors, ids, collection
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.collection == collection))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.id == model.id))


def fitted(app: Flask, model: EmbeddingModel, collection: str, method: str,
           bits: int = 16) -> str:
    name = f"{method}-{uuid.uuid4().hex[:8]}"
    with app.app_context(), session_scope() as session:
        row = create_code_set(name, session=session, model=model, method=method, bits=bits,
                              collection=collection, seed=5)
        session.commit()
        assert fit_code_set(row.id, session=session) == "ready"
    return name


def stored_codes(app: Flask, name: str) -> dict[uuid.UUID, str]:
    with app.app_context(), session_scope() as session:
        rows = session.execute(select(ImageCode.image_id, ImageCode.code)
                               .join(CodeSet, CodeSet.id == ImageCode.code_set_id)
                               .where(CodeSet.name == name)).all()
        return {image_id: str(code) for image_id, code in rows}


@pytest.mark.parametrize("method", ["lsh", "spectral", "itq"])
def test_codes_are_deterministic_for_a_fitted_model(app: Flask, small, method: str) -> None:
    model, vectors, ids, collection = small
    first, second = (fitted(app, model, collection, method) for _ in range(2))
    a, b = stored_codes(app, first), stored_codes(app, second)
    assert len(a) == N and a == b
    with app.app_context(), session_scope() as session:
        params = params_of(session.scalar(select(CodeSet).where(CodeSet.name == first)))
    # The stored parameters re-encode the stored halfvecs to the stored codes.
    again = encode(params, vectors)
    assert all(a[ids[i]] == to_bitstring(again[i]) for i in range(N))


@pytest.mark.parametrize("method", ["lsh", "itq"])
def test_hash_search_with_rerank_equals_exact_search(app: Flask, small, method: str) -> None:
    model, vectors, ids, collection = small
    name = fitted(app, model, collection, method)
    with app.app_context(), session_scope() as session:
        for qi in (0, 17, 42):
            exact = search_vectors(vectors[qi], session=session, model=model, k=10,
                                   collection=collection, force_method="exact")
            hashed = hash_search(vectors[qi], session=session, model=model, code=name, k=10,
                                 collection=collection)
            assert [h.image.id for h in hashed.hits] == [h.image.id for h in exact.hits]
            assert [h.distance for h in hashed.hits] == pytest.approx(
                [h.distance for h in exact.hits], abs=1e-6)
            assert hashed.plan.method == "hash"


def test_without_rerank_the_order_is_hamming(app: Flask, small) -> None:
    model, vectors, ids, collection = small
    name = fitted(app, model, collection, "lsh", bits=64)
    codes = stored_codes(app, name)
    with app.app_context(), session_scope() as session:
        params = params_of(session.scalar(select(CodeSet).where(CodeSet.name == name)))
        result = hash_search(vectors[3], session=session, model=model, code=name, k=N,
                             collection=collection, rerank=False)
    q = to_bitstring(encode(params, vectors[3])[0])
    want = sorted(ids, key=lambda i: (sum(x != y for x, y in zip(codes[i], q, strict=True)), i))
    assert [h.image.id for h in result.hits] == want
    assert result.hits[0].image.id == ids[3] and result.hits[0].distance == 0.0


def test_search_api_and_fit_task(app: Flask, client: FlaskClient, worker, small) -> None:
    model, vectors, ids, collection = small
    name = f"api-{uuid.uuid4().hex[:8]}"
    resp = client.post("/api/v1/codes", json={"name": name, "method": "itq", "bits": 16,
                                              "model": model.name, "collection": collection})
    assert resp.status_code == 202, resp.get_json()
    assert client.post("/api/v1/codes", json={"name": name, "model": model.name, "bits": 16}
                       ).status_code == 409
    deadline = time.monotonic() + 60
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/codes/{name}").get_json()
        if body["status"] != "pending":
            break
        time.sleep(0.2)
    assert body["status"] == "ready", body
    assert body["encoded"] == N and body["bytes_per_image"] == 2
    assert name in [c["name"] for c in client.get("/api/v1/codes").get_json()["items"]]

    query = {"vector": vectors[8].tolist(), "k": 5, "model": model.name,
             "collection": collection}
    exact = client.post("/api/v1/search", json=query).get_json()
    hashed = client.post("/api/v1/search", json={**query, "index": "hash", "code": name,
                                                 "explain": True}).get_json()
    assert [r["id"] for r in hashed["results"]] == [r["id"] for r in exact["results"]]
    assert hashed["explain"]["method"] == "hash"
    missing = client.post("/api/v1/search", json={**query, "index": "hash", "code": "nope"})
    assert missing.status_code == 404
    assert client.delete(f"/api/v1/codes/{name}").status_code == 204
    assert client.get(f"/api/v1/codes/{name}").status_code == 404


def test_deleting_an_image_removes_its_codes(app: Flask, small) -> None:
    model, vectors, ids, collection = small
    name = fitted(app, model, collection, "lsh")
    extra = uuid.uuid4()
    with app.app_context(), session_scope() as session:
        session.execute(insert(Image), [{"id": extra, "collection": collection,
                                         "sha256": uuid.uuid4().hex * 2, "mime": "image/png",
                                         "format": "PNG", "width": 1, "height": 1, "bytes": 1,
                                         "status": "ready", "meta": {}}])
        session.execute(insert(ImageCode), [{"image_id": extra, "code_set_id": session.scalar(
            select(CodeSet.id).where(CodeSet.name == name)), "code": "1" * 16}])
    assert extra in stored_codes(app, name)
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.id == extra))
    assert extra not in stored_codes(app, name)
