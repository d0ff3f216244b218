"""Jobs survive faults with real processes: a killed worker, Redis and PostgreSQL restarts.

The rig runs its own beat (sweeping every second, items stale after 4 s) and workers on a
queue no other test uses, so each fault hits exactly the processes of these tests.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.db import session_scope
from service.embedding.session import get_embedder
from service.jobs import expansion, pipeline
from service.services.stack import ServiceStack
from tests.jobs.conftest import (
    all_items,
    assert_consistent,
    job_settings,
    kill_group,
    make_archive,
    start_beat,
    start_job_worker,
    submit_archive,
    wait_job,
    wait_progress,
)


@dataclass
class Rig:
    """An app, a beat and workers on one private queue."""

    config: dict[str, Any]
    app: Flask
    folder: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def client(self) -> FlaskClient:
        return self.app.test_client()

    def start_worker(self) -> subprocess.Popen[bytes]:
        proc = start_job_worker(self.config, self.folder / f"worker-{uuid.uuid4().hex[:8]}.log")
        self.workers.append(proc)
        return proc


@pytest.fixture(scope="module")
def rig(settings: dict[str, Any],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Beat for the module; workers are started (and killed) by the tests."""
    folder = tmp_path_factory.mktemp("faults")
    config = job_settings(settings, "lookalike-jobs-faults", JOB_ITEM_TIMEOUT=4,
                          JOB_SWEEP_INTERVAL=1, JOB_PARALLELISM=2)
    beat = start_beat(config, folder)
    state = Rig(config, create_app(config), folder)
    yield state
    for proc in [*state.workers, beat]:
        kill_group(proc, signal.SIGTERM)


@pytest.fixture
def worker(rig: Rig) -> Iterator[subprocess.Popen[bytes]]:
    """A fresh worker on the rig's queue, stopped after the test (whatever became of it)."""
    proc = rig.start_worker()
    yield proc
    for started in rig.workers:
        kill_group(started, signal.SIGTERM)
    rig.workers.clear()


def _archive(clothing: Path, start: int, count: int = 48) -> bytes:
    files = sorted((clothing / "images").glob("*.jpg"))[start:start + count]
    return make_archive([(p.name, p.read_bytes()) for p in files])


def _submit(rig: Rig, data: bytes, collection: str) -> str:
    resp = submit_archive(rig.client, data, collection=collection)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def _assert_complete(rig: Rig, job_id: str, collection: str, total: int = 48) -> None:
    job = wait_job(rig.client, job_id, timeout=120)
    assert job["status"] == "done", job
    assert (job["total"], job["done"], job["failed"], job["duplicates"]) == (total, total, 0, 0)
    assert assert_consistent(rig.app, job_id, collection) == {"done": total}


def test_sigkill_worker_mid_job_then_a_new_worker_completes_it(
        rig: Rig, worker: subprocess.Popen[bytes], clothing: Path) -> None:
    job_id = _submit(rig, _archive(clothing, 300), "f-kill")
    wait_progress(rig.client, job_id, at_least=1)
    # Kill it while it holds claimed items, the case only the sweeper can recover.
    deadline = time.monotonic() + 30
    while rig.client.get(f"/api/v1/jobs/{job_id}").get_json()["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    kill_group(worker, signal.SIGKILL)
    body = rig.client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["status"] == "running" and body["running"] > 0 and body["done"] < 48, body
    rig.start_worker()
    _assert_complete(rig, job_id, "f-kill")
    items = all_items(rig.client, job_id)
    assert max(i["attempts"] for i in items) == 2


def test_redis_restart_mid_job_loses_messages_and_the_sweeper_recovers(
        rig: Rig, worker: subprocess.Popen[bytes], clothing: Path, stack: ServiceStack) -> None:
    job_id = _submit(rig, _archive(clothing, 400), "f-redis")
    wait_progress(rig.client, job_id, at_least=1)
    stack.redis.stop()
    stack.redis.start()
    body = rig.client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["status"] == "running", body
    _assert_complete(rig, job_id, "f-redis")


def test_an_expansion_message_lost_before_any_worker_ran_it_is_resent(
        rig: Rig, clothing: Path, stack: ServiceStack) -> None:
    # Accepted while no worker listens, then Redis restarts: the only message is gone.
    job_id = _submit(rig, _archive(clothing, 800, 16), "f-lost-expansion")
    stack.redis.stop()
    stack.redis.start()
    assert rig.client.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "expanding"
    rig.start_worker()
    _assert_complete(rig, job_id, "f-lost-expansion", total=16)
    for started in rig.workers:
        kill_group(started, signal.SIGTERM)
    rig.workers.clear()


def test_postgres_restart_mid_job_completes(
        rig: Rig, worker: subprocess.Popen[bytes], clothing: Path, stack: ServiceStack) -> None:
    job_id = _submit(rig, _archive(clothing, 500), "f-pg")
    wait_progress(rig.client, job_id, at_least=1)
    stack.postgres.stop()
    time.sleep(1)
    stack.postgres.start()
    _assert_complete(rig, job_id, "f-pg")


def test_cancel_keeps_finished_items_and_processes_no_more(
        rig: Rig, settings: dict[str, Any], clothing: Path) -> None:
    # Submitted while no worker listens: one batch runs here, in-process, then the job is
    # cancelled, and only then does a worker see the job's messages.
    job_id = _submit(rig, _archive(clothing, 600, 24), "f-cancel")
    with rig.app.app_context(), session_scope() as session:
        expanded = expansion.expand_job(uuid.UUID(job_id), session=session,
                                        settings=expansion.expand_settings(rig.app.config))
        assert (expanded.status, expanded.pending) == ("queued", 24)
        embedder = get_embedder(settings["MODEL_DIR"], settings["DEFAULT_MODEL"])
        first = pipeline.process_batch(
            uuid.UUID(job_id), uuid.uuid4(), session=session,
            store=rig.app.extensions["content_store"], embedder=embedder,
            settings=pipeline.batch_settings(rig.app.config))
    assert (first.claimed, first.done, first.more) == (8, 8, True)
    resp = rig.client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["status"], body["done"], body["cancelled"], body["pending"]) == (
        "cancelled", 8, 16, 0)
    # Now a worker drains the queue, a marker job proving it got past the cancelled messages.
    rig.start_worker()
    marker = _submit(rig, _archive(clothing, 700, 2), "f-cancel-marker")
    wait_job(rig.client, marker)
    after = rig.client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert (after["status"], after["done"], after["cancelled"]) == ("cancelled", 8, 16), after
    assert assert_consistent(rig.app, job_id, "f-cancel") == {"done": 8, "cancelled": 16}
    images = rig.client.get("/api/v1/images", query_string={"collection": "f-cancel"})
    assert len(images.get_json()["items"]) == 8
    again = rig.client.post(f"/api/v1/jobs/{job_id}/cancel").get_json()
    assert again["status"] == "cancelled"
    for started in rig.workers:
        kill_group(started, signal.SIGTERM)
    rig.workers.clear()
