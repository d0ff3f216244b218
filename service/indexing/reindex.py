"""Reindex a collection under a new model while search keeps serving the old one."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    String,
    Text,
    delete,
    exists,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.schema import DropIndex

from service.db import Base, QueuedWork
from service.embedding.defaults import default_model
from service.embedding.models import INDEX_OPS, EmbeddingModel, ImageEmbedding, hnsw_index
from service.embedding.service import ensure_model_row, save_vectors
from service.embedding.session import get_embedder
from service.embedding.transforms import batch, preprocess
from service.errors import ApiError
from service.features.models import HANDCRAFTED, REGION_SUFFIX, compute, derived_info, is_derived
from service.images.decode import ImageDecodeError
from service.images.models import Image
from service.images.storage import ContentStore
from service.text.labels import save_labels


class ReindexRun(QueuedWork, Base):
    """Filling one model's vectors for one collection."""

    __tablename__ = "reindex_runs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True,
                                          default=uuid.uuid4)
    collection: Mapped[str] = mapped_column(String(128), nullable=False)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass
class ReindexProgress:
    """Counts of a run, derived from the vectors present."""

    status: str
    total: int
    done: int
    failed: int


def _lacks_vector(model_id: int) -> ColumnElement[bool]:
    """A ready image without a vector of the model."""
    return (Image.status == "ready") & ~exists().where(ImageEmbedding.image_id == Image.id,
                                                       ImageEmbedding.model_id == model_id)


def _missing(collection: str, model_id: int) -> select:
    return select(Image.id).where(Image.collection == collection, _lacks_vector(model_id))


def start_reindex(collection: str, model_name: str, *, session: Session,
                  model_dir: str | Path) -> ReindexRun:
    """Register the model (and its index) and record a run over the collection's images."""
    # Hand-crafted and region models are computed, not loaded from an ONNX file.
    info = (derived_info(model_name, model_dir=model_dir) if is_derived(model_name)
            else get_embedder(model_dir, model_name).info)
    ensure_model_row(info, session=session)
    total = session.scalar(select(func.count()).select_from(Image).where(
        Image.collection == collection, Image.status == "ready")) or 0
    if not total:
        raise ApiError("empty_collection", f"no ready images in collection {collection!r}")
    run = ReindexRun(collection=collection, model=model_name, status="running", total=total)
    session.add(run)
    session.commit()
    return run


def reindex_step(run_id: uuid.UUID, *, session: Session, store: ContentStore,
                 model_dir: str | Path, max_pixels: int, batch_size: int = 32,
                 max_batches: int = 10) -> bool:
    """Embed up to `max_batches` batches of missing images; returns True when more remain.

    Idempotent: it only ever picks images that still lack the model's vector, so a task lost
    with its worker is simply run again.
    """
    run = session.get(ReindexRun, run_id)
    if run is None or run.status != "running":
        return False
    # This chain is alive: the sweeper re-sends only runs whose chain stopped.
    run.sent_at = datetime.now(UTC)
    session.commit()
    if is_derived(run.model):  # hand-crafted features and region vectors
        return reindex_derived(run_id, session=session, store=store, model_dir=model_dir,
                               max_pixels=max_pixels, batch_size=batch_size,
                               max_batches=max_batches)
    embedder = get_embedder(model_dir, run.model)
    model = ensure_model_row(embedder.info, session=session)
    failed_ids: set[uuid.UUID] = set()
    for _ in range(max_batches):
        rows = session.execute(
            select(Image.id, Image.sha256).where(Image.id.in_(_missing(run.collection,
                                                                        model.id)))
            .where(Image.id.not_in(failed_ids) if failed_ids else text("true"))
            .order_by(Image.id).limit(batch_size)).all()
        if not rows:
            run.status, run.finished_at = "done", datetime.now(UTC)
            session.commit()
            return False
        good, arrays = [], []
        for image_id, sha in rows:
            try:
                arrays.append(preprocess(store.get(sha), embedder.info.preprocessing,
                                         max_pixels=max_pixels))
            except (OSError, ImageDecodeError):
                failed_ids.add(image_id)  # counted, and not picked again by this step
                run.failed += 1
                continue
            good.append(image_id)
        if good:
            out = embedder.run(batch(arrays))
            tags = {} if out.logits is None else save_labels(
                model, list(zip(good, out.logits, strict=True)), session=session,
                set_tags=False)
            save_vectors(model, list(zip(good, out.vectors, strict=True)), session=session,
                         tags=tags)
        session.commit()
    return True


def reindex_derived(run_id: uuid.UUID, *, session: Session, store: ContentStore,
                    model_dir: str | Path, max_pixels: int, batch_size: int = 32,
                    max_batches: int = 10) -> bool:
    """reindex_step for a derived model: fill its missing vectors; True when more remain."""
    run = session.get(ReindexRun, run_id)
    if run is None or run.status != "running":
        return False
    embedder = (None if run.model in HANDCRAFTED
                else get_embedder(model_dir, run.model.removesuffix(REGION_SUFFIX)))
    model = ensure_model_row(derived_info(run.model, model_dir=model_dir), session=session)
    skipped: set[uuid.UUID] = set()
    for _ in range(max_batches):
        query = select(Image.id, Image.sha256).where(
            Image.id.in_(_missing(run.collection, model.id)))
        if skipped:
            query = query.where(Image.id.not_in(skipped))
        rows = session.execute(query.order_by(Image.id).limit(batch_size)).all()
        if not rows:
            run.status, run.finished_at = "done", datetime.now(UTC)
            session.commit()
            return False
        items: list[tuple[uuid.UUID, bytes]] = []
        for image_id, sha in rows:
            try:
                items.append((image_id, store.get(sha)))
            except OSError:
                skipped.add(image_id)
                run.failed += 1
        vectors = compute([run.model], [d for _, d in items], embedder=embedder,
                          max_pixels=max_pixels)[run.model]
        good = [(items[i][0], v) for i, v in enumerate(vectors) if v is not None]
        for i, v in enumerate(vectors):
            if v is None:
                skipped.add(items[i][0])
                run.failed += 1
        save_vectors(model, good, session=session)
        session.commit()
    return True


def progress(run_id: uuid.UUID, *, session: Session) -> ReindexProgress:
    """Status and counts of a run."""
    run = session.get(ReindexRun, run_id)
    if run is None:
        raise ApiError("not_found", f"no reindex run {run_id}", status=404)
    model = session.scalar(select(EmbeddingModel).where(EmbeddingModel.name == run.model)
                           .order_by(EmbeddingModel.id.desc()).limit(1))
    missing = session.scalar(select(func.count()).select_from(
        _missing(run.collection, model.id).subquery())) if model else run.total
    return ReindexProgress(status=run.status, total=run.total,
                           done=max(0, run.total - int(missing or 0)), failed=run.failed)


def unindexed(model_id: int, *, session: Session) -> dict[str, int]:
    """Ready images that have no vector of the model, per collection, most first."""
    rows = session.execute(select(Image.collection, func.count())
                           .where(_lacks_vector(model_id))
                           .group_by(Image.collection)
                           .order_by(func.count().desc(), Image.collection)).all()
    return {collection: int(count) for collection, count in rows}


def drop_model(name: str, *, session: Session) -> int:
    """Delete a model's vectors, rows and indexes; the default model cannot be dropped."""
    if name == default_model(session=session):
        raise ApiError("is_default", f"{name!r} is the default model; switch first")
    rows = list(session.scalars(select(EmbeddingModel).where(EmbeddingModel.name == name)))
    if not rows:
        raise ApiError("unknown_model", f"no model {name!r} is registered")
    for row in rows:
        for metric in INDEX_OPS:
            session.execute(DropIndex(hnsw_index(row.id, row.dim, metric), if_exists=True))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.id == row.id))
    session.commit()
    return len(rows)
