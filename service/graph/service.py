"""Graph domain functions: build and maintain the kNN graph, cluster it, walk it."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import numpy as np
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import bindparam, cast, delete, func, literal_column, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from service.embedding import compact, projection
from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.graph.clustering import cut_clusters
from service.graph.models import GraphEdge
from service.images.models import Image

log = logging.getLogger(__name__)

# Out-degree of each image. Ten neighbours keep every near-duplicate group connected in the
# near-duplicate benchmark (a photo has eight variants at most) at 40 bytes an edge.
GRAPH_K = 10
# Cosine distance (EfficientNet-Lite0) up to which images count as the same picture:
# calibrated by bench/neardup.py as the largest MST cut whose duplicate groups keep pairwise
# precision >= 0.95 over 500 photos x 7 edits mixed into the clothing set (docs/hashing.md).
DUPLICATE_THRESHOLD = 0.108
# Default cut for clusters of similar images: the largest of 0.05-steps at which the clusters
# of the clothing set stay >= 95% label-pure; at 0.20 single linkage already chains a quarter
# of the set into one cluster (docs/hashing.md).
CLUSTER_THRESHOLD = 0.15
ROWS_PER_BLOCK = 1024
INSERT_CHUNK = 5_000


@dataclass
class Related:
    """An image reached from another over the graph: hops and the shortest path's length."""

    image: Image
    hops: int
    distance: float


def _model_is(model: EmbeddingModel) -> object:
    # A literal integer, so that the planner matches the model's partial HNSW index.
    return ImageEmbedding.model_id == literal_column(str(int(model.id)))


def link_image(image_id: uuid.UUID, *, session: Session, model: EmbeddingModel | None = None,
               k: int = GRAPH_K) -> int:
    """Add a new image's k out-edges and the in-edges it earns; returns edges written.

    Without a model, the graph of the model that embedded the image last.
    """
    if model is None:
        from service.features.models import HANDCRAFTED, REGION_SUFFIX

        model = session.scalar(
            select(EmbeddingModel)
            .join(ImageEmbedding, ImageEmbedding.model_id == EmbeddingModel.id)
            # Hand-crafted and region vectors are written beside the CNN's, in the same
            # transaction: the graph is the CNN's.
            .where(ImageEmbedding.image_id == image_id,
                   EmbeddingModel.name.not_in(list(HANDCRAFTED)),
                   EmbeddingModel.name.not_like(f"%{REGION_SUFFIX}"))
            .order_by(ImageEmbedding.created_at.desc(), EmbeddingModel.id.desc()).limit(1))
        if model is None:
            return 0
    image = session.get(Image, image_id)
    vector = session.scalar(select(ImageEmbedding.vector).where(
        ImageEmbedding.image_id == image_id, ImageEmbedding.model_id == model.id))
    if image is None or vector is None:
        return 0
    q = bindparam("q", np.asarray(vector, dtype=np.float32), type_=HALFVEC(int(model.dim)))
    vector = np.asarray(vector, dtype=np.float32)
    where = [ImageEmbedding.collection == image.collection, ImageEmbedding.status == "ready",
             ImageEmbedding.image_id != image_id]
    found = projection.ready(model, session=session)
    if found is not None:
        # The model's compact graph serves the candidates (its full-vector index is gone).
        compact.walk_settings(session, ef_search=100, max_scan_tuples=20_000)
        pool = compact.candidates(model, found, vector, where, limit=4 * k + 20, walk=True)
        candidates = select(pool.c.image_id.label("image_id"),
                            pool.c.vector.cosine_distance(q).label("distance")).subquery()
    else:
        # The model's HNSW index serves the candidates; the distance is the exact one on the
        # column, as in search.
        approx = cast(ImageEmbedding.vector, HALFVEC(int(model.dim))).cosine_distance(q)
        candidates = (
            select(ImageEmbedding.image_id.label("image_id"),
                   ImageEmbedding.vector.cosine_distance(q).label("distance"))
            .where(_model_is(model), *where)
            .order_by(approx).limit(2 * k + 10).subquery())
    rows = session.execute(select(candidates.c.image_id, candidates.c.distance)
                           .order_by(candidates.c.distance, candidates.c.image_id)
                           .limit(k)).all()
    if found is not None:
        compact.end_walk(session)
    edges = [{"model_id": model.id, "source_id": image_id, "target_id": t, "distance": float(d)}
             for t, d in rows]
    edges += [{"model_id": model.id, "source_id": t, "target_id": image_id, "distance": float(d)}
              for t, d in rows]
    if not edges:
        return 0
    stmt = insert(GraphEdge).values(edges)
    session.execute(stmt.on_conflict_do_update(
        index_elements=["model_id", "source_id", "target_id"],
        set_={"distance": stmt.excluded.distance}))
    # A neighbour keeps the new image only if it is now among its own k nearest.
    _prune(session, model, [t for t, _ in rows], k)
    return len(edges)


def _prune(session: Session, model: EmbeddingModel, sources: list[uuid.UUID], k: int) -> None:
    ranked = (select(GraphEdge.source_id, GraphEdge.target_id,
                     func.row_number().over(partition_by=GraphEdge.source_id,
                                            order_by=(GraphEdge.distance, GraphEdge.target_id))
                     .label("rank"))
              .where(GraphEdge.model_id == model.id, GraphEdge.source_id.in_(sources))
              .subquery())
    extra = select(ranked.c.source_id, ranked.c.target_id).where(ranked.c.rank > k)
    session.execute(delete(GraphEdge).where(
        GraphEdge.model_id == model.id,
        func.row(GraphEdge.source_id, GraphEdge.target_id).in_(extra)))


def rebuild_graph(collection: str, *, session: Session, model: EmbeddingModel,
                  k: int = GRAPH_K) -> int:
    """Recompute a collection's kNN graph exactly (blocked numpy); returns edges written."""
    rows = session.execute(
        select(ImageEmbedding.image_id, ImageEmbedding.vector)
        .join(Image, Image.id == ImageEmbedding.image_id)
        .where(ImageEmbedding.model_id == model.id, Image.collection == collection,
               Image.status == "ready").order_by(ImageEmbedding.image_id)).all()
    members = select(Image.id).where(Image.collection == collection)
    session.execute(delete(GraphEdge).where(GraphEdge.model_id == model.id,
                                            GraphEdge.source_id.in_(members)))
    if len(rows) < 2:
        return 0
    ids = [r[0] for r in rows]
    x = np.stack([np.asarray(r[1], dtype=np.float32) for r in rows])
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    kk = min(k, len(ids) - 1)
    written = 0
    for start in range(0, len(ids), ROWS_PER_BLOCK):
        block = 1.0 - x[start:start + ROWS_PER_BLOCK] @ x.T
        for i in range(len(block)):
            block[i, start + i] = np.inf  # not its own neighbour
        nearest = np.argsort(block, axis=1, kind="stable")[:, :kk]
        edges = [{"model_id": model.id, "source_id": ids[start + i], "target_id": ids[j],
                  "distance": float(max(block[i, j], 0.0))}
                 for i in range(len(block)) for j in nearest[i]]
        for c in range(0, len(edges), INSERT_CHUNK):
            session.execute(insert(GraphEdge), edges[c:c + INSERT_CHUNK])
        written += len(edges)
    log.info("graph of %s rebuilt: %d images, %d edges", collection, len(ids), written)
    return written


def collection_edges(collection: str, *, session: Session, model: EmbeddingModel
                     ) -> tuple[list[uuid.UUID], list[tuple[uuid.UUID, uuid.UUID, float]]]:
    """The collection's ready images and its graph's edges."""
    nodes = list(session.scalars(select(Image.id).where(
        Image.collection == collection, Image.status == "ready")))
    source = aliased(Image)
    edges = session.execute(
        select(GraphEdge.source_id, GraphEdge.target_id, GraphEdge.distance)
        .join(source, source.id == GraphEdge.source_id)
        .where(GraphEdge.model_id == model.id, source.collection == collection)).all()
    return nodes, [(a, b, float(d)) for a, b, d in edges]


def clusters(collection: str, threshold: float, *, session: Session, model: EmbeddingModel,
             min_size: int = 2) -> list[list[uuid.UUID]]:
    """Groups of the MST of the collection's graph cut at `threshold`, largest first."""
    nodes, edges = collection_edges(collection, session=session, model=model)
    return cut_clusters(nodes, edges, threshold, min_size=min_size)


def related(image_id: uuid.UUID, *, session: Session, model: EmbeddingModel, hops: int = 2,
            limit: int = 20) -> list[Related]:
    """Images within `hops` edges of one image, by fewest hops then shortest path."""
    best: dict[uuid.UUID, tuple[int, float]] = {image_id: (0, 0.0)}
    frontier = {image_id: 0.0}
    for hop in range(1, hops + 1):
        if not frontier:
            break
        rows = session.execute(select(GraphEdge.source_id, GraphEdge.target_id,
                                      GraphEdge.distance)
                               .where(GraphEdge.model_id == model.id,
                                      GraphEdge.source_id.in_(list(frontier)))).all()
        nxt: dict[uuid.UUID, float] = {}
        for source, target, d in rows:
            length = frontier[source] + float(d)
            if target not in best and length < nxt.get(target, float("inf")):
                nxt[target] = length
        for target, length in nxt.items():
            best[target] = (hop, length)
        frontier = nxt
    del best[image_id]
    ranked = sorted(best.items(), key=lambda kv: (kv[1][0], kv[1][1], str(kv[0])))[:limit]
    images = {i.id: i for i in session.scalars(select(Image).where(
        Image.id.in_([i for i, _ in ranked]), Image.status == "ready"))}
    return [Related(images[i], h, d) for i, (h, d) in ranked if i in images]


def edge_count(image_id: uuid.UUID, *, session: Session) -> int:
    """Edges that touch an image (either end)."""
    return int(session.scalar(select(func.count()).select_from(GraphEdge).where(
        or_(GraphEdge.source_id == image_id, GraphEdge.target_id == image_id))) or 0)
