"""Runtime HNSW indexes and graph rebuilds as rows of work, for their tasks and the sweeper.

`index_builds` declares every per-model and per-code-set HNSW index: the statement that
builds it CONCURRENTLY and its state. The indexes that exist when this runs (built the old
way, inside the first transaction of their model or code set) are declared here from the
catalog: valid ones as ready, INVALID ones as pending, so that the sweeper rebuilds them.
Compact indexes are not declared: their projection row tracks them. `graph_rebuilds` holds
each requested rebuild of a collection's kNN graph until its task has done it.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The catalog's own definition, made CONCURRENTLY and idempotent; the owner from the name.
DECLARE_EXISTING = r"""
INSERT INTO index_builds (name, model_id, ddl, status, built_at)
SELECT c.relname, COALESCE(m.id, s.model_id),
       regexp_replace(pg_get_indexdef(i.indexrelid), '^CREATE INDEX ',
                      'CREATE INDEX CONCURRENTLY IF NOT EXISTS '),
       CASE WHEN i.indisvalid THEN 'ready' ELSE 'pending' END,
       CASE WHEN i.indisvalid THEN now() END
  FROM pg_index i
  JOIN pg_class c ON c.oid = i.indexrelid
  LEFT JOIN models m ON c.relname ~ '^ix_image_embeddings_hnsw_(cosine|l1|hamming)_m[0-9]+$'
                    AND m.id = substring(c.relname FROM '_m([0-9]+)$')::int
  LEFT JOIN code_sets s ON c.relname ~ '^ix_image_codes_hnsw_c[0-9]+$'
                       AND s.id = substring(c.relname FROM '_c([0-9]+)$')::int
 WHERE c.relnamespace = current_schema()::regnamespace
   AND COALESCE(m.id, s.model_id) IS NOT NULL
"""


def upgrade() -> None:
    """Create index_builds (declaring the indexes there are) and graph_rebuilds."""
    op.create_table(
        "index_builds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("ddl", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("error", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("built_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_index_builds"),
        sa.UniqueConstraint("name", name="uq_index_builds_name"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE",
                                name="fk_index_builds_model_id_models"),
        sa.CheckConstraint("status IN ('pending', 'ready', 'failed')",
                           name="ck_index_builds_status"),
    )
    op.execute(DECLARE_EXISTING)
    op.create_table(
        "graph_rebuilds",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("collection", sa.String(128), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("error", sa.Text()),
        sa.Column("edges", sa.Integer()),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_graph_rebuilds"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE",
                                name="fk_graph_rebuilds_model_id_models"),
        sa.CheckConstraint("status IN ('queued', 'done', 'failed')",
                           name="ck_graph_rebuilds_status"),
    )
    op.create_index("ix_graph_rebuilds_queued", "graph_rebuilds", ["collection", "model_id"],
                    postgresql_where=sa.text("status = 'queued'"))


def downgrade() -> None:
    """Drop both tables (the indexes themselves stay)."""
    op.drop_index("ix_graph_rebuilds_queued", table_name="graph_rebuilds")
    op.drop_table("graph_rebuilds")
    op.drop_table("index_builds")
