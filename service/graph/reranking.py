"""The maths and graph data of search's re-ranking: alpha query expansion, kNN-graph diffusion.

- `aqe`: alpha query expansion (Radenović, Tolias & Chum 2018): the query is replaced by the
  normalised sum of itself and its top-n neighbours weighted by similarity^alpha, and searched
  again.
- `diffusion`: Iscen et al. 2017, "Efficient diffusion on region manifolds": the query's top
  neighbours seed a random walk over the collection's kNN graph (affinities s^gamma,
  symmetrically normalised); scores solve (I - a S) f = y by conjugate gradient.

The math is pure numpy (used by search's post-steps, service/search/rerank.py, by evaluation
and by `bench/reranking.py` alike).
"""

from __future__ import annotations

import uuid

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.graph.models import GraphEdge
from service.images.models import Image

AQE_NEIGHBOURS = 5
AQE_ALPHA = 3.0
DIFFUSION_SEEDS = 10
DIFFUSION_ALPHA = 0.99
DIFFUSION_GAMMA = 3.0
CG_ITERATIONS = 20


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def alpha_query_expansion(query: np.ndarray, neighbours: np.ndarray,
                          alpha: float = AQE_ALPHA) -> np.ndarray:
    """The expanded query: q + sum sim(q, n)^alpha n over the neighbours, normalised."""
    q = unit(query)
    nb = unit(neighbours)
    weights = np.clip(nb @ q, 0.0, None) ** alpha
    return unit(q + weights @ nb)


def expanded_order(unit_rows: np.ndarray, qi: int, order: np.ndarray) -> np.ndarray:
    """Every row but `qi`, best first for its alpha-expanded query: exact, for evaluation and
    the benches (`order`: the rows by plain similarity to row qi, best first)."""
    sims = unit_rows @ alpha_query_expansion(unit_rows[qi], unit_rows[order[:AQE_NEIGHBOURS]])
    sims[qi] = -np.inf
    return np.argsort(-sims, kind="stable")[:-1]


def diffusion_scores(n: int, sources: np.ndarray, targets: np.ndarray, similarity: np.ndarray,
                     seeds: np.ndarray, seed_weights: np.ndarray,
                     alpha: float = DIFFUSION_ALPHA, gamma: float = DIFFUSION_GAMMA,
                     iterations: int = CG_ITERATIONS) -> np.ndarray:
    """Diffusion scores of n nodes from weighted seeds over a kNN graph (conjugate gradient)."""
    w = np.clip(similarity, 0.0, None) ** gamma
    # Symmetric affinity: an edge in either direction links both ways.
    rows = np.concatenate([sources, targets])
    cols = np.concatenate([targets, sources])
    vals = np.concatenate([w, w]) * 0.5
    degree = np.maximum(np.bincount(rows, weights=vals, minlength=n), 1e-12)
    norm = vals / np.sqrt(degree[rows] * degree[cols])

    def apply(f: np.ndarray) -> np.ndarray:
        # (I - alpha S) f, with S the normalised affinity, as a sparse product.
        return f - alpha * np.bincount(rows, weights=norm * f[cols], minlength=n)

    y = np.zeros(n)
    y[seeds] = seed_weights
    f = y.copy()
    r = y - apply(f)
    p = r.copy()
    rs = float(r @ r)
    for _ in range(iterations):
        if rs < 1e-20:
            break
        ap = apply(p)
        step = rs / float(p @ ap)
        f += step * p
        r -= step * ap
        new_rs = float(r @ r)
        p = r + (new_rs / rs) * p
        rs = new_rs
    return f


def collection_graph(collection: str | None, *, session: Session, model: EmbeddingModel
                     ) -> tuple[list[uuid.UUID], np.ndarray, np.ndarray, np.ndarray]:
    """Node ids and edge arrays (source, target, cosine similarity) of a collection's graph."""
    source = select(Image.id).where(Image.status == "ready")
    if collection is not None:
        source = source.where(Image.collection == collection)
    nodes = list(session.scalars(source.order_by(Image.id)))
    index = {image_id: i for i, image_id in enumerate(nodes)}
    edges = session.execute(select(GraphEdge.source_id, GraphEdge.target_id, GraphEdge.distance)
                            .where(GraphEdge.model_id == model.id,
                                   GraphEdge.source_id.in_(source))).all()
    kept = [(index[a], index[b], 1.0 - float(d)) for a, b, d in edges
            if a in index and b in index]
    arr = np.array(kept, dtype=np.float64).reshape(-1, 3)
    return nodes, arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2]


def stored_vectors(ids: list[uuid.UUID], *, session: Session, model: EmbeddingModel
                   ) -> dict[uuid.UUID, np.ndarray]:
    """The stored vectors of some images under a model."""
    rows = session.execute(select(ImageEmbedding.image_id, ImageEmbedding.vector).where(
        ImageEmbedding.model_id == model.id, ImageEmbedding.image_id.in_(ids))).all()
    return {i: np.asarray(v, dtype=np.float32) for i, v in rows}


def diffusion_order(query: np.ndarray, seeds: list[tuple[uuid.UUID, float]], *,
                    session: Session, model: EmbeddingModel, collection: str | None,
                    ) -> list[tuple[uuid.UUID, float]]:
    """Images of the collection by diffusion score from the query's top neighbours."""
    nodes, src, dst, sim = collection_graph(collection, session=session, model=model)
    index = {image_id: i for i, image_id in enumerate(nodes)}
    seeded = [(index[i], s) for i, s in seeds if i in index]
    if not seeded or len(src) == 0:
        return []
    f = diffusion_scores(len(nodes), src, dst, sim, np.array([i for i, _ in seeded]),
                         np.clip(np.array([s for _, s in seeded]), 0, None) ** DIFFUSION_GAMMA)
    order = np.lexsort((np.arange(len(nodes)), -f))
    return [(nodes[i], float(f[i])) for i in order if f[i] > 0]
