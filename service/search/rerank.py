"""Post-steps that re-rank a first result: alpha query expansion and diffusion on the kNN graph.

Each has the strategies' shape, a query plan in and a result out, given the first result and
the strategy that made it (AQE searches again with it). The maths and the graph's data are
the graph domain's (service/graph/reranking.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel
from service.graph.reranking import (
    AQE_ALPHA,
    AQE_NEIGHBOURS,
    DIFFUSION_ALPHA,
    DIFFUSION_GAMMA,
    DIFFUSION_SEEDS,
    alpha_query_expansion,
    diffusion_order,
    stored_vectors,
    unit,
)
from service.images.models import Image
from service.search.types import PostStep, QueryPlan, SearchHit, SearchResult, Strategy


def aqe(plan: QueryPlan, first: SearchResult, *, session: Session,
        search: Strategy) -> SearchResult:
    """Search again with the query expanded by its top neighbours' vectors."""
    vector, model = plan.vector_model()
    top = [h.image.id for h in first.hits[:AQE_NEIGHBOURS]]
    vectors = stored_vectors(top, session=session, model=model)
    if not vectors:
        return first
    expanded = alpha_query_expansion(vector, np.stack([vectors[i] for i in top
                                                       if i in vectors]))
    result = search(replace(plan, vector=expanded.astype(np.float32)), session=session)
    result.next_cursor = None
    result.plan.notes.append(f"aqe: alpha {AQE_ALPHA}, {len(vectors)} neighbours")
    return result


def diffusion(plan: QueryPlan, first: SearchResult, *, session: Session,
              search: Strategy) -> SearchResult:
    """Order the collection by diffusion mass from the first result's top hits."""
    vector, model = plan.vector_model()
    seeds = [(h.image.id, 1.0 - h.distance) for h in first.hits[:DIFFUSION_SEEDS]]
    ranked = [(i, f) for i, f in diffusion_order(vector, seeds, session=session, model=model,
                                                 collection=plan.collection)
              if i != plan.exclude_id][:plan.k]
    if not ranked:
        first.plan.notes.append("diffusion: no graph for this collection; plain order")
        return first
    images = {i.id: i for i in session.scalars(select(Image).where(
        Image.id.in_([i for i, _ in ranked])))}
    vectors = stored_vectors([i for i, _ in ranked], session=session, model=model)
    q = unit(vector)
    hits = []
    for image_id, score in ranked:
        if image_id in images and image_id in vectors:
            distance = float(1.0 - unit(vectors[image_id]) @ q)
            hits.append(SearchHit(image=images[image_id], distance=distance, score=score))
    first.hits = hits
    first.next_cursor = None
    first.plan.notes.append(f"diffusion: {len(seeds)} seeds, alpha {DIFFUSION_ALPHA}, "
                            f"gamma {DIFFUSION_GAMMA}; score = diffusion mass")
    return first


RERANKERS: dict[str, PostStep] = {"aqe": aqe, "diffusion": diffusion}


def rerank_hits(kind: str, query: np.ndarray, first: SearchResult, *, session: Session,
                model: EmbeddingModel, search: Callable[[np.ndarray, int], SearchResult],
                k: int, collection: str | None,
                exclude_id: uuid.UUID | None = None) -> SearchResult:
    """Apply `aqe` or `diffusion` to a first result; `search(vector, k)` searches again."""

    def again(plan: QueryPlan, *, session: Session) -> SearchResult:
        return search(plan.vector_model()[0], plan.k)

    plan = QueryPlan(strategy="given", k=k, model=model, vector=query, model_name=model.name,
                     collection=collection, exclude_id=exclude_id, rerank=kind)
    return RERANKERS[kind](plan, first, session=session, search=again)
