"""Queued work whose task message was lost (Redis restarted, a broker refusal): sent again.

Each kind of work is a row with a state, so the sweeper finds what was accepted but never
started (an evaluation still queued, a code set still pending, an index build still pending,
a graph rebuild still queued) or stopped midway (a reindex whose chain of tasks broke) and
sends its task again; an index found INVALID or missing is asked for again. The tasks are
idempotent.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, update
from sqlalchemy.orm import Session

from service.embedding.indexes import damaged
from service.embedding.models import IndexBuild
from service.evaluation.models import EvaluationRun
from service.graph.models import GraphRebuild
from service.hashing.models import CodeSet
from service.indexing.reindex import ReindexRun
from service.queue import BUILD_INDEX, FIT_CODES, REBUILD_GRAPH, REINDEX, RUN_EVALUATION

# (table, states that wait for a task, the task, how its argument is written)
WORK: tuple[tuple[Any, tuple[str, ...], str, Any], ...] = (
    (EvaluationRun, ("queued",), RUN_EVALUATION, str),
    (CodeSet, ("pending",), FIT_CODES, int),
    (ReindexRun, ("running",), REINDEX, str),
    (IndexBuild, ("pending",), BUILD_INDEX, int),
    (GraphRebuild, ("queued",), REBUILD_GRAPH, str),
)


def stale_work(*, session: Session, older_than_s: float) -> list[tuple[str, tuple[Any, ...]]]:
    """Work whose task was last sent `older_than_s` ago and has not moved; marks it sent now."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s)
    # Marked sent now, so the loop below leaves them for this sweep's own sending.
    due: list[tuple[str, tuple[Any, ...]]] = [(BUILD_INDEX, (i,)) for i in damaged(session=session)]
    for table, states, task, arg in WORK:
        ids = session.scalars(update(table).where(table.status.in_(states), table.sent_at < cutoff)
                              .values(sent_at=func.now()).returning(table.id))
        due += [(task, (arg(row_id),)) for row_id in ids]
    session.commit()
    return due
