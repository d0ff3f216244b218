"""Binary codes: Hamming candidates from a code set's HNSW index, re-ranked on the full vectors.

The binary code is the index: 256 bits are 32 bytes an image against 2,560 for a 1280-d
halfvec, and a Hamming distance is a few popcounts. The codes only approximate the cosine
order, so a pool of candidates larger than k is fetched and, unless `rerank` is off, ordered
by the exact distance on the stored vectors; ties by image id as everywhere else.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Float, bindparam, cast, func, literal_column, select
from sqlalchemy.dialects.postgresql import BIT
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.errors import ApiError, NotFound
from service.hashing.encoders import encode, to_bitstring
from service.hashing.models import CodeSet, ImageCode
from service.hashing.service import params_of
from service.images.models import Image
from service.search.metrics import get_metric
from service.search.sql import candidate_conditions, model_is, query_vector
from service.search.types import QueryPlan, SearchHit, SearchPlan, SearchResult

# Candidates fetched by Hamming distance before the exact re-rank, at least this many (and
# 10k for large k). Measured on the clothing set (docs/hashing.md): 100 candidates take
# 128-bit ITQ to recall@10 ~0.96 and 256-bit ITQ to ~0.98 at the latency of plain HNSW;
# random-hyperplane LSH needs ~200 at 256 bits for 0.95.
CANDIDATES = 100
MAX_CANDIDATES = 10_000


def hash_search(
    query: np.ndarray,
    *,
    session: Session,
    model: EmbeddingModel,
    code: str | None,
    k: int,
    metric: str = "cosine",
    rerank: bool = True,
    collection: str | None = None,
    filter_doc: dict[str, Any] | None = None,
    exclude_id: uuid.UUID | None = None,
    min_score: float | None = None,
    candidates: int | None = None,
    explain: bool = False,
) -> SearchResult:
    """The k nearest images by Hamming candidates of a code set, re-ranked exactly unless not."""
    if not code:
        raise ApiError("invalid_query", "index 'hash' needs the name of a code set in 'code'")
    # An explicit pool is taken as given (at least k); the default grows with k.
    pool = min(MAX_CANDIDATES, max(k, candidates) if candidates
               else max(CANDIDATES, 10 * k if rerank else k))
    # The scan settings ride on the code set's lookup: one round trip less per query (a
    # third of the time of a whole 128-bit search). Relaxed order keeps the graph walk going
    # under a filter until the pool is full; the pool is re-sorted below anyway.
    code_set = session.execute(
        select(CodeSet)
        .add_columns(func.set_config("hnsw.ef_search", str(min(1000, max(40, pool))), True),
                     func.set_config("hnsw.iterative_scan", "relaxed_order", True))
        .where(CodeSet.name == code)).scalars().first()
    if code_set is None:
        raise NotFound("unknown_code_set", f"no code set named {code!r}")
    if code_set.model_id != model.id:
        raise ApiError("invalid_query", f"code set {code!r} encodes another model's vectors")
    params = params_of(code_set)
    ranking = get_metric(metric)
    bits = int(code_set.bits)

    q_code = cast(bindparam("code", to_bitstring(encode(params, query)[0])), BIT(bits))
    hamming = cast(ImageCode.code, BIT(bits)).op("<~>", return_type=Float)(q_code)
    conditions: list[ColumnElement[bool]] = [
        # A literal integer, so that the planner matches the set's partial HNSW index.
        ImageCode.code_set_id == literal_column(str(int(code_set.id))),
        *candidate_conditions(collection=collection, filter_doc=filter_doc,
                              exclude_id=exclude_id)]

    inner = (
        select(ImageCode.image_id.label("image_id"), hamming.label("hamming"))
        .join(Image, Image.id == ImageCode.image_id)
        .where(*conditions)
        .order_by(hamming)
        .limit(pool)
        .subquery()
    )
    plan = SearchPlan(method="hash", metric=ranking.name if rerank else "hamming",
                      index_metric="hamming")
    plan.notes.append(f"code set {code_set.name}: {code_set.method}, {bits} bits; "
                      f"{pool} Hamming candidates" + (", re-ranked exactly" if rerank else ""))
    if rerank:
        q = query_vector(query, int(model.dim))
        exact = ranking.distance(ImageEmbedding.vector, q).label("distance")
        statement: Any = (
            select(Image, exact)
            .join(inner, inner.c.image_id == Image.id)
            .join(ImageEmbedding, (ImageEmbedding.image_id == Image.id) & model_is(model))
            .order_by(exact, Image.id).limit(k))
        rows = session.execute(statement).all()
        hits = [SearchHit(image=i, distance=float(d), score=ranking.score(float(d)))
                for i, d in rows]
    else:
        statement = (select(Image, inner.c.hamming)
                     .join(inner, inner.c.image_id == Image.id)
                     .order_by(inner.c.hamming, Image.id).limit(k))
        rows = session.execute(statement).all()
        # Score: the share of bits that agree (1 for the same code).
        hits = [SearchHit(image=i, distance=float(d), score=1.0 - float(d) / bits)
                for i, d in rows]
    if explain:
        plan.rows_scanned = pool
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return SearchResult(hits=hits, plan=plan, next_cursor=None)



def search(plan: QueryPlan, *, session: Session) -> SearchResult:
    """The code set strategy: Hamming candidates, re-ranked exactly unless the plan says not."""
    if plan.cursor is not None:
        raise ApiError("invalid_cursor", "hash search has no pages: ask for a larger k")
    vector, model = plan.vector_model()
    return hash_search(vector, session=session, model=model, code=plan.code, k=plan.k,
                       metric=plan.metric, rerank=plan.code_rerank, collection=plan.collection,
                       filter_doc=plan.filter_doc, exclude_id=plan.exclude_id,
                       min_score=plan.min_score, candidates=plan.candidates,
                       explain=plan.explain)
