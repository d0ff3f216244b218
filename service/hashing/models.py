"""ORM models of code sets (fitted encoders) and the binary codes of images."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    cast,
    literal_column,
)
from sqlalchemy.dialects.postgresql import BIT, UUID
from sqlalchemy.orm import Mapped, deferred, mapped_column

from service.db import Base, QueuedWork


class CodeSet(QueuedWork, Base):
    """A named encoder (method, bits, fitted arrays) over one model's vectors of a collection."""

    __tablename__ = "code_sets"
    __table_args__ = (
        CheckConstraint("method IN ('lsh', 'spectral', 'itq')", name="method"),
        CheckConstraint("bits BETWEEN 8 AND 1024", name="bits"),
        CheckConstraint("status IN ('pending', 'ready', 'failed')", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    model_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False)
    # None: fitted on (and covering) every collection's images of the model.
    collection: Mapped[str | None] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(16), nullable=False)
    bits: Mapped[int] = mapped_column(Integer, nullable=False)
    seed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # The fitted arrays as an .npz blob (CodeParams.to_bytes); null until fitted.
    # Deferred: megabytes for long codes, and searches read it from a process cache instead.
    params: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    fitted_rows: Mapped[int | None] = mapped_column(Integer)
    fitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImageCode(Base):
    """The binary code of one image under one code set.

    `bit varying` so that code sets of any length share the table; each set gets a partial
    HNSW index over `code::bit(n)` with `bit_hamming_ops`.
    """

    __tablename__ = "image_codes"
    # Dropping a code set deletes its codes by code_set_id: without this each cascade scans.
    __table_args__ = (Index("ix_image_codes_code_set_id", "code_set_id"),)

    image_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    code_set_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("code_sets.id", ondelete="CASCADE"), primary_key=True)
    code: Mapped[str] = mapped_column(BIT(varying=True), nullable=False)


def code_index_name(code_set_id: int) -> str:
    """Name of the partial HNSW Hamming index of one code set."""
    return f"ix_image_codes_hnsw_c{int(code_set_id)}"


def code_index(code_set_id: int, bits: int) -> Index:
    """One code set's partial HNSW index over its codes as bit(n), declared per set at run time."""
    code = cast(_RUNTIME.c.code, BIT(int(bits))).label("c")
    where = _RUNTIME.c.code_set_id == literal_column(str(int(code_set_id)))
    return Index(code_index_name(code_set_id), code, postgresql_using="hnsw",
                 postgresql_with={"m": 16, "ef_construction": 64},
                 postgresql_ops={"c": "bit_hamming_ops"}, postgresql_where=where)


# The table as the per-set indexes see it, apart from the schema that migrations compare.
_RUNTIME = Table("image_codes", MetaData(), Column("code_set_id", Integer),
                 Column("code", BIT(varying=True)))
