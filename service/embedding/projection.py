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
from sqlalchemy import (
    func,
    select,
    update,
)
from sqlalchemy.orm import Session

from service.embedding.models import (
    EmbeddingModel,
    ImageEmbedding,
    IndexProjection,
)

COMPACT_DIM = 256
# Fewer vectors than this: exact scans are cheap and a fit would rest on too few samples.
PROJECTION_MIN_ROWS = 2_000
FIT_SAMPLE_ROWS = 20_000
FILL_BATCH = 10_000
# Models whose vectors are small already gain nothing from a projection.
MIN_MODEL_DIM = 2 * COMPACT_DIM
# The first key of the advisory lock that one preparation of a model holds ("cmpt").
LOCK_KIND = 0x636D7074
# How long a process trusts what it read of a model's projection.
CACHE_SECONDS = 5.0


def fit_components(vectors: np.ndarray, dim: int = COMPACT_DIM) -> np.ndarray:
    """The top `dim` principal directions (dim x d, float32) of unit-normalised rows."""
    x = np.asarray(vectors, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(axis=0)
    # The covariance's eigenvectors: a d x d problem, a fraction of an SVD of the sample.
    values, vectors_ = np.linalg.eigh((x.T @ x).astype(np.float64))
    order = np.argsort(values)[::-1][: min(dim, len(x) - 1, x.shape[1])]
    return np.ascontiguousarray(vectors_[:, order].T, dtype=np.float32)


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


def mark(model: EmbeddingModel, status: str, *, session: Session,
         error: str | None = None) -> None:
    """Set the projection's status (and reason) and commit."""
    session.execute(update(IndexProjection).where(IndexProjection.model_id == model.id)
                    .values(status=status, error=error, updated_at=func.now()))
    session.commit()
    forget(int(model.id))



