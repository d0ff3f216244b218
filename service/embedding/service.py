"""Embedding domain functions: model rows, per-model indexes, vectors, query vectors."""

from __future__ import annotations

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

from service.embedding.indexes import request_build, send_builds
from service.embedding.models import (
    EmbeddingModel,
    ImageEmbedding,
    hnsw_index,
    hnsw_index_name,
    index_metric,
)
from service.embedding.projection import compact_values
from service.embedding.registry import ModelInfo
from service.embedding.session import get_embedder
from service.images.models import Image

_FIVE_DIGITS = "%.5g".__mod__


# Callers that only need the name of a model's index.
index_name = hnsw_index_name


def ensure_model_row(info: ModelInfo, *, session: Session) -> EmbeddingModel:
    """The `models` row of an installed model; on first use, commits it and sends its index build.

    The HNSW index is built CONCURRENTLY by a task (service/embedding/indexes.py), after this
    commit: a plain CREATE INDEX here held every insert into the vectors behind it.
    """
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
    build = ensure_indexes(row, session=session, metric=index_metric(info))
    session.commit()
    send_builds([build])
    return row


def ensure_indexes(model: EmbeddingModel, *, session: Session,
                   metric: str = "cosine") -> int | None:
    """Ask for the model's partial HNSW index (cosine, or L1/Hamming if hand-crafted).

    Returns the build to send (`send_builds`) once the caller has committed, None if it is
    asked for already; nothing is built inside the caller's transaction.
    """
    index = hnsw_index(int(model.id), int(model.dim), metric)
    return request_build(index, model_id=int(model.id), session=session)


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
                 session: Session, tags: dict[uuid.UUID, list[dict[str, object]]] | None = None,
                 mark_ready: bool = True) -> None:
    """Upsert vectors (with their compact forms) and, unless told not to, mark images ready."""
    if not pairs:
        return
    if mark_ready:
        # Before the vectors: their insert trigger then copies the ready status, instead of
        # the image's update rewriting each vector row a second time.
        _mark_ready(pairs, session=session, tags=tags)
    compact = compact_values(model, np.asarray([vec for _, vec in pairs]), session=session)
    rows = []
    for i, (image_id, vec) in enumerate(pairs):
        row = {"image_id": image_id, "model_id": model.id, "vector": halfvec_literal(vec)}
        if compact is not None:
            row["compact"] = halfvec_literal(compact[i])
        rows.append(row)
    stmt = insert(ImageEmbedding).values(rows)
    changed = {"vector": stmt.excluded.vector}
    if compact is not None:
        changed["compact"] = stmt.excluded.compact
    session.execute(stmt.on_conflict_do_update(index_elements=["image_id", "model_id"],
                                               set_=changed))


def _mark_ready(pairs: list[tuple[uuid.UUID, np.ndarray]], *, session: Session,
                tags: dict[uuid.UUID, list[dict[str, object]]] | None) -> None:
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


def embed_query(data: bytes, *, model_dir: str | Path, model_name: str,
                max_pixels: int) -> tuple[ModelInfo, np.ndarray]:
    """Embed an uploaded query image with a CNN model in this process."""
    embedder = get_embedder(model_dir, model_name)
    return embedder.info, embedder.embed_bytes([data], max_pixels=max_pixels).vectors[0]


def stored_vector(image_id: uuid.UUID, model: EmbeddingModel, *,
                  session: Session) -> np.ndarray | None:
    """The stored vector of an image under a model, if it has one."""
    vec = session.scalar(select(ImageEmbedding.vector).where(
        ImageEmbedding.image_id == image_id, ImageEmbedding.model_id == model.id))
    return None if vec is None else np.asarray(vec, dtype=np.float32)
