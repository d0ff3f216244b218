"""Embedding domain functions: model rows, per-model indexes, and embedding images."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import (
    ColumnElement,
    Text,
    cast,
    column,
    func,
    literal,
    select,
    update,
    values,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex

from service.embedding.models import EmbeddingModel, ImageEmbedding, hnsw_index, hnsw_index_name
from service.embedding.registry import ModelInfo
from service.embedding.session import get_embedder
from service.images.decode import ImageDecodeError
from service.images.models import Image
from service.images.storage import MISSING_ORIGINAL, ContentMissing, ContentStore

log = logging.getLogger(__name__)

_FIVE_DIGITS = "%.5g".__mod__


class PermanentEmbedError(Exception):
    """Embedding this image can never succeed (e.g. undecodable bytes)."""


# Callers that only need the name of a model's index.
index_name = hnsw_index_name


def ensure_model_row(info: ModelInfo, *, session: Session) -> EmbeddingModel:
    """The `models` row of an installed model, created with its HNSW index on first use."""
    row = session.scalar(select(EmbeddingModel).where(
        EmbeddingModel.name == info.name, EmbeddingModel.version == info.version))
    if row is not None:
        return row
    session.execute(
        insert(EmbeddingModel)
        .values(name=info.name, version=info.version, dim=info.dim, sha256=info.sha256)
        .on_conflict_do_nothing(constraint="uq_models_name_version")
    )
    row = session.scalar(select(EmbeddingModel).where(
        EmbeddingModel.name == info.name, EmbeddingModel.version == info.version))
    assert row is not None
    ensure_indexes(row, session=session)
    session.commit()
    return row


def ensure_indexes(model: EmbeddingModel, *, session: Session) -> None:
    """Create the model's partial HNSW index (cosine, or L1/Hamming if hand-crafted)."""
    from service.features.models import index_metric

    index = hnsw_index(int(model.id), int(model.dim), index_metric(model.name))
    session.execute(CreateIndex(index, if_not_exists=True))


def find_model(name: str, *, session: Session) -> EmbeddingModel | None:
    """The newest registered version of a model name."""
    return session.scalar(select(EmbeddingModel).where(EmbeddingModel.name == name)
                          .order_by(EmbeddingModel.id.desc()).limit(1))


def halfvec_literal(vector: np.ndarray) -> ColumnElement[Any]:
    """A vector as a halfvec SQL value, written as text with five significant digits.

    Five digits round-trip every float16 exactly, and formatting them costs a third of the
    pgvector adapter's shortest-repr text (a visible share of bulk ingestion's CPU).
    """
    body = ",".join(map(_FIVE_DIGITS, np.asarray(vector, dtype=np.float32).tolist()))
    return cast(literal(f"[{body}]", Text()), HALFVEC())


def save_vectors(model: EmbeddingModel, pairs: list[tuple[uuid.UUID, np.ndarray]], *,
                 session: Session, logits: np.ndarray | None = None) -> None:
    """Upsert vectors and mark their images ready, in one statement each."""
    if not pairs:
        return
    tags: dict[uuid.UUID, list[dict[str, object]]] = {}
    if logits is not None:  # class probabilities and automatic tags, same rows
        from service.text.labels import save_labels

        tags = save_labels(model, [(image_id, row) for (image_id, _), row
                                   in zip(pairs, logits, strict=True)],
                           session=session, set_tags=False)
    stmt = insert(ImageEmbedding).values(
        [{"image_id": image_id, "model_id": model.id, "vector": halfvec_literal(vec)}
         for image_id, vec in pairs]
    )
    session.execute(stmt.on_conflict_do_update(
        index_elements=["image_id", "model_id"], set_={"vector": stmt.excluded.vector}))
    if tags:
        # Ready and tagged in one UPDATE … FROM (VALUES …): one new version of each row.
        rows = values(column("id", PG_UUID(as_uuid=True)), column("tags", JSONB),
                      name="tagged").data([(image_id, tags.get(image_id))
                                           for image_id, _ in pairs])
        session.execute(update(Image).where(Image.id == rows.c.id).values(
            status="ready", error=None,
            auto_tags=func.coalesce(rows.c.tags, Image.auto_tags)))
        return
    ids = [image_id for image_id, _ in pairs]
    # Only rows not ready yet: a second model's vectors (reindex, hand-crafted or region models)
    # must not rewrite every image row, with its tsvector and index entries, for nothing.
    session.query(Image).filter(Image.id.in_(ids), Image.status != "ready").update(
        {Image.status: "ready", Image.error: None}, synchronize_session=False)


def embed_image(image_id: uuid.UUID, *, session: Session, store: ContentStore,
                model_dir: str | Path, model_name: str, max_pixels: int) -> str:
    """Embed one stored image with a model; idempotent. Returns the image's final status."""
    image = session.get(Image, image_id)
    if image is None:
        return "deleted"
    embedder = get_embedder(model_dir, model_name)
    model = ensure_model_row(embedder.info, session=session)
    done = session.scalar(select(ImageEmbedding.image_id).where(
        ImageEmbedding.image_id == image_id, ImageEmbedding.model_id == model.id))
    if done is not None and image.status == "ready":
        return "ready"
    try:
        data = store.get(image.sha256)
    except ContentMissing as exc:
        raise PermanentEmbedError(MISSING_ORIGINAL) from exc
    try:
        result = embedder.embed_bytes([data], max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise PermanentEmbedError(exc.message) from exc
    save_vectors(model, [(image.id, result.vectors[0])], session=session,
                 logits=result.logits)
    # Vectors of enabled hand-crafted and region models, in the same transaction,
    # so that a ready image has them all.
    from service.features.models import save_derived

    save_derived([(image.id, data)], session=session, embedder=embedder, max_pixels=max_pixels)
    session.commit()
    return "ready"


def embed_query(data: bytes, *, model_dir: str | Path, model_name: str,
                max_pixels: int) -> tuple[ModelInfo, np.ndarray]:
    """Embed an uploaded query image in this process."""
    from service.features.models import derived_query_vector, is_derived

    if is_derived(model_name):  # hand-crafted features and region vectors
        return derived_query_vector(model_name, data, model_dir=model_dir, max_pixels=max_pixels)
    embedder = get_embedder(model_dir, model_name)
    return embedder.info, embedder.embed_bytes([data], max_pixels=max_pixels).vectors[0]


def stored_vector(image_id: uuid.UUID, model: EmbeddingModel, *,
                  session: Session) -> np.ndarray | None:
    """The stored vector of an image under a model, if it has one."""
    vec = session.scalar(select(ImageEmbedding.vector).where(
        ImageEmbedding.image_id == image_id, ImageEmbedding.model_id == model.id))
    return None if vec is None else np.asarray(vec, dtype=np.float32)
