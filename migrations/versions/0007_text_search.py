"""Text search: automatic tags, a generated full-text vector and class probabilities.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR, UUID

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The same expression as SEARCH_TEXT_SQL in service/images/models.py, repeated because a
# migration must not change when application code does. User tags weigh most (A), then the
# classifier's automatic tags (B), the file name (C) and other string metadata values (D).
SEARCH_TEXT_SQL = (
    "setweight(jsonb_to_tsvector('english'::regconfig, coalesce(metadata -> 'tags', "
    "'[]'::jsonb), '[\"string\"]'::jsonb), 'A') || "
    "setweight(jsonb_to_tsvector('english'::regconfig, auto_tags, '[\"string\"]'::jsonb), 'B') || "
    "setweight(to_tsvector('english'::regconfig, translate(coalesce(filename, ''), '_-.', '   ')),"
    " 'C') || "
    "setweight(jsonb_to_tsvector('english'::regconfig, metadata - 'tags', '[\"string\"]'::jsonb),"
    " 'D')"
)


def upgrade() -> None:
    """Add images.auto_tags, images.search_text (generated, GIN) and image_classes."""
    op.add_column("images", sa.Column("auto_tags", JSONB, nullable=False,
                                      server_default=sa.text("'[]'::jsonb")))
    op.add_column("images", sa.Column("search_text", TSVECTOR,
                                      sa.Computed(SEARCH_TEXT_SQL, persisted=True)))
    op.create_index("ix_images_search_text", "images", ["search_text"], postgresql_using="gin")
    op.create_table(
        "image_classes",
        sa.Column("image_id", UUID(as_uuid=True),
                  sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("probs", HALFVEC(1000), nullable=False),
        sa.PrimaryKeyConstraint("image_id", "model_id", name="pk_image_classes"),
    )


def downgrade() -> None:
    """Drop image_classes and the text columns."""
    op.drop_table("image_classes")
    op.drop_index("ix_images_search_text", table_name="images")
    op.drop_column("images", "search_text")
    op.drop_column("images", "auto_tags")
