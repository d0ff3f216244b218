"""The SQL side of compact vectors: fitting, filling, the index, and candidate pools.

See projection.py for what compact vectors are. `prepare` (a task, also sent by the sweeper
for models that grew past PROJECTION_MIN_ROWS) fits the projection, fills every vector's
compact form, builds the compact HNSW index CONCURRENTLY, then lets search use it and drops
the full-vector index, which nothing reads any more.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pgvector import HalfVector
from pgvector.psycopg import register_vector
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import (
    ColumnElement,
    Subquery,
    bindparam,
    cast,
    literal_column,
    select,
    text,
    union_all,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex

from service.embedding.models import (
    EmbeddingModel,
    ImageEmbedding,
    IndexProjection,
    compact_index,
    compact_index_name,
    hnsw_index_name,
)
from service.embedding.projection import (
    COMPACT_DIM,
    FILL_BATCH,
    FIT_SAMPLE_ROWS,
    LOCK_KIND,
    MIN_MODEL_DIM,
    Compact,
    current,
    eligible,
    fit_components,
    forget,
    has_enough_rows,
    mark,
    project,
)


def fit(model: EmbeddingModel, *, session: Session, dim: int = COMPACT_DIM) -> IndexProjection:
    """Fit the model's projection on a sample of its vectors and store it (status filling)."""
    existing = session.scalar(select(IndexProjection).where(
        IndexProjection.model_id == model.id))
    if existing is not None:
        return existing
    # Image ids are random (uuid4): the first rows in id order are a random sample.
    _, sample = read_vectors(model, session=session, limit=FIT_SAMPLE_ROWS)
    components = fit_components(sample, dim)
    row = IndexProjection(model_id=int(model.id), dim=int(components.shape[0]),
                          components=components.tobytes(), fitted_rows=len(sample))
    session.add(row)
    session.flush()
    forget(int(model.id))
    return row


def candidates(model: EmbeddingModel, found: Compact, vector: np.ndarray,
               conditions: list[ColumnElement[bool]], *, limit: int, walk: bool) -> Subquery:
    """(image_id, vector) of the compact top-`limit` under conditions, and the uncompacted.

    With `walk`, the order is the compact index's expression, so the planner walks the graph
    (set `walk_settings` first); else the filtered rows are scanned. Rows that have no
    compact form yet all join, whatever their distance: the caller's exact re-rank sorts them.
    """
    cq = bindparam("compact_query", project(vector, found.components)[0],
                   type_=HALFVEC(found.dim))
    compact: ColumnElement[Any] = ImageEmbedding.compact
    if walk:
        compact = cast(ImageEmbedding.compact, HALFVEC(found.dim))
    top = (select(ImageEmbedding.image_id, ImageEmbedding.vector)
           .where(ImageEmbedding.model_id == literal_column(str(int(model.id))),
                  ImageEmbedding.compact.is_not(None), *conditions)
           .order_by(compact.cosine_distance(cq)).limit(limit).subquery("top"))
    stragglers = select(ImageEmbedding.image_id, ImageEmbedding.vector).where(
        ImageEmbedding.model_id == literal_column(str(int(model.id))),
        ImageEmbedding.compact.is_(None), *conditions)
    return union_all(select(top.c.image_id, top.c.vector), stragglers).subquery("pool")


def walk_settings(session: Session, *, ef_search: int, max_scan_tuples: int) -> None:
    """This transaction's settings for a relaxed iterative walk of a compact graph."""
    session.execute(text("SELECT set_config('hnsw.ef_search', :ef, true), "
                         "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
                         "set_config('hnsw.max_scan_tuples', :mst, true), "
                         "set_config('enable_seqscan', 'off', true), "
                         "set_config('enable_sort', 'off', true), "
                         "set_config('enable_bitmapscan', 'off', true)"),
                    {"ef": str(ef_search), "mst": str(max_scan_tuples)})


def end_walk(session: Session) -> None:
    """Give the rest of the transaction its plans back."""
    session.execute(text("SELECT set_config('enable_seqscan', 'on', true), "
                         "set_config('enable_sort', 'on', true), "
                         "set_config('enable_bitmapscan', 'on', true)"))


def _driver(session: Session) -> Any:
    """The session's psycopg connection, with pgvector's binary types registered."""
    raw = session.connection().connection.driver_connection
    if not getattr(raw, "_lookalike_vector_types", False):
        register_vector(raw)
        raw._lookalike_vector_types = True
    return raw


def read_vectors(model: EmbeddingModel, *, session: Session, limit: int,
                 uncompacted: bool = False) -> tuple[list[Any], np.ndarray]:
    """Ids and vectors of the model, in id order or uncompacted ones (binary: text cost minutes)."""
    # The fill takes any rows left (through the partial index of uncompacted rows).
    tail = " AND compact IS NULL LIMIT %s" if uncompacted else " ORDER BY image_id LIMIT %s"
    with _driver(session).cursor(binary=True) as cur:
        cur.execute("SELECT image_id, vector FROM image_embeddings WHERE model_id = %s" + tail,
                    (int(model.id), int(limit)))
        rows = cur.fetchall()
    if not rows:
        return [], np.zeros((0, int(model.dim)), np.float32)
    return [r[0] for r in rows], np.stack([r[1].to_numpy() for r in rows]).astype(np.float32)


def fill(model: EmbeddingModel, *, session: Session, batch: int = FILL_BATCH) -> int:
    """Write the compact form of every vector of the model that has none; commits per batch."""
    found = current(model, session=session)
    if found is None:
        return 0
    done = 0
    while True:
        ids, vectors = read_vectors(model, session=session, limit=batch, uncompacted=True)
        if not ids:
            return done
        compact = project(vectors, found.components)
        raw = _driver(session)
        # Written through a temporary table filled by binary COPY, then one joined UPDATE.
        raw.execute("CREATE TEMP TABLE IF NOT EXISTS compact_fill "
                    "(image_id uuid PRIMARY KEY, compact halfvec) ON COMMIT DELETE ROWS")
        with raw.cursor().copy("COPY compact_fill (image_id, compact) FROM STDIN "
                               "WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "halfvec"])
            for image_id, c in zip(ids, compact, strict=True):
                copy.write_row((image_id, HalfVector(c)))
        raw.execute("UPDATE image_embeddings e SET compact = f.compact FROM compact_fill f "
                    "WHERE e.model_id = %s AND e.image_id = f.image_id", (int(model.id),))
        session.commit()
        done += len(ids)


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
            # Search, graph links and re-ranking read the compact index from now on; the
            # full-vector graph (3.9 GiB at a million rows) would only slow every insert.
            # Forgotten first, so that the sweeper does not rebuild it as a lost index.
            full = hnsw_index_name(int(model.id), "cosine")
            guard.execute(text("DELETE FROM index_builds WHERE name = :n"), {"n": full})
            guard.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{full}"'))
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
