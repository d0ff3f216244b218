"""Words and an image query fused by reciprocal rank fusion, in one SQL statement.

The image side's ranked ids (from the planned vector search) and the words' side are joined:
score = w / (60 + text rank) + (1 - w) / (60 + image rank). Pages stay within one fused pool.
"""

from __future__ import annotations

from sqlalchemy import Float, cast, func, literal, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Subquery

from service.search.sql import plan_conditions, ranked_side
from service.search.strategies.text import score_page, text_side
from service.search.types import Cursor, QueryPlan, SearchHit, SearchResult
from service.search.vectors import search_vectors

RRF_K = 60
# Each side of a hybrid contributes this many ranked rows at least (4k for larger k): a row
# that only one side ranks still gets its share, and pages stay within one fused pool.
RRF_POOL = 100
MAX_POOL = 1000


def hybrid_pool(k: int) -> int:
    """Rows each side contributes, and so the end of a hybrid's pages."""
    return min(MAX_POOL, max(RRF_POOL, 4 * k))


def fuse(session: Session, text_side: Subquery, image_side: Subquery, *, weight: float, k: int,
         offset: int, min_score: float | None) -> list[SearchHit]:
    """Reciprocal rank fusion of a text side and an image side, in SQL, best first."""
    text_ranked = select(
        text_side.c.image_id,
        func.row_number().over(order_by=(text_side.c.score.desc(), text_side.c.image_id))
        .label("rank")).subquery("text_ranked")
    joined = text_ranked.join(image_side, image_side.c.image_id == text_ranked.c.image_id,
                              full=True)
    w = literal(float(weight), Float)
    rrf_k = literal(float(RRF_K), Float)
    score = (func.coalesce(w / (rrf_k + cast(text_ranked.c.rank, Float)), 0.0)
             + func.coalesce((1.0 - w) / (rrf_k + cast(image_side.c.ord, Float)), 0.0))
    fused = select(func.coalesce(text_ranked.c.image_id, image_side.c.image_id)
                   .label("image_id"), score.label("score")).select_from(joined).subquery("fused")
    return score_page(session, fused, fused.c.score, k=k, offset=offset, min_score=min_score)


def search(plan: QueryPlan, *, session: Session) -> SearchResult:
    """Words fused with the image query's nearest neighbours by RRF."""
    if plan.text is None:
        raise ValueError("a hybrid search needs words")
    vector, model = plan.vector_model()
    pool = hybrid_pool(plan.k)
    words_side, explained = text_side(plan, session=session, conditions=plan_conditions(plan),
                                      limit=pool)
    found = search_vectors(vector, session=session, model=model, k=pool,
                           collection=plan.collection, filter_doc=plan.filter_doc,
                           exclude_id=plan.exclude_id)
    hits = fuse(session, words_side, ranked_side(found.hits, "image_side"),
                weight=plan.text.weight, k=plan.k, offset=plan.offset,
                min_score=plan.min_score)
    explained.method, explained.metric = f"hybrid_{plan.text.mode}", "rrf"
    explained.notes.append(f"RRF k={RRF_K}, text weight {plan.text.weight}, {pool} rows a side")
    next_cursor = None
    if len(hits) == plan.k and plan.offset + 2 * plan.k <= pool:
        next_cursor = Cursor(0.0, hits[-1].image.id, plan.offset + plan.k, 0,
                             plan.fingerprint).encode()
    return SearchResult(hits=hits, plan=explained, next_cursor=next_cursor)
