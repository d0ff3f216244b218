"""Fixtures of the jobs tests: an app and workers on queues of their own, archives, waiting."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.app import create_app
from service.config import PROJECT_ROOT
from service.db import session_scope
from service.embedding.models import ImageEmbedding
from service.images.models import Image
from service.jobs.models import IngestItem
from tests.conftest import worker_env

# Small batches so that a 40-photo job spans several batches (and can be interrupted).
TEST_BATCH = 8


def job_settings(settings: dict[str, Any], queue: str, **extra: Any) -> dict[str, Any]:
    """The session settings on a queue of their own (other workers never see these jobs)."""
    return {**settings, "CELERY": {"task_default_queue": queue},
            "JOB_BATCH_SIZE": TEST_BATCH, **extra}


def job_worker_env(config: dict[str, Any]) -> dict[str, str]:
    """worker_env plus every job setting, JSON-encoded as the app reads LOOKALIKE_* values."""
    env = worker_env(config)
    for key in ("CELERY", "JOB_BATCH_SIZE", "INGEST_ROOTS", "JOB_ITEM_TIMEOUT",
                "JOB_SWEEP_INTERVAL", "JOB_PARALLELISM", "JOB_MAX_ATTEMPTS"):
        if key in config:
            env[f"LOOKALIKE_{key}"] = json.dumps(config[key])
    return env


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path, marker: bytes) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if marker in log_path.read_bytes():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"process not ready: {log_path.read_text()[-3000:]}")


def start_job_worker(config: dict[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
    """A real Celery worker (prefork, one child) on the config's queue, in its own group."""
    queue = config["CELERY"]["task_default_queue"]
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
         "-c", "1", "-Q", queue, "--loglevel", "INFO", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-n", f"{queue}-{uuid.uuid4().hex[:6]}@%h"],
        cwd=PROJECT_ROOT, env=job_worker_env(config), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    _wait_ready(proc, log_path, b"ready.")
    return proc


def start_beat(config: dict[str, Any], folder: Path) -> subprocess.Popen[bytes]:
    """Celery beat sending the sweeper at the config's interval."""
    log_path = folder / "beat.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "beat",
         "-s", str(folder / "beat-schedule"), "--loglevel", "INFO"],
        cwd=PROJECT_ROOT, env=job_worker_env(config), stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    _wait_ready(proc, log_path, b"beat: Starting")
    return proc


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the process and its children (the prefork pool), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ingest_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one server directory jobs may read in these tests."""
    return tmp_path_factory.mktemp("ingest-root")


@pytest.fixture(scope="session")
def jobs_config(settings: dict[str, Any], ingest_root: Path) -> dict[str, Any]:
    """Settings of the app and worker of the ordinary (non-fault) job tests."""
    return job_settings(settings, "lookalike-jobs-test", INGEST_ROOTS=[str(ingest_root)])


@pytest.fixture(scope="session")
def jobs_app(jobs_config: dict[str, Any]) -> Flask:
    """An app that enqueues onto the jobs tests' queue."""
    return create_app(jobs_config)


@pytest.fixture(scope="session")
def idle_app(jobs_config: dict[str, Any]) -> Flask:
    """An app on a queue no worker consumes: tests run its tasks' bodies themselves."""
    return create_app({**jobs_config, "CELERY": {"task_default_queue": "lookalike-jobs-idle"}})


@pytest.fixture
def jobs_client(jobs_app: Flask) -> FlaskClient:
    """A test client of the jobs app."""
    return jobs_app.test_client()


@pytest.fixture(scope="session")
def jobs_worker(jobs_config: dict[str, Any],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """One worker for the ordinary job tests."""
    proc = start_job_worker(jobs_config, tmp_path_factory.mktemp("jobs-worker") / "worker.log")
    yield proc
    kill_group(proc, signal.SIGTERM)


def make_archive(files: list[tuple[str, bytes]], kind: str = "zip") -> bytes:
    """An archive of (name, bytes) entries: zip, tar or tar.gz."""
    out = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for name, data in files:
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=out, mode="w:gz" if kind == "tar.gz" else "w") as tf:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def submit_archive(client: FlaskClient, data: bytes, *, name: str = "photos.zip",
                   collection: str, metadata: tuple[bytes, str] | None = None) -> Any:
    """POST an archive as multipart; returns the response."""
    form: dict[str, Any] = {"file": (io.BytesIO(data), name), "collection": collection}
    if metadata is not None:
        form["metadata"] = (io.BytesIO(metadata[0]), metadata[1])
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def wait_job(client: FlaskClient, job_id: str, timeout: float = 90.0,
             until: tuple[str, ...] = ("done", "failed", "cancelled")) -> dict[str, Any]:
    """Poll a job until it reaches one of `until`."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        if body.get("status") in until:
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {body.get('status')} after {timeout}s: {body}")


def wait_progress(client: FlaskClient, job_id: str, at_least: int,
                  timeout: float = 60.0) -> dict[str, Any]:
    """Poll until at least `at_least` items are finished (and the job is still open)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        if body["done"] + body["duplicates"] + body["failed"] >= at_least:
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} made no progress in {timeout}s: {body}")


def all_items(client: FlaskClient, job_id: str, status: str | None = None) -> list[dict[str, Any]]:
    """Every item of a job, paging with the cursor."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 7, **({"status": status} if status else {}),
                 **({"cursor": cursor} if cursor else {})}
        body = client.get(f"/api/v1/jobs/{job_id}/items", query_string=query).get_json()
        out += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out


def assert_consistent(app: Flask, job_id: str, collection: str) -> dict[str, int]:
    """Every item ended ready exactly once, duplicate of a ready image, or failed with a reason."""
    with app.app_context(), session_scope() as session:
        items = list(session.scalars(select(IngestItem).where(
            IngestItem.job_id == uuid.UUID(job_id)).order_by(IngestItem.id)))
        images = {i.id: i for i in session.scalars(
            select(Image).where(Image.collection == collection))}
        vectors = dict(session.execute(
            select(ImageEmbedding.image_id, func.count()).where(
                ImageEmbedding.image_id.in_(list(images))).group_by(ImageEmbedding.image_id)).all())
    counts: dict[str, int] = {}
    done_images = []
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
        assert item.status in ("done", "duplicate", "failed", "cancelled"), item.name
        if item.status == "failed":
            assert item.error, f"{item.name} failed without a reason"
            assert item.image_id is None
        elif item.status in ("done", "duplicate"):
            image = images.get(item.image_id)
            assert image is not None, f"{item.name} points at no image of {collection}"
            assert image.status == "ready" and vectors.get(image.id) == 1, item.name
            if item.status == "done":
                done_images.append(image.id)
    assert len(done_images) == len(set(done_images)), "an image was stored twice"
    return counts
