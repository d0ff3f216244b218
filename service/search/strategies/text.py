"""Words: full text (tsvector), the label bridge (semantic), or a CLIP text encoder.

Every mode is a ranked SQL side `(image_id, score)` under the same candidate conditions as
image search (ready, collection, filter, not the query image); a text query alone is that
side, paged with LIMIT/OFFSET. The SQL of the full-text and semantic sides is the text
domain's (service/text/service.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Subquery

from service.embedding.models import EmbeddingModel
from service.errors import ApiError
from service.images.models import Image
from service.search.sql import plan_conditions, ranked_side
from service.search.types import (
    Cursor,
    QueryPlan,
    SearchHit,
    SearchPlan,
    SearchResult,
    TextQuery,
)
from service.search.vectors import search_vectors
from service.text.service import fulltext_side, semantic_text_side

TEXT_MODES = ("fulltext", "semantic", "clip")
MAX_TEXT_CHARS = 1000


def _words(plan: QueryPlan) -> TextQuery:
    if plan.text is None:
        raise ValueError(f"strategy {plan.strategy!r} needs words")
    return plan.text


def _clip_query(words: TextQuery, *, session: Session, name: str,
                model_dir: str) -> tuple[EmbeddingModel, Any]:
    """CLIP: the model named by the request and its text encoder's vector for the words."""
    # onnx and onnxruntime (about a second) load only for searches that need a model.
    from service.embedding.service import find_model
    from service.text.clip import encode_text

    vector = encode_text(words.as_sent, model_dir=model_dir, model_name=name)
    model = find_model(name, session=session)
    if model is None:
        raise ApiError("unknown_model", f"no images have been embedded with model {name!r}")
    if vector.shape != (model.dim,):
        raise ApiError("invalid_model", f"the text encoder of {name!r} gives {vector.size} "
                       f"numbers, its image vectors have {model.dim}")
    return model, vector


def text_side(plan: QueryPlan, *, session: Session, conditions: list[ColumnElement[bool]],
              limit: int) -> tuple[Subquery, SearchPlan]:
    """The words' ranked side (at most `limit` rows) and the explain record that names it."""
    words = _words(plan)
    explained = SearchPlan(method=words.mode, metric="ts_rank")
    if words.mode == "fulltext":
        side = fulltext_side(words.text, session=session, conditions=conditions, limit=limit)
        explained.notes.append("websearch_to_tsquery('english') over tags, automatic tags, "
                               "file name and string metadata; ts_rank order")
    elif words.mode == "semantic":
        side, note = semantic_text_side(words.text, session=session, model_dir=plan.model_dir,
                                        name=plan.model_name, conditions=conditions,
                                        limit=limit)
        explained.metric = "label_bridge"
        explained.notes.append(note)
    else:
        clip_model, text_vector = _clip_query(words, session=session, name=plan.model_name,
                                              model_dir=plan.model_dir)
        found = search_vectors(text_vector, session=session, model=clip_model, k=limit,
                               collection=plan.collection, filter_doc=plan.filter_doc,
                               exclude_id=plan.exclude_id)
        side = ranked_side(found.hits, "text_side")
        explained.metric = "cosine"
        explained.notes.append(f"text encoder of {plan.model_name!r} against its image vectors")
    return side, explained


def score_page(session: Session, side: Subquery, score: Any, *, k: int, offset: int,
               min_score: float | None) -> list[SearchHit]:
    """One page of a scored side, best first, ties by id (distance: the negated score)."""
    statement = (select(Image, score.label("score"))
                 .join(side, side.c.image_id == Image.id)
                 .order_by(score.desc(), Image.id).offset(offset).limit(k))
    hits = [SearchHit(image=image, distance=-float(s), score=float(s))
            for image, s in session.execute(statement).all()]
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return hits


def search(plan: QueryPlan, *, session: Session) -> SearchResult:
    """A search by words alone, paged by offset."""
    side, explained = text_side(plan, session=session, conditions=plan_conditions(plan),
                                limit=plan.offset + plan.k)
    hits = score_page(session, side, side.c.score, k=plan.k, offset=plan.offset,
                      min_score=plan.min_score)
    next_cursor = None
    if len(hits) == plan.k:
        next_cursor = Cursor(0.0, hits[-1].image.id, plan.offset + plan.k, 0,
                             plan.fingerprint).encode()
    return SearchResult(hits=hits, plan=explained, next_cursor=next_cursor)
