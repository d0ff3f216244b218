"""The filter columns and a compact index vector beside each vector.

A filtered search at a million rows spent its time joining `images` to `image_embeddings`
row by row; with the image's collection, status, creation time and metadata copied onto its
vectors (kept in step by triggers, so every writer, COPY included, gets them), a filter is an
index scan of the vectors' own table. `compact` holds the vector projected on the model's
principal directions (service/embedding/projection.py): a row a fifth of the size for the
graph and for scans, re-ranked on the full vector. The full vector moves out of line
(EXTERNAL) so that those scans read narrow rows; it is read back for the few re-ranked ones.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy.dialects.postgresql import JSONB

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

FILL = """
CREATE FUNCTION lookalike_embedding_filter_columns() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT i.collection, i.status, i.metadata, i.created_at
      INTO NEW.collection, NEW.status, NEW.metadata, NEW.image_created_at
      FROM images i WHERE i.id = NEW.image_id;
    RETURN NEW;
END $$;
CREATE TRIGGER image_embeddings_filter_columns
    BEFORE INSERT ON image_embeddings
    FOR EACH ROW EXECUTE FUNCTION lookalike_embedding_filter_columns();
"""

SYNC = """
CREATE FUNCTION lookalike_image_filter_columns() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE image_embeddings e
       SET collection = NEW.collection, status = NEW.status, metadata = NEW.metadata,
           image_created_at = NEW.created_at
     WHERE e.image_id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER images_filter_columns
    AFTER UPDATE OF collection, status, metadata, created_at ON images
    FOR EACH ROW
    WHEN (OLD.collection IS DISTINCT FROM NEW.collection
          OR OLD.status IS DISTINCT FROM NEW.status
          OR OLD.metadata IS DISTINCT FROM NEW.metadata
          OR OLD.created_at IS DISTINCT FROM NEW.created_at)
    EXECUTE FUNCTION lookalike_image_filter_columns();
"""


def upgrade() -> None:
    """Add the columns, fill them, keep them in step; the projections table."""
    op.add_column("image_embeddings", sa.Column("collection", sa.String(128)))
    op.add_column("image_embeddings", sa.Column("status", sa.String(16)))
    op.add_column("image_embeddings", sa.Column("metadata", JSONB()))
    op.add_column("image_embeddings",
                  sa.Column("image_created_at", sa.DateTime(timezone=True)))
    op.add_column("image_embeddings", sa.Column("compact", HALFVEC()))
    op.execute("UPDATE image_embeddings e SET collection = i.collection, status = i.status, "
               "metadata = i.metadata, image_created_at = i.created_at "
               "FROM images i WHERE i.id = e.image_id")
    for name in ("collection", "status", "metadata", "image_created_at"):
        op.alter_column("image_embeddings", name, nullable=False)
    op.execute(FILL)
    op.execute(SYNC)
    op.create_index("ix_image_embeddings_metadata", "image_embeddings", ["metadata"],
                    postgresql_using="gin", postgresql_ops={"metadata": "jsonb_path_ops"})
    op.create_index("ix_image_embeddings_model_collection", "image_embeddings",
                    ["model_id", "collection"])
    op.create_index("ix_image_embeddings_uncompacted", "image_embeddings", ["model_id"],
                    postgresql_where=sa.text("compact IS NULL"))
    # New rows keep the full vector out of line; rows already stored move when rewritten.
    op.execute("ALTER TABLE image_embeddings ALTER COLUMN vector SET STORAGE EXTERNAL")
    op.create_table(
        "index_projections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("components", sa.LargeBinary(), nullable=False),
        sa.Column("fitted_rows", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="filling"),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_index_projections"),
        sa.UniqueConstraint("model_id", name="uq_index_projections_model_id"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE",
                                name="fk_index_projections_model_id_models"),
        sa.CheckConstraint("status IN ('filling', 'ready', 'failed')",
                           name="ck_index_projections_status"),
    )


def downgrade() -> None:
    """Drop the projections, the triggers and the columns."""
    op.drop_table("index_projections")
    op.execute("ALTER TABLE image_embeddings ALTER COLUMN vector SET STORAGE PLAIN")
    op.execute("DROP TRIGGER images_filter_columns ON images")
    op.execute("DROP FUNCTION lookalike_image_filter_columns()")
    op.execute("DROP TRIGGER image_embeddings_filter_columns ON image_embeddings")
    op.execute("DROP FUNCTION lookalike_embedding_filter_columns()")
    op.drop_index("ix_image_embeddings_uncompacted", table_name="image_embeddings")
    op.drop_index("ix_image_embeddings_model_collection", table_name="image_embeddings")
    op.drop_index("ix_image_embeddings_metadata", table_name="image_embeddings")
    for name in ("compact", "image_created_at", "metadata", "status", "collection"):
        op.drop_column("image_embeddings", name)
