"""Embedding attempts per image: an upload that keeps killing its worker fails instead of looping.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add images.attempts."""
    op.add_column("images", sa.Column("attempts", sa.Integer(), nullable=False,
                                      server_default=sa.text("0")))


def downgrade() -> None:
    """Drop images.attempts."""
    op.drop_column("images", "attempts")
