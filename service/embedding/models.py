"""ORM models of embedding models and the vectors they produce."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from pgvector.sqlalchemy import BIT, HALFVEC
from sqlalchemy import (
    CheckConstraint,
    Column,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    cast,
    func,
    literal_column,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, QueuedWork

if TYPE_CHECKING:
    from service.embedding.registry import ModelInfo

INDEX_OPS = {"cosine": "halfvec_cosine_ops", "l1": "halfvec_l1_ops", "hamming": "bit_hamming_ops"}
HNSW_BUILD = {"m": 16, "ef_construction": 64}
# Where a model record names the metric of its HNSW index when it is not cosine: the models
# computed beside the CNN (service/features) say so in the record they build.
INDEX_METRIC = "index_metric"


class EmbeddingModel(Base):
    """An installed model version; each has its own HNSW index over its vectors."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    version: Mapped[str] = mapped_column(String(64), nullable=False)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class ImageEmbedding(Base):
    """The vector of one image under one model, with its image's filter columns.

    The column has no fixed dimension so that models of any size share the table;
    each model gets a partial HNSW index over `vector::halfvec(dim)`. `collection`, `status`,
    `meta` and `image_created_at` are the image's, copied by triggers (migration 0012) so that
    a filtered search reads one table; `compact` is the vector's projection
    (service/embedding/projection.py), NULL until the model has one.
    """

    __tablename__ = "image_embeddings"
    __table_args__ = (
        Index("ix_image_embeddings_metadata", "metadata", postgresql_using="gin",
              postgresql_ops={"metadata": "jsonb_path_ops"}),
        Index("ix_image_embeddings_model_collection", "model_id", "collection"),
        Index("ix_image_embeddings_uncompacted", "model_id",
              postgresql_where=literal_column("compact IS NULL")),
    )

    image_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    vector: Mapped[list[float]] = mapped_column(HALFVEC(), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # Filled by the insert trigger from the image row, never by the ORM.
    collection: Mapped[str] = mapped_column(String(128), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    meta: Mapped[dict] = mapped_column("metadata", JSONB, nullable=False)
    image_created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                       nullable=False)
    compact: Mapped[list[float] | None] = mapped_column(HALFVEC())


class IndexProjection(QueuedWork, Base):
    """A model's projection on its principal directions, which fills `compact` (dim x model dim).

    `filling` until every vector of the model has its compact form and the compact index is
    built; search uses the compact path only once `ready`.
    """

    __tablename__ = "index_projections"
    __table_args__ = (CheckConstraint("status IN ('filling', 'ready', 'failed')",
                                      name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False, unique=True)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    components: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    fitted_rows: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="filling")
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())


class IndexBuild(QueuedWork, Base):
    """A runtime HNSW index that should exist, built CONCURRENTLY by a task of its own.

    `ddl` is the CREATE INDEX CONCURRENTLY IF NOT EXISTS statement, compiled by the package
    that owns the index (a model's here, a code set's in hashing); `pending` until the index
    is valid, and again when the sweeper finds it INVALID or missing
    (service/embedding/indexes.py).
    """

    __tablename__ = "index_builds"
    __table_args__ = (CheckConstraint("status IN ('pending', 'ready', 'failed')",
                                      name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), nullable=False, unique=True)
    model_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False)
    ddl: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    built_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def index_metric(info: ModelInfo) -> str:
    """The metric of a model's HNSW index, as its record says (cosine unless told)."""
    return str(info.extra.get(INDEX_METRIC, "cosine"))


def hnsw_index_name(model_id: int, metric: str) -> str:
    """Name of the partial HNSW index of one model and metric."""
    return f"ix_image_embeddings_hnsw_{metric}_m{int(model_id)}"


def hnsw_index(model_id: int, dim: int, metric: str) -> Index:
    """One model's partial HNSW index; the model's rows share the table with other dimensions.

    Declared per model row rather than on the table, since each model has its own dimension
    and ids are only known at run time. Hamming indexes the sign bits of the stored 0/1 vector
    as bit(d), so a 64-bit pHash is searched as a bit(64).
    """
    vector = cast(_RUNTIME.c.vector, HALFVEC(int(dim)))
    if metric == "hamming":
        vector = cast(func.binary_quantize(vector), BIT(int(dim)))
    # A literal, so the planner matches the index for queries that name the model inline.
    where = _RUNTIME.c.model_id == literal_column(str(int(model_id)))
    return Index(hnsw_index_name(model_id, metric), vector.label("v"),
                 postgresql_using="hnsw", postgresql_with=HNSW_BUILD,
                 postgresql_ops={"v": INDEX_OPS[metric]}, postgresql_where=where)


def compact_index_name(model_id: int) -> str:
    """Name of the partial HNSW index over one model's compact vectors."""
    return f"ix_image_embeddings_hnsw_compact_m{int(model_id)}"


def compact_index(model_id: int, dim: int) -> Index:
    """One model's partial HNSW index over its compact vectors (cosine)."""
    vector = cast(_RUNTIME.c.compact, HALFVEC(int(dim)))
    where = _RUNTIME.c.model_id == literal_column(str(int(model_id)))
    return Index(compact_index_name(model_id), vector.label("v"), postgresql_using="hnsw",
                 postgresql_with=HNSW_BUILD, postgresql_ops={"v": INDEX_OPS["cosine"]},
                 postgresql_where=where)


def compact_partial_index(name: str, dim: int, where: ColumnElement[bool]) -> Index:
    """An HNSW index over the compact vectors of the rows one filter keeps (its `where`)."""
    vector = cast(_RUNTIME.c.compact, HALFVEC(int(dim)))
    return Index(name, vector.label("v"), postgresql_using="hnsw", postgresql_with=HNSW_BUILD,
                 postgresql_ops={"v": INDEX_OPS["cosine"]}, postgresql_where=where)


# The table as seen by the per-model indexes, on a metadata of its own: an index declared on
# the real table would join the schema that migrations compare and `create_all` builds.
_RUNTIME = Table("image_embeddings", MetaData(), Column("model_id", Integer),
                 Column("vector", HALFVEC()), Column("compact", HALFVEC()))
