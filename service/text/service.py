"""Text domain SQL: ranked sides `(image_id, score)` for words, by full text or label bridge.

Each side takes the candidate conditions of the search that asks (ready, collection, filter,
not the query image); search's text and hybrid strategies (service/search/strategies/) page
and fuse them. CLIP's side is a vector search, so it lives with search.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import Integer, String, bindparam, exists, func, literal, literal_column, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Subquery

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.errors import ApiError
from service.images.models import Image
from service.text.models import CLASSES, ImageClasses

if TYPE_CHECKING:
    from service.text.vocabulary import HeadVocabulary


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
    # onnx and onnxruntime (about a second) load only for searches that need a model.
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
