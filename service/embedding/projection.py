"""Compact index vectors: each vector projected on its model's principal directions.

At a million 1280-d vectors the HNSW graph (3.9 GiB) outgrows shared_buffers and every query
pages, and a filtered scan reads 2.5 KB a row. Projected on the top 256 principal directions
of a sample of the model's own vectors (not centred: cosine between the projections tracks
cosine between the vectors; centring lost recall, docs/benchmarks.md), the compact rows are a
fifth of the size; search walks or scans them for candidates and re-ranks those on the full
vector, so the final order is still the exact one. The projection is fitted once a model
has PROJECTION_MIN_ROWS vectors; until its fill is done, search keeps the full-vector path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import Text, cast, column, func, select, text, update, values
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex

from service.embedding.models import (
    EmbeddingModel,
    ImageEmbedding,
    IndexProjection,
    compact_index,
    compact_index_name,
)

COMPACT_DIM = 256
# Fewer vectors than this: exact scans are cheap and a fit would rest on too few samples.
PROJECTION_MIN_ROWS = 2_000
FIT_SAMPLE_ROWS = 20_000
FILL_BATCH = 2_000
# Models whose vectors are small already gain nothing from a projection.
MIN_MODEL_DIM = 2 * COMPACT_DIM
# The first key of the advisory lock that one preparation of a model holds ("cmpt").
LOCK_KIND = 0x636D7074
# How long a process trusts what it read of a model's projection.
CACHE_SECONDS = 5.0


def fit_components(vectors: np.ndarray, dim: int = COMPACT_DIM) -> np.ndarray:
    """The top `dim` principal directions (dim x d, float32) of unit-normalised rows."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    return np.ascontiguousarray(vt[: min(dim, vt.shape[0])], dtype=np.float32)


def project(vectors: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Unit-normalised projections of unit-normalised rows (float32); zero rows stay zero."""
    x = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    out = x @ components.T
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def eligible(model: EmbeddingModel) -> bool:
    """Whether a model's vectors are large enough to get a compact form."""
    return int(model.dim) >= MIN_MODEL_DIM


@dataclass(frozen=True)
class Compact:
    """A model's projection as this process uses it."""

    model_id: int
    dim: int
    status: str
    components: np.ndarray
    # (row id, fitted at): a refit gets a new row, so the components are read again.
    stamp: tuple[int, object] = (0, None)


_cache: dict[int, tuple[float, Compact | None]] = {}


def current(model: EmbeddingModel, *, session: Session) -> Compact | None:
    """The model's projection (any status), read at most every CACHE_SECONDS per process."""
    now = time.monotonic()
    hit = _cache.get(int(model.id))
    if hit is not None and now - hit[0] < CACHE_SECONDS:
        return hit[1]
    row = session.execute(select(IndexProjection.id, IndexProjection.status,
                                 IndexProjection.dim, IndexProjection.created_at).where(
        IndexProjection.model_id == model.id)).one_or_none()
    found: Compact | None = None
    if row is not None:
        stamp = (int(row.id), row.created_at)
        old = hit[1] if hit is not None else None
        if old is not None and old.stamp == stamp:
            components = old.components
        else:
            blob = session.scalar(select(IndexProjection.components).where(
                IndexProjection.id == row.id))
            components = np.frombuffer(blob, dtype=np.float32).reshape(int(row.dim), -1)
        found = Compact(int(model.id), int(row.dim), str(row.status), components, stamp)
    _cache[int(model.id)] = (now, found)
    return found


def forget(model_id: int) -> None:
    """Drop this process's cached projection of a model (after a fit or a status change)."""
    _cache.pop(int(model_id), None)


def ready(model: EmbeddingModel, *, session: Session) -> Compact | None:
    """The model's projection if search may use its compact vectors."""
    found = current(model, session=session)
    return found if found is not None and found.status == "ready" else None


def compact_values(model: EmbeddingModel, vectors: np.ndarray, *,
                   session: Session) -> np.ndarray | None:
    """Compact forms of vectors about to be written, when the model has a projection."""
    found = current(model, session=session)
    return None if found is None else project(vectors, found.components)


def has_enough_rows(model: EmbeddingModel, *, session: Session) -> bool:
    """Whether the model has PROJECTION_MIN_ROWS vectors (counts no further)."""
    capped = select(ImageEmbedding.image_id).where(
        ImageEmbedding.model_id == model.id).limit(PROJECTION_MIN_ROWS).subquery()
    return (session.scalar(select(func.count()).select_from(capped)) or 0) >= PROJECTION_MIN_ROWS


def fit(model: EmbeddingModel, *, session: Session, dim: int = COMPACT_DIM) -> IndexProjection:
    """Fit the model's projection on a sample of its vectors and store it (status filling)."""
    existing = session.scalar(select(IndexProjection).where(
        IndexProjection.model_id == model.id))
    if existing is not None:
        return existing
    # Image ids are random (uuid4): the first rows in id order are a random sample.
    rows = session.scalars(select(ImageEmbedding.vector).where(
        ImageEmbedding.model_id == model.id).order_by(ImageEmbedding.image_id)
        .limit(FIT_SAMPLE_ROWS)).all()
    sample = np.asarray([np.asarray(r, dtype=np.float32) for r in rows])
    components = fit_components(sample, dim)
    row = IndexProjection(model_id=int(model.id), dim=int(components.shape[0]),
                          components=components.tobytes(), fitted_rows=len(sample))
    session.add(row)
    session.flush()
    forget(int(model.id))
    return row


def fill(model: EmbeddingModel, *, session: Session, batch: int = FILL_BATCH) -> int:
    """Write the compact form of every vector of the model that has none; commits per batch."""
    found = current(model, session=session)
    if found is None:
        return 0
    done = 0
    while True:
        rows = session.execute(select(ImageEmbedding.image_id, ImageEmbedding.vector).where(
            ImageEmbedding.model_id == model.id, ImageEmbedding.compact.is_(None))
            .limit(batch)).all()
        if not rows:
            return done
        compact = project(np.asarray([np.asarray(v, dtype=np.float32) for _, v in rows]),
                          found.components)
        data = values(column("image_id", PG_UUID(as_uuid=True)), column("compact", Text()),
                      name="filled").data([(image_id, literal_vector(c))
                                           for (image_id, _), c in zip(rows, compact,
                                                                       strict=True)])
        session.execute(update(ImageEmbedding).where(
            ImageEmbedding.model_id == model.id, ImageEmbedding.image_id == data.c.image_id)
            .values(compact=cast(data.c.compact, HALFVEC())))
        session.commit()
        done += len(rows)


def literal_vector(vector: np.ndarray) -> str:
    """A vector as pgvector's text form."""
    return "[" + ",".join(f"{v:.5g}" for v in np.asarray(vector, dtype=np.float32).tolist()) + "]"


def build_index(model: EmbeddingModel, dim: int, *, connection: Connection,
                maintenance_work_mem: str | None = None) -> None:
    """Build the compact HNSW index without blocking writers; an invalid leftover is rebuilt.

    `connection` must be in autocommit and hold no transaction: CREATE INDEX CONCURRENTLY
    waits for every transaction older than itself.
    """
    name = compact_index_name(int(model.id))
    invalid = connection.scalar(text(
        "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = :name"), {"name": name})
    if invalid:
        connection.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
    if maintenance_work_mem:
        connection.execute(text("SELECT set_config('maintenance_work_mem', :m, false)"),
                           {"m": maintenance_work_mem})
    ddl = CreateIndex(compact_index(int(model.id), dim), if_not_exists=True)
    statement = str(ddl.compile(dialect=connection.dialect)).replace(
        "CREATE INDEX", "CREATE INDEX CONCURRENTLY", 1)
    connection.execute(text(statement))


def mark(model: EmbeddingModel, status: str, *, session: Session,
         error: str | None = None) -> None:
    """Set the projection's status (and reason) and commit."""
    session.execute(update(IndexProjection).where(IndexProjection.model_id == model.id)
                    .values(status=status, error=error, updated_at=func.now()))
    session.commit()
    forget(int(model.id))



def prepare(model_id: int, *, session: Session,
            maintenance_work_mem: str = "1GB") -> str:
    """Fit, fill and index a model's compact vectors, then let search use them; idempotent.

    The fill commits per batch and the index is built CONCURRENTLY on a connection of its
    own, so uploads go on meanwhile; what they wrote without a compact form (a process
    still trusting its cached "no projection") is filled after the build.
    """
    model = session.get(EmbeddingModel, int(model_id))
    if model is None or not eligible(model):
        return "skipped"
    if current(model, session=session) is None and not has_enough_rows(model, session=session):
        return "too few"
    bind = session.get_bind()
    session.commit()
    # A session lock on a connection of its own, held throughout: the sweeper may send this
    # task again while a long fill runs. The build runs on it too: it holds no transaction.
    with bind.connect().execution_options(isolation_level="AUTOCOMMIT") as guard:
        if not guard.scalar(text("SELECT pg_try_advisory_lock(:kind, :id)"),
                            {"kind": LOCK_KIND, "id": int(model.id)}):
            return "busy"
        try:
            row = fit(model, session=session)
            dim, status = int(row.dim), str(row.status)
            session.commit()
            fill(model, session=session)
            if status != "ready":
                session.commit()  # no transaction of ours stays open: the build waits for those
                build_index(model, dim, connection=guard,
                            maintenance_work_mem=maintenance_work_mem)
                fill(model, session=session)
                mark(model, "ready", session=session)
        finally:
            guard.execute(text("SELECT pg_advisory_unlock(:kind, :id)"),
                          {"kind": LOCK_KIND, "id": int(model.id)})
    return "ready"


def due(*, session: Session) -> list[int]:
    """Models that should have compact vectors and do not have ready ones (the sweeper's)."""
    models = session.scalars(select(EmbeddingModel).where(
        EmbeddingModel.dim >= MIN_MODEL_DIM, EmbeddingModel.id.not_in(
            select(IndexProjection.model_id).where(IndexProjection.status == "ready")))).all()
    return [int(m.id) for m in models if has_enough_rows(m, session=session)]
