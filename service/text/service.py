"""Text search domain functions: full text, the label bridge, CLIP, and RRF hybrids.

Every text mode produces a ranked SQL side `(image_id, score)` under the same candidate
conditions as image search (ready, collection, filter, not the query image). A text query
alone is that side, paged with LIMIT/OFFSET. With an image query too, the image side's ranked
ids (from the planned vector search) and the text side are fused in one SQL statement by
reciprocal rank fusion: score = w / (60 + text rank) + (1 - w) / (60 + image rank).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import (
    Float,
    Integer,
    String,
    bindparam,
    cast,
    exists,
    func,
    literal,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Subquery

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.errors import ApiError
from service.images.models import Image
from service.search.filters import compile_filter
from service.search.service import (
    Cursor,
    SearchHit,
    SearchOutcome,
    SearchPlan,
    SearchResult,
    candidate_conditions,
    fingerprint,
    query_source,
    search_vectors,
)
from service.text.models import CLASSES, ImageClasses

if TYPE_CHECKING:
    from service.search.service import SearchRequest
    from service.text.vocabulary import HeadVocabulary

TEXT_MODES = ("fulltext", "semantic", "clip")
RRF_K = 60
# Each side of a hybrid contributes this many ranked rows at least (4k for larger k): a row
# that only one side ranks still gets its share, and pages stay within one fused pool.
RRF_POOL = 100
MAX_POOL = 1000
MAX_TEXT_CHARS = 1000


def _tsquery(text: str) -> Any:
    # The configuration is a constant of ours; the user's words are a bound parameter.
    return func.websearch_to_tsquery(literal_column("'english'::regconfig"),
                                     literal(text, String))


def fulltext_side(text: str, *, session: Session, conditions: list[Any],
                  limit: int) -> Subquery:
    """Images whose tags, automatic tags, file name or string metadata match the words."""
    if not session.scalar(select(func.numnode(_tsquery(text)))):
        raise ApiError("invalid_query", "text has no searchable words (only stop words?)")
    query = _tsquery(text)
    score = func.ts_rank(Image.search_text, query)
    return (select(Image.id.label("image_id"), score.label("score"))
            .where(Image.search_text.op("@@")(query), *conditions)
            .order_by(score.desc(), Image.id).limit(limit).subquery("text_side"))


def semantic_side(weights: np.ndarray, *, model: EmbeddingModel, conditions: list[Any],
                  limit: int) -> Subquery:
    """Images ranked by their class probabilities weighted by the words' label similarities."""
    query = bindparam("label_weights", np.asarray(weights, np.float32), type_=HALFVEC(CLASSES))
    negative_ip = ImageClasses.probs.max_inner_product(query)
    return (select(ImageClasses.image_id.label("image_id"), (-negative_ip).label("score"))
            .join(Image, Image.id == ImageClasses.image_id)
            .where(ImageClasses.model_id == int(model.id), *conditions)
            .order_by(negative_ip, Image.id).limit(limit).subquery("text_side"))


def head_side(weights: np.ndarray, *, vocabulary: HeadVocabulary, model: EmbeddingModel,
              conditions: list[Any], limit: int) -> Subquery:
    """Images ranked by the class slice of a head model's vectors weighted by the query's
    similarities to the head's class names (service.text.vocabulary)."""
    count = vocabulary.count
    query = bindparam("class_weights", np.asarray(weights, np.float32), type_=HALFVEC(count))
    probs = func.subvector(ImageEmbedding.vector,
                           bindparam("class_start", vocabulary.start, type_=Integer),
                           bindparam("class_count", count, type_=Integer), type_=HALFVEC(count))
    negative_ip = probs.max_inner_product(query)
    return (select(ImageEmbedding.image_id.label("image_id"), (-negative_ip).label("score"))
            .join(Image, Image.id == ImageEmbedding.image_id)
            .where(ImageEmbedding.model_id == int(model.id), *conditions)
            .order_by(negative_ip, Image.id).limit(limit).subquery("text_side"))


def has_imagenet_classes(model: EmbeddingModel, *, session: Session) -> bool:
    """Whether any image has stored ImageNet class probabilities under the model."""
    return bool(session.scalar(select(exists().where(ImageClasses.model_id == int(model.id)))))


def semantic_text_side(text: str, *, session: Session, model_dir: str, name: str,
                       conditions: list[Any], limit: int) -> tuple[Subquery, str]:
    """The label bridge through the model's vocabulary, and a plan note that names it.

    A fine-tuned head with classes: its own class names; any other model (base models, PCA
    heads): the 1,000 ImageNet classes of its stored probabilities; neither: a 400.
    """
    from service.embedding import service as embedding
    from service.text.sentence import label_weights
    from service.text.vocabulary import head_vocabulary, vocabulary_weights

    model = embedding.find_model(name, session=session)
    if model is None:
        raise ApiError("unknown_model", f"no images have been embedded with model {name!r}")
    vocabulary = head_vocabulary(model_dir, name)
    if vocabulary is not None:
        if vocabulary.dim != int(model.dim):
            raise ApiError("invalid_model", f"model {name!r} is installed with {vocabulary.dim}"
                           f"-d vectors but its stored vectors are {model.dim}-d")
        weights = vocabulary_weights(text, vocabulary, model_dir=model_dir)
        shown = ", ".join(vocabulary.classes[:20]) + (", ..." if vocabulary.count > 20 else "")
        note = (f"vocabulary: the {vocabulary.count} classes of head {name!r} ({shown}); "
                "query-class similarities (MiniLM) . the class probabilities stored in its "
                f"vectors (subvector({vocabulary.start}, {vocabulary.count}))")
        return head_side(weights, vocabulary=vocabulary, model=model, conditions=conditions,
                         limit=limit), note
    if not has_imagenet_classes(model, session=session):
        raise ApiError("no_vocabulary", f"model {name!r} has no classes for the semantic mode: "
                       "it is not a fine-tuned head with labels and no image has ImageNet "
                       "class probabilities under it (use a model with an ImageNet head, "
                       "`lookalike tags backfill`, or a head from `lookalike finetune`)")
    weights = label_weights(text, model_dir=model_dir)
    return semantic_side(weights, model=model, conditions=conditions, limit=limit), (
        "vocabulary: the 1,000 ImageNet classes; query-label similarities (MiniLM) . image "
        "class probabilities")


def ranked_side(hits: list[SearchHit], name: str) -> Subquery:
    """Already ranked hits as a SQL side (image_id, score, ord) for fusion."""
    ids = bindparam(f"{name}_ids", [h.image.id for h in hits], type_=ARRAY(UUID(as_uuid=True)))
    scores = bindparam(f"{name}_scores", [h.score for h in hits], type_=ARRAY(Float))
    rows = func.unnest(ids, scores).table_valued(
        "image_id", "score", with_ordinality="ord").render_derived(name=f"{name}_rows")
    return select(rows.c.image_id, rows.c.score, rows.c.ord).subquery(name)


def _page(session: Session, side: Subquery, score: Any, *, k: int, offset: int,
          min_score: float | None) -> list[SearchHit]:
    statement = (select(Image, score.label("score"))
                 .join(side, side.c.image_id == Image.id)
                 .order_by(score.desc(), Image.id).offset(offset).limit(k))
    hits = [SearchHit(image=image, distance=-float(s), score=float(s))
            for image, s in session.execute(statement).all()]
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return hits


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
    return _page(session, fused, fused.c.score, k=k, offset=offset, min_score=min_score)


def _text_vector_model(req: SearchRequest, *, session: Session, name: str,
                       model_dir: str) -> tuple[EmbeddingModel, np.ndarray]:
    """CLIP: the model named by the request and its text encoder's vector for the words."""
    from service.embedding import service as embedding
    from service.text.clip import encode_text

    vector = encode_text(req.text or "", model_dir=model_dir, model_name=name)
    model = embedding.find_model(name, session=session)
    if model is None:
        raise ApiError("unknown_model", f"no images have been embedded with model {name!r}")
    if vector.shape != (model.dim,):
        raise ApiError("invalid_model", f"the text encoder of {name!r} gives {vector.size} "
                       f"numbers, its image vectors have {model.dim}")
    return model, vector


def run_text_search(req: SearchRequest, *, session: Session, model_dir: str, default_model: str,
                    max_pixels: int, max_k: int) -> SearchOutcome:
    """A search by words, alone or fused with an image query (RRF)."""
    from service.search.service import _query_vector

    text = (req.text or "").strip()
    if not text or len(text) > MAX_TEXT_CHARS:
        raise ApiError("invalid_query", f"text must be 1 to {MAX_TEXT_CHARS} characters")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise ApiError("invalid_query", "text must not contain control characters")
    if req.text_mode not in TEXT_MODES:
        raise ApiError("invalid_query", f"text_mode must be one of {', '.join(TEXT_MODES)}")
    if not 0.0 <= req.text_weight <= 1.0:
        raise ApiError("invalid_query", "text_weight must be between 0 and 1")
    if not 1 <= req.k <= max_k:
        raise ApiError("invalid_query", f"k must be between 1 and {max_k}")
    images = [x for x in (req.image_id, req.vector, req.file) if x is not None]
    if len(images) > 1:
        raise ApiError("invalid_query", "give at most one of image_id, vector or file with text")
    if req.index != "hnsw" or req.rerank not in (True, False):
        raise ApiError("invalid_query", "text search has no hash index or re-ranking")
    if req.filter_doc is not None:
        compile_filter(req.filter_doc)
    name = req.model or default_model
    hybrid = bool(images)
    pool = min(MAX_POOL, max(RRF_POOL, 4 * req.k))
    source = query_source(req)
    fp = fingerprint("text", name, req.text_mode, text, req.text_weight, req.collection,
                     req.filter_doc, req.min_score, req.k, source)
    cursor = Cursor.decode(req.cursor, fp) if req.cursor else None
    offset = cursor.offset if cursor else 0
    if hybrid and offset + req.k > pool:
        raise ApiError("invalid_cursor", f"hybrid results end after {pool} rows")

    exclude: uuid.UUID | None = None
    image_model: EmbeddingModel | None = None
    image_vector: np.ndarray | None = None
    if hybrid:
        image_model, image_vector, exclude = _query_vector(
            req, session=session, model_dir=model_dir, name=name, max_pixels=max_pixels)
    conditions = candidate_conditions(collection=req.collection, filter_doc=req.filter_doc,
                                      exclude_id=exclude)
    limit = pool if hybrid else offset + req.k
    plan = SearchPlan(method=req.text_mode, metric="ts_rank")
    if req.text_mode == "fulltext":
        side = fulltext_side(text, session=session, conditions=conditions, limit=limit)
        plan.notes.append("websearch_to_tsquery('english') over tags, automatic tags, file "
                          "name and string metadata; ts_rank order")
    elif req.text_mode == "semantic":
        side, note = semantic_text_side(text, session=session, model_dir=model_dir, name=name,
                                        conditions=conditions, limit=limit)
        plan.metric = "label_bridge"
        plan.notes.append(note)
    else:
        clip_model, text_vector = _text_vector_model(req, session=session, name=name,
                                                     model_dir=model_dir)
        found = search_vectors(text_vector, session=session, model=clip_model, k=limit,
                               collection=req.collection, filter_doc=req.filter_doc,
                               exclude_id=exclude)
        side = ranked_side(found.hits, "text_side")
        plan.metric = "cosine"
        plan.notes.append(f"text encoder of {name!r} against its image vectors")

    if hybrid:
        assert image_model is not None and image_vector is not None
        found = search_vectors(image_vector, session=session, model=image_model, k=pool,
                               collection=req.collection, filter_doc=req.filter_doc,
                               exclude_id=exclude)
        hits = fuse(session, side, ranked_side(found.hits, "image_side"),
                    weight=req.text_weight, k=req.k, offset=offset, min_score=req.min_score)
        plan.method, plan.metric = f"hybrid_{req.text_mode}", "rrf"
        plan.notes.append(f"RRF k={RRF_K}, text weight {req.text_weight}, {pool} rows a side")
    else:
        hits = _page(session, side, side.c.score, k=req.k, offset=offset,
                     min_score=req.min_score)
    next_cursor = None
    if len(hits) == req.k and (not hybrid or offset + 2 * req.k <= pool):
        next_cursor = Cursor(0.0, hits[-1].image.id, offset + req.k, 0, fp).encode()
    return SearchOutcome(result=SearchResult(hits=hits, plan=plan, next_cursor=next_cursor),
                         model=name, metric=plan.metric)
