"""Runtime HNSW indexes (per model, per code set), built CONCURRENTLY by a task of their own.

A plain CREATE INDEX takes a SHARE lock on `image_embeddings` or `image_codes`: every insert
waits behind it for the whole build (minutes at a million rows). So the owner of an index
records it in `index_builds` inside its own transaction (`request_build`) and, once that has
committed, sends `lookalike.build_index` (`send_builds`); the task (`build`) runs CREATE INDEX
CONCURRENTLY on an AUTOCOMMIT connection of its own. CONCURRENTLY waits for every transaction
older than itself, the caller's included, so it never runs inside a request's or a task's
transaction. A build that failed leaves an INVALID index behind: the next build drops it
first, and the sweeper re-sends builds whose message was lost and those whose index turned
out INVALID or missing (`damaged`). Until the index is valid, search ranks exactly
(service/search/strategies/hnsw.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import Engine, Index, func, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex

from service.embedding.models import IndexBuild
from service.queue import BUILD_INDEX, enqueue_or_sweep

log = logging.getLogger(__name__)

# The first key of the advisory lock one build holds ("ixbd"): a message sent twice (the
# sweeper, a retry) finds the build busy instead of running it twice.
LOCK_KIND = 0x69786264
# An HNSW build that outgrows maintenance_work_mem slows down several times (pgvector says so
# in a notice); the setting is this connection's, for the build only.
BUILD_MEMORY = "512MB"
_DAMAGED = text(
    "UPDATE index_builds b SET status = 'pending', sent_at = now() WHERE b.status = 'ready' "
    "AND NOT coalesce((SELECT i.indisvalid FROM pg_index i "
    "WHERE i.indexrelid = to_regclass(b.name)), false) RETURNING b.id")
_VALIDITY = text("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(:name)")


def concurrent_ddl(index: Index) -> str:
    """The CREATE INDEX CONCURRENTLY IF NOT EXISTS statement of an index, as SQL text."""
    index.dialect_options["postgresql"]["concurrently"] = True
    try:
        return str(CreateIndex(index, if_not_exists=True).compile(dialect=postgresql.dialect()))
    finally:
        index.dialect_options["postgresql"]["concurrently"] = False


def request_build(index: Index, *, model_id: int, session: Session) -> int | None:
    """Record that an index should exist; the build's id to send once the caller commits.

    None when it is recorded already (pending, or ready): nothing new to send. A build that
    failed is asked for again.
    """
    stmt = insert(IndexBuild).values(name=str(index.name), model_id=int(model_id),
                                     ddl=concurrent_ddl(index), status="pending")
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"], where=IndexBuild.status == "failed",
        set_={"status": "pending", "error": None, "ddl": stmt.excluded.ddl,
              "sent_at": func.now()})
    return session.scalar(stmt.returning(IndexBuild.id))


def send_builds(build_ids: Iterable[int | None]) -> None:
    """Send the build tasks of committed requests (a broker that is down: the sweeper will)."""
    for build_id in build_ids:
        if build_id is not None:
            enqueue_or_sweep(BUILD_INDEX, int(build_id))


def forget(name: str, *, session: Session) -> None:
    """Stop tracking an index its owner drops (a code set deleted, a graph no longer read)."""
    session.query(IndexBuild).filter(IndexBuild.name == name).delete(synchronize_session=False)


def validity(connection: Connection | Session, name: str) -> bool | None:
    """Whether the index is valid; None when there is none of that name."""
    return connection.scalar(_VALIDITY, {"name": name})


def build(build_id: int, *, engine: Engine, memory: str = BUILD_MEMORY) -> str:
    """Build one recorded index CONCURRENTLY, dropping an INVALID leftover first; idempotent.

    Runs on a connection of its own in autocommit, so no transaction of this process is open
    while CONCURRENTLY waits for the older ones. Returns ready, built, repaired, busy or gone.
    """
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        key = {"kind": LOCK_KIND, "id": int(build_id)}
        if not connection.scalar(text("SELECT pg_try_advisory_lock(:kind, :id)"), key):
            return "busy"
        try:
            return _build_locked(int(build_id), connection, memory)
        finally:
            if not connection.invalidated:
                connection.execute(text("SELECT pg_advisory_unlock(:kind, :id)"), key)


def _build_locked(build_id: int, connection: Connection, memory: str) -> str:
    row = connection.execute(select(IndexBuild.name, IndexBuild.ddl, IndexBuild.status)
                             .where(IndexBuild.id == build_id)).first()
    if row is None:
        return "gone"
    name, ddl, status = str(row.name), str(row.ddl), str(row.status)
    valid = validity(connection, name)
    if valid and status == "ready":
        return "ready"
    connection.execute(update(IndexBuild).where(IndexBuild.id == build_id)
                       .values(attempts=IndexBuild.attempts + 1))
    outcome = "ready" if valid else "built" if valid is None else "repaired"
    if valid is False:
        # Left by a build that failed or was cancelled: IF NOT EXISTS would keep it as it is.
        log.warning("index %s is INVALID; dropping and rebuilding it", name)
        connection.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
    if not valid:
        connection.execute(text("SELECT set_config('maintenance_work_mem', :m, false)"),
                           {"m": memory})
        try:
            connection.execute(text(ddl))
        finally:
            if not connection.invalidated:
                connection.execute(text("RESET maintenance_work_mem"))
        if not validity(connection, name):
            if connection.scalar(select(IndexBuild.id).where(IndexBuild.id == build_id)) is None:
                return "gone"  # its owner was dropped with the index meanwhile
            raise RuntimeError(f"index {name} is not valid after its build")
    done = connection.scalar(update(IndexBuild).where(IndexBuild.id == build_id)
                             .values(status="ready", error=None, built_at=func.now())
                             .returning(IndexBuild.id))
    if done is None:
        # Its owner went away during the build (the cascade took the row): nothing reads it.
        connection.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
        return "gone"
    log.info("index %s %s", name, outcome)
    return outcome


def fail(build_id: int, reason: str, *, session: Session) -> None:
    """Record why a build cannot succeed (an error a retry would repeat)."""
    session.execute(update(IndexBuild).where(IndexBuild.id == int(build_id))
                    .values(status="failed", error=reason))
    session.commit()


def damaged(*, session: Session) -> list[int]:
    """Ready builds whose index is INVALID or gone, set pending again (the sweeper sends them)."""
    ids = [int(i) for i in session.scalars(_DAMAGED)]
    if ids:
        log.warning("indexes to rebuild (INVALID or missing): %s", ids)
    return ids


def build_now(build_ids: Iterable[int | None], *, engine: Engine) -> list[str]:
    """Build recorded indexes in this process (benches, the CLI): call with no transaction open."""
    return [build(int(i), engine=engine) for i in build_ids if i is not None]
