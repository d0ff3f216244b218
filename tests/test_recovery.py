"""Queued work whose message was lost is found by its state and sent again, once per timeout."""

from __future__ import annotations

import uuid
from datetime import timedelta

from flask import Flask
from sqlalchemy import delete, update

from service.db import session_scope
from service.evaluation.models import EvaluationRun
from service.hashing.models import CodeSet
from service.indexing.reindex import ReindexRun
from service.queue import FIT_CODES, REINDEX, RUN_EVALUATION
from service.recovery import stale_work
from tests.search.test_service import make_model


def test_lost_evaluations_fits_and_reindexes_are_sent_again(app: Flask) -> None:
    with app.app_context(), session_scope() as session:
        model = make_model(session, 4)
        queued = EvaluationRun(params={"collection": "x"}, status="queued")
        finished = EvaluationRun(params={"collection": "x"}, status="done")
        pending = CodeSet(name=f"rec-{uuid.uuid4().hex[:8]}", model_id=model.id,
                          method="itq", bits=64, status="pending")
        running = ReindexRun(collection="x", model=model.name, status="running")
        fresh = ReindexRun(collection="y", model=model.name, status="running")
        session.add_all([queued, finished, pending, running, fresh])
        session.flush()
        # All but `fresh` were last sent an hour ago and have not moved since.
        for table, row in ((EvaluationRun, queued), (EvaluationRun, finished),
                           (CodeSet, pending), (ReindexRun, running)):
            session.execute(update(table).where(table.id == row.id).values(
                sent_at=table.sent_at - timedelta(hours=1)))
        session.commit()
        ids = (queued.id, finished.id, pending.id, running.id, fresh.id)
    try:
        with app.app_context(), session_scope() as session:
            due = stale_work(session=session, older_than_s=600)
            mine = {(task, args[0]) for task, args in due if args[0] in {
                str(ids[0]), ids[2], str(ids[3]), str(ids[1]), str(ids[4])}}
            assert mine == {(RUN_EVALUATION, str(ids[0])), (FIT_CODES, ids[2]),
                            (REINDEX, str(ids[3]))}
            # Sent now: the next sweep leaves them alone until the timeout passes again.
            again = stale_work(session=session, older_than_s=600)
            assert not {args[0] for _, args in again} & {str(ids[0]), ids[2], str(ids[3])}
    finally:
        with app.app_context(), session_scope() as session:
            session.execute(delete(EvaluationRun).where(EvaluationRun.id.in_(ids[:2])))
            session.execute(delete(ReindexRun).where(ReindexRun.id.in_([ids[3], ids[4]])))
            session.execute(delete(CodeSet).where(CodeSet.id == ids[2]))
