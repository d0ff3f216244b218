"""The kNN graph: MST clusters, near-duplicate groups, related images and rebuilds."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, request
from spectree import Response as Resp
from sqlalchemy.orm import Session

from service.api.graph_schemas import (
    ClusterList,
    ClusterQuery,
    DuplicateList,
    DuplicateQuery,
    GraphRebuild,
    GraphRebuildOut,
    RelatedList,
    RelatedQuery,
)
from service.api.openapi import spec
from service.api.schemas import ErrorResponse
from service.db import session_scope
from service.embedding.models import EmbeddingModel
from service.embedding.service import find_model
from service.errors import NotFound
from service.graph import service as graph
from service.graph.rebuilds import request_rebuild
from service.images.service import get_image
from service.images.validation import validate_collection
from service.queue import REBUILD_GRAPH, enqueue_or_sweep

bp = Blueprint("graph", __name__, url_prefix="/api/v1")
log = logging.getLogger(__name__)
TAGS = ["graph"]


def _model(name: str | None, *, session: Session) -> EmbeddingModel:
    wanted = name or current_app.config["DEFAULT_MODEL"]
    model = find_model(wanted, session=session)
    if model is None:
        raise NotFound("unknown_model", f"no images have been embedded with model {wanted!r}")
    return model


def _groups(query: ClusterQuery, default: float) -> dict[str, Any]:
    threshold = default if query.threshold is None else query.threshold
    with session_scope() as session:
        model = _model(query.model, session=session)
        groups = graph.clusters(query.collection, threshold, session=session, model=model,
                                min_size=query.min_size)
    return {"collection": query.collection, "model": model.name, "threshold": threshold,
            "clusters": [{"size": len(g), "ids": [str(i) for i in g]} for g in groups]}


@bp.get("/clusters")
@spec.validate(query=ClusterQuery, resp=Resp(HTTP_200=ClusterList, HTTP_400=ErrorResponse,
                                             HTTP_404=ErrorResponse), tags=TAGS)
def clusters() -> dict[str, Any]:
    """Clusters of similar images: the graph's MST cut at a cosine distance."""
    return _groups(request.context.query, graph.CLUSTER_THRESHOLD)  # type: ignore[attr-defined]


@bp.get("/duplicates")
@spec.validate(query=DuplicateQuery, resp=Resp(HTTP_200=DuplicateList, HTTP_400=ErrorResponse,
                                               HTTP_404=ErrorResponse), tags=TAGS)
def duplicates() -> dict[str, Any]:
    """Near-duplicate groups by tier: same bytes, then pHash, then the CNN's graph."""
    from service.graph.duplicates import PHASH_THRESHOLD, TIERS, duplicate_groups

    query: DuplicateQuery = request.context.query  # type: ignore[attr-defined]
    threshold = graph.DUPLICATE_THRESHOLD if query.threshold is None else query.threshold
    bits = PHASH_THRESHOLD if query.phash_threshold is None else query.phash_threshold
    tiers = tuple(t for t in TIERS if t in query.tiers.split(","))
    with session_scope() as session:
        model = _model(query.model, session=session)
        groups, notes = duplicate_groups(query.collection, session=session, model=model,
                                         cnn_threshold=threshold, phash_threshold=bits,
                                         tiers=tiers, min_size=query.min_size,
                                         crops=query.crops)
    return {"collection": query.collection, "model": model.name, "threshold": threshold,
            "phash_threshold": bits, "tiers": list(tiers), "notes": notes,
            "clusters": [{"size": len(g.ids), "ids": [str(i) for i in g.ids], "tier": g.tier,
                          "links": [{"a": str(x.a), "b": str(x.b), "tier": x.tier,
                                     "distance": x.distance} for x in g.links]}
                         for g in groups]}


@bp.get("/images/<image_id>/related")
@spec.validate(query=RelatedQuery, resp=Resp(HTTP_200=RelatedList, HTTP_404=ErrorResponse),
               tags=TAGS)
def related(image_id: str) -> dict[str, Any]:
    """Images near this one on the kNN graph, fewest hops first."""
    query: RelatedQuery = request.context.query  # type: ignore[attr-defined]
    with session_scope() as session:
        image = get_image(image_id, session=session)
        model = _model(query.model, session=session)
        found = graph.related(image.id, session=session, model=model, hops=query.hops,
                              limit=query.limit)
        return {"items": [{"id": str(r.image.id), "hops": r.hops, "distance": r.distance,
                           "collection": r.image.collection, "metadata": r.image.meta}
                          for r in found]}


@bp.post("/graph/rebuild")
@spec.validate(json=GraphRebuild, resp=Resp(HTTP_202=GraphRebuildOut, HTTP_404=ErrorResponse),
               tags=TAGS)
def rebuild() -> tuple[dict[str, Any], int]:
    """Recompute a collection's kNN graph exactly, in a task (202)."""
    body: GraphRebuild = request.context.json  # type: ignore[attr-defined]
    validate_collection(body.collection)  # before a task is queued: control characters are 400s
    with session_scope() as session:
        model = _model(body.model, session=session)
        out = {"collection": body.collection, "model": model.name, "status": "queued"}
        rebuild_id = request_rebuild(body.collection, model.id, session=session)
    enqueue_or_sweep(REBUILD_GRAPH, str(rebuild_id))  # committed: the sweeper finds it if lost
    return out, 202
