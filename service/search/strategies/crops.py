"""`"query_crops": true`: find images that are crops of the query, or that the query crops.

A CNN vector of a tight crop is far from the vector of its whole original (bench/neardup.py:
recall@1 0.89 for a 70% centre crop). With the model's centre-region companion enabled
(`<model>@centre70`, the vector of each image's central 70%), three searches run and each
image keeps its smallest cosine distance:

1. the query's vector against whole images (the plain search);
2. the query's vector against stored centre regions (the query is a crop of a stored image);
3. the query's centre region against whole images (a stored image is a crop of the query).

All three are the same network's cosine distances, so they compare directly.
"""

from __future__ import annotations

import uuid

import numpy as np
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel
from service.errors import ApiError
from service.images.decode import ImageDecodeError
from service.search.types import QueryPlan, SearchHit, SearchPlan, SearchRequest, SearchResult
from service.search.vectors import search_vectors


def _region_query(req: SearchRequest, region: EmbeddingModel, *, session: Session,
                  model_dir: str, max_pixels: int) -> np.ndarray:
    """The centre-region vector of the query (a stored image's, or the upload's)."""
    # onnx and onnxruntime (about a second) load only for searches that need a model.
    from service.embedding.service import stored_vector
    from service.features.models import derived_query_vector

    if req.file is not None:
        try:
            return derived_query_vector(region.name, req.file, model_dir=model_dir,
                                        max_pixels=max_pixels)[1]
        except ImageDecodeError as exc:
            raise ApiError(exc.code, exc.message) from exc
    if req.image_id is None:
        raise ApiError("invalid_query", "query_crops needs an image_id or a file, not a vector")
    vector = stored_vector(uuid.UUID(str(req.image_id)), region, session=session)
    if vector is None:
        raise ApiError("not_ready", f"image {req.image_id} has no {region.name} vector yet: "
                       f"reindex its collection with that model", status=409)
    return vector


def search(plan: QueryPlan, *, session: Session) -> SearchResult:
    """The k nearest images by the best of whole and centre-region cosine distances."""
    # onnx and onnxruntime (about a second) load only for searches that need a model.
    from service.embedding.service import find_model
    from service.features.models import is_derived, region_model_name

    vector, model = plan.vector_model()
    req = plan.request or SearchRequest()
    if plan.metric != "cosine" or is_derived(model.name):
        raise ApiError("invalid_query", "query_crops compares a CNN's cosine distances")
    if req.index != "hnsw" or plan.rerank is not None or plan.cursor is not None:
        raise ApiError("invalid_query", "query_crops has no pages, hash index or re-ranking")
    region = find_model(region_model_name(model.name), session=session)
    if region is None:
        raise ApiError("unknown_model", f"query_crops needs {region_model_name(model.name)}: "
                       f"run `lookalike models install {region_model_name(model.name)}` "
                       f"and reindex the collection with it")
    region_vector = _region_query(req, region, session=session, model_dir=plan.model_dir,
                                  max_pixels=plan.max_pixels)
    legs = [(vector, model, "whole query vs whole images"),
            (vector, region, "whole query vs stored centre regions"),
            (region_vector, model, "query centre region vs whole images")]
    best: dict[uuid.UUID, SearchHit] = {}
    explained = SearchPlan(method="crops", metric="cosine")
    for query, leg_model, what in legs:
        # Each leg asks for k: an image in the final top k is in the top k of the leg that
        # gives it its smallest distance.
        leg = search_vectors(query, session=session, model=leg_model, k=plan.k,
                             metric="cosine", collection=plan.collection,
                             filter_doc=plan.filter_doc, exclude_id=plan.exclude_id)
        explained.notes.append(f"{what}: {leg.plan.method}, {len(leg.hits)} hits")
        for hit in leg.hits:
            if hit.image.id not in best or hit.distance < best[hit.image.id].distance:
                best[hit.image.id] = hit
    hits = sorted(best.values(), key=lambda h: (h.distance, str(h.image.id)))[:plan.k]
    if plan.min_score is not None:
        hits = [h for h in hits if h.score >= plan.min_score]
    return SearchResult(hits=hits, plan=explained, next_cursor=None)
