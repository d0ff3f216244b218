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
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel
from service.errors import ApiError
from service.search.service import SearchHit, SearchPlan, SearchResult, search_vectors

if TYPE_CHECKING:
    from service.search.service import SearchRequest


def _region_query(req: SearchRequest, region: EmbeddingModel, *, session: Session,
                  model_dir: str, max_pixels: int) -> np.ndarray:
    """The centre-region vector of the query (a stored image's, or the upload's)."""
    from service.embedding.service import stored_vector
    from service.embedding.transforms import ImageDecodeError
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


def crop_search(req: SearchRequest, vector: np.ndarray, *, session: Session,
                model: EmbeddingModel, exclude_id: uuid.UUID | None, model_dir: str,
                max_pixels: int, has_cursor: bool) -> SearchResult:
    """The k nearest images by the best of whole and centre-region cosine distances."""
    from service.embedding.service import find_model
    from service.features.models import is_derived, region_model_name

    if req.metric != "cosine" or is_derived(model.name):
        raise ApiError("invalid_query", "query_crops compares a CNN's cosine distances")
    if req.index != "hnsw" or req.rerank in ("aqe", "diffusion") or has_cursor:
        raise ApiError("invalid_query", "query_crops has no pages, hash index or re-ranking")
    region = find_model(region_model_name(model.name), session=session)
    if region is None:
        raise ApiError("unknown_model", f"query_crops needs {region_model_name(model.name)}: "
                       f"run `lookalike models install {region_model_name(model.name)}` "
                       f"and reindex the collection with it")
    region_vector = _region_query(req, region, session=session, model_dir=model_dir,
                                  max_pixels=max_pixels)
    legs = [(vector, model, "whole query vs whole images"),
            (vector, region, "whole query vs stored centre regions"),
            (region_vector, model, "query centre region vs whole images")]
    best: dict[uuid.UUID, SearchHit] = {}
    plan = SearchPlan(method="crops", metric="cosine")
    for query, leg_model, what in legs:
        # Each leg asks for k: an image in the final top k is in the top k of the leg that
        # gives it its smallest distance.
        leg = search_vectors(query, session=session, model=leg_model, k=req.k, metric="cosine",
                             collection=req.collection, filter_doc=req.filter_doc,
                             exclude_id=exclude_id)
        plan.notes.append(f"{what}: {leg.plan.method}, {len(leg.hits)} hits")
        for hit in leg.hits:
            if hit.image.id not in best or hit.distance < best[hit.image.id].distance:
                best[hit.image.id] = hit
    hits = sorted(best.values(), key=lambda h: (h.distance, str(h.image.id)))[:req.k]
    if req.min_score is not None:
        hits = [h for h in hits if h.score >= req.min_score]
    return SearchResult(hits=hits, plan=plan, next_cursor=None)
