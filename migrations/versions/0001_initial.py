"""Initial schema: images, models, image embeddings.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the vector extension and the three core tables."""
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "images",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("collection", sa.String(128), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("filename", sa.Text()),
        sa.Column("mime", sa.String(64), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("metadata", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("collection", "sha256", name="uq_images_collection_sha256"),
        sa.CheckConstraint("status IN ('pending', 'ready', 'failed')", name="ck_images_status"),
    )
    op.create_index("ix_images_collection_created", "images",
                    ["collection", sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index("ix_images_metadata", "images", ["metadata"], postgresql_using="gin",
                    postgresql_ops={"metadata": "jsonb_path_ops"})
    op.create_index("ix_images_sha256", "images", ["sha256"])
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("name", "version", name="uq_models_name_version"),
    )
    op.create_table(
        "image_embeddings",
        sa.Column("image_id", UUID(as_uuid=True), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("vector", HALFVEC(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("image_id", "model_id", name="pk_image_embeddings"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE",
                                name="fk_image_embeddings_image_id_images"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE",
                                name="fk_image_embeddings_model_id_models"),
    )
    # Keep vectors inline: TOAST detoasting on every distance computation is the main cost
    # of an exact scan over 1280-d halfvecs.
    op.execute("ALTER TABLE image_embeddings ALTER COLUMN vector SET STORAGE PLAIN")


def downgrade() -> None:
    """Drop the core tables (the extension stays: other schemas may use it)."""
    op.drop_table("image_embeddings")
    op.drop_table("models")
    op.drop_table("images")
