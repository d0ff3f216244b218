"""Binary code sets and image codes (hashing); kNN graph edges (graph retrieval).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import BIT, UUID

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create code_sets, image_codes and graph_edges."""
    op.create_table(
        "code_sets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("collection", sa.String(128)),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("bits", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("params", sa.LargeBinary()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("fitted_rows", sa.Integer()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("fitted_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id", name="pk_code_sets"),
        sa.UniqueConstraint("name", name="uq_code_sets_name"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE",
                                name="fk_code_sets_model_id_models"),
        sa.CheckConstraint("method IN ('lsh', 'spectral', 'itq')", name="ck_code_sets_method"),
        sa.CheckConstraint("bits BETWEEN 8 AND 1024", name="ck_code_sets_bits"),
        sa.CheckConstraint("status IN ('pending', 'ready', 'failed')",
                           name="ck_code_sets_status"),
    )
    op.create_table(
        "image_codes",
        sa.Column("image_id", UUID(as_uuid=True), nullable=False),
        sa.Column("code_set_id", sa.Integer(), nullable=False),
        sa.Column("code", BIT(varying=True), nullable=False),
        sa.PrimaryKeyConstraint("image_id", "code_set_id", name="pk_image_codes"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE",
                                name="fk_image_codes_image_id_images"),
        sa.ForeignKeyConstraint(["code_set_id"], ["code_sets.id"], ondelete="CASCADE",
                                name="fk_image_codes_code_set_id_code_sets"),
    )
    # Dropping a code set deletes its codes by code_set_id: without this index each cascade
    # would scan the whole table.
    op.create_index("ix_image_codes_code_set_id", "image_codes", ["code_set_id"])
    op.create_table(
        "graph_edges",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("source_id", UUID(as_uuid=True), nullable=False),
        sa.Column("target_id", UUID(as_uuid=True), nullable=False),
        sa.Column("distance", sa.REAL(), nullable=False),
        sa.PrimaryKeyConstraint("model_id", "source_id", "target_id", name="pk_graph_edges"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE",
                                name="fk_graph_edges_model_id_models"),
        sa.ForeignKeyConstraint(["source_id"], ["images.id"], ondelete="CASCADE",
                                name="fk_graph_edges_source_id_images"),
        sa.ForeignKeyConstraint(["target_id"], ["images.id"], ondelete="CASCADE",
                                name="fk_graph_edges_target_id_images"),
    )
    # Deleting an image cascades over target_id too, and re-linking its neighbours looks up
    # who points at it.
    op.create_index("ix_graph_edges_target_id", "graph_edges", ["target_id"])


def downgrade() -> None:
    """Drop the hashing and graph tables."""
    op.drop_table("graph_edges")
    op.drop_table("image_codes")
    op.drop_table("code_sets")
