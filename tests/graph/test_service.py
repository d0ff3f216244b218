"""The kNN graph in PostgreSQL: rebuild, incremental links, cascades, clusters and walks."""

from __future__ import annotations

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
from service.graph.models import GraphEdge
from service.graph.service import clusters, edge_count, link_image, rebuild_graph, related
from service.images.models import Image


def make_model(session: Any, dim: int) -> EmbeddingModel:
    info = ModelInfo(name=f"test-{uuid.uuid4().hex[:8]}", version="1", dim=dim, input_size=1,
                     resize=1, mean=[0, 0, 0], std=[1, 1, 1], input_name="image",
                     outputs=["embedding"], licence="test", sha256="0" * 64)
    return ensure_model_row(info, session=session)


def add_images(session: Any, collection: str, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    session.execute(insert(Image), [
        {"id": i, "collection": collection, "sha256": uuid.uuid4().hex * 2, "mime": "image/png",
         "format": "PNG", "width": 1, "height": 1, "bytes": 1, "status": "ready",
         "meta": {"n": n}} for n, i in enumerate(ids)])
    return ids


@pytest.fixture
def world(app: Flask) -> Iterator[tuple[EmbeddingModel, np.ndarray, list[uuid.UUID], str]]:
    """30 vectors in three tight groups of ten (2-d angles 0, 60 and 120 degrees)."""
    rng = np.random.default_rng(3)
    angles = np.repeat([0.0, 60.0, 120.0], 10) + rng.normal(scale=1.0, size=30)
    vectors = np.stack([np.cos(np.radians(angles)), np.sin(np.radians(angles)),
                        np.zeros(30)], axis=1).astype(np.float32)
    collection = f"graph-{uuid.uuid4().hex[:6]}"
    with app.app_context(), session_scope() as session:
        model = make_model(session, 3)
        ids = add_images(session, collection, 30)
        session.execute(insert(ImageEmbedding), [
            {"image_id": ids[i], "model_id": model.id, "vector": vectors[i]} for i in range(30)])
    yield model, vectors, ids, collection
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.collection == collection))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.id == model.id))


def out_edges(app: Flask, model: EmbeddingModel) -> dict[uuid.UUID, list[uuid.UUID]]:
    with app.app_context(), session_scope() as session:
        rows = session.execute(select(GraphEdge.source_id, GraphEdge.target_id)
                               .where(GraphEdge.model_id == model.id)
                               .order_by(GraphEdge.distance)).all()
    out: dict[uuid.UUID, list[uuid.UUID]] = {}
    for a, b in rows:
        out.setdefault(a, []).append(b)
    return out


def test_rebuild_gives_exact_knn_and_three_clusters(app: Flask, world) -> None:
    model, vectors, ids, collection = world
    with app.app_context(), session_scope() as session:
        assert rebuild_graph(collection, session=session, model=model, k=5) == 150
    edges = out_edges(app, model)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for i in (0, 15, 29):
        sims = unit @ unit[i]
        sims[i] = -9
        assert set(edges[ids[i]]) == {ids[j] for j in np.argsort(-sims)[:5]}
    with app.app_context(), session_scope() as session:
        groups = clusters(collection, 0.05, session=session, model=model)
    assert sorted(sorted(g) for g in groups) == sorted(
        sorted(ids[g * 10:(g + 1) * 10]) for g in range(3))


def test_deleting_an_image_removes_its_edges(app: Flask, world) -> None:
    model, vectors, ids, collection = world
    with app.app_context(), session_scope() as session:
        rebuild_graph(collection, session=session, model=model, k=5)
        assert edge_count(ids[4], session=session) >= 5
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.id == ids[4]))
    with app.app_context(), session_scope() as session:
        assert edge_count(ids[4], session=session) == 0
        assert edge_count(ids[5], session=session) > 0


def test_link_image_adds_it_incrementally(app: Flask, world) -> None:
    model, vectors, ids, collection = world
    with app.app_context(), session_scope() as session:
        rebuild_graph(collection, session=session, model=model, k=5)
        [new] = add_images(session, collection, 1)
        session.execute(insert(ImageEmbedding), [
            {"image_id": new, "model_id": model.id, "vector": np.array([1.0, 0.0, 0.0])}])
        assert link_image(new, session=session, model=model, k=5) == 10
    edges = out_edges(app, model)
    assert set(edges[new]) <= set(ids[:10])
    # Every node still has exactly k out-edges: neighbours that took the newcomer dropped one.
    assert all(len(t) == 5 for t in edges.values())
    assert sum(new in t for t in edges.values()) >= 1


def test_hand_made_graph_clusters_and_related_over_the_api(app: Flask, client: FlaskClient,
                                                           world) -> None:
    model, vectors, ids, collection = world
    a, b, c, d, e = ids[:5]
    hand = [(a, b, 0.01), (b, c, 0.02), (c, d, 0.5), (d, e, 0.03), (a, c, 0.4)]
    with app.app_context(), session_scope() as session:
        session.execute(insert(GraphEdge), [
            {"model_id": model.id, "source_id": s, "target_id": t, "distance": w}
            for s, t, w in hand])
    body = client.get(f"/api/v1/duplicates?collection={collection}&threshold=0.1"
                      f"&model={model.name}").get_json()
    assert [set(g["ids"]) for g in body["clusters"]] == [
        {str(a), str(b), str(c)}, {str(d), str(e)}]
    body = client.get(f"/api/v1/clusters?collection={collection}&threshold=0.6"
                      f"&model={model.name}").get_json()
    assert [g["size"] for g in body["clusters"]] == [5]
    body = client.get(f"/api/v1/images/{a}/related?hops=2&model={model.name}").get_json()
    assert [(r["id"], r["hops"]) for r in body["items"]] == [(str(b), 1), (str(c), 1),
                                                             (str(d), 2)]
    # Fewest hops first: c is one hop away over a-c (0.4), not two over a-b-c (0.03).
    assert body["items"][1]["distance"] == pytest.approx(0.4, abs=1e-6)
    with app.app_context(), session_scope() as session:
        found = related(a, session=session, model=model, hops=1)
    assert [r.image.id for r in found] == [b, c]


def test_uploads_are_linked_by_the_worker_and_unlinked_on_delete(
        app: Flask, client: FlaskClient, worker, photos) -> None:
    from tests.conftest import wait_for_status

    collection = f"linked-{uuid.uuid4().hex[:6]}"
    ids = []
    for path in photos[:3]:
        with path.open("rb") as fh:
            resp = client.post("/api/v1/images", data={"file": (fh, path.name),
                                                       "collection": collection})
        assert resp.status_code in (200, 202), resp.get_json()
        ids.append(resp.get_json()["id"])
        assert wait_for_status(client, ids[-1])["status"] == "ready"
    with app.app_context(), session_scope() as session:
        # The third image links to both earlier ones, and they link back to it.
        assert edge_count(uuid.UUID(ids[2]), session=session) == 4
        assert edge_count(uuid.UUID(ids[0]), session=session) == 4
    related = client.get(f"/api/v1/images/{ids[0]}/related?hops=1").get_json()["items"]
    assert {r["id"] for r in related} == set(ids[1:])
    assert client.delete(f"/api/v1/images/{ids[2]}").status_code == 204
    with app.app_context(), session_scope() as session:
        assert edge_count(uuid.UUID(ids[2]), session=session) == 0
        assert edge_count(uuid.UUID(ids[0]), session=session) == 2
