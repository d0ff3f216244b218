"""/metrics and request ids against real processes: gunicorn (two workers, the config that
`lookalike run` uses) and a Celery worker sharing one metrics folder, on a queue of their own.

A scrape after an upload and a search must show the counters moved, whichever gunicorn
worker answers; one request id must be followed from an upload's response header to the
worker's JSON log lines and to the job's row.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from service.app import create_app
from service.auth import service as keys
from service.config import PROJECT_ROOT
from service.db import session_scope
from service.jobs.models import IngestJob
from service.services.ports import free_port
from tests.conftest import DEFAULT_MODEL, _wait_healthy, worker_env

QUEUE = "lookalike-observability"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Observed:
    """The live server's URL, the worker's log file and the app on the same services."""

    base: str
    worker_log: Path
    app: Flask


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def observed(settings: dict[str, Any],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """gunicorn and a worker as `lookalike run` starts them: one metrics folder, JSON logs."""
    folder = tmp_path_factory.mktemp("observability")
    (folder / "metrics").mkdir()
    env = dict(worker_env(settings), PROMETHEUS_MULTIPROC_DIR=str(folder / "metrics"),
               LOOKALIKE_LOG_FORMAT="json",
               LOOKALIKE_CELERY=json.dumps({"task_default_queue": QUEUE}))
    worker_log = folder / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
         "-c", "1", "-Q", QUEUE, "--loglevel", "INFO", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-n", f"{QUEUE}-{uuid.uuid4().hex[:6]}@%h"],
        cwd=PROJECT_ROOT, env=env, stdout=worker_log.open("wb"), stderr=subprocess.STDOUT)
    port = free_port()
    server_log = folder / "gunicorn.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:service.services.gunicorn_config",
         "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4", "--timeout", "120",
         "service.wsgi:app"],
        cwd=PROJECT_ROOT, env=env, stdout=server_log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while b"ready." not in worker_log.read_bytes():
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            assert time.monotonic() < deadline, worker_log.read_text()[-3000:]
            time.sleep(0.2)
        _wait_healthy(f"http://127.0.0.1:{port}", server, server_log)
        yield Observed(f"http://127.0.0.1:{port}", worker_log,
                       create_app({**settings, "CELERY": {"task_default_queue": QUEUE}}))
    finally:
        _stop(server)
        _stop(worker)


def scrape(base: str, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of one /metrics answer, by name and labels."""
    resp = requests.get(f"{base}/metrics", headers=headers or {}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_ready(base: str, image_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """Poll an image until the worker is done with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/api/v1/images/{image_id}", timeout=10).json()
        if body["status"] in ("ready", "failed"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"image {image_id} not embedded after {timeout} s")


def upload(base: str, photo: Path, collection: str, request_id: str) -> requests.Response:
    """POST one photo with an X-Request-ID."""
    return requests.post(f"{base}/api/v1/images", headers={"X-Request-ID": request_id},
                         files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                         data={"collection": collection}, timeout=60)


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log (the worker's banner is plain text)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_log(path: Path, match: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The JSON lines that `match` accepts, waiting for at least one."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in log_lines(path) if match(line)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_scrape_shows_an_upload_and_a_search(observed: Observed, photos: list[Path]) -> None:
    base, collection = observed.base, f"obs-{uuid.uuid4().hex[:8]}"
    before = scrape(base)
    resp = upload(base, photos[0], collection, "scrape-test")
    assert resp.status_code in (201, 202), resp.text
    image_id, status = resp.json()["id"], str(resp.status_code)
    assert wait_ready(base, image_id)["status"] == "ready"
    found = requests.post(f"{base}/api/v1/search", timeout=60,
                          json={"image_id": image_id, "k": 3, "collection": collection,
                                "explain": True})
    assert found.status_code == 200, found.text
    strategy = found.json()["explain"]["method"]
    after = scrape(base)
    deadline = time.monotonic() + 35  # a process reuses its last inventory for a while
    while (value(after, "lookalike_vectors", collection=collection, model=DEFAULT_MODEL) != 1
           and time.monotonic() < deadline):
        time.sleep(0.5)
        after = scrape(base)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Counted by whichever of the two gunicorn workers served each request.
    assert moved("lookalike_http_requests_total", method="POST", route="/api/v1/images",
                 status=status) == 1
    assert moved("lookalike_http_requests_total", method="POST", route="/api/v1/search",
                 status="200") == 1
    assert moved("lookalike_http_request_duration_seconds_count", method="POST",
                 route="/api/v1/images") == 1
    # The URL rule, never the raw path with its id.
    assert moved("lookalike_http_requests_total", method="GET",
                 route="/api/v1/images/<image_id>", status="200") >= 1
    assert not any(name == "lookalike_http_requests_total" and image_id in dict(labels)["route"]
                   for name, labels in after)
    assert moved("lookalike_search_duration_seconds_count", strategy=strategy) == 1
    # Recorded in the worker's pool process, read through the shared folder.
    assert moved("lookalike_embed_duration_seconds_count", model=DEFAULT_MODEL) >= 1
    assert moved("lookalike_embed_batch_size_sum", model=DEFAULT_MODEL) >= 1
    assert moved("lookalike_celery_tasks_total", task="lookalike.embed_image",
                 outcome="success") == 1
    assert moved("lookalike_celery_task_duration_seconds_count",
                 task="lookalike.embed_image") == 1
    # Read at scrape time.
    assert ("lookalike_celery_queue_length", frozenset({("queue", QUEUE)})) in after
    assert value(after, "lookalike_metrics_source_up", source="redis") == 1
    assert value(after, "lookalike_metrics_source_up", source="postgres") == 1
    assert value(after, "lookalike_images", collection=collection) == 1
    assert value(after, "lookalike_vectors", collection=collection, model=DEFAULT_MODEL) == 1
    assert value(after, "lookalike_inventory_estimated", table="images") == 0
    assert value(after, "lookalike_db_pool_size_connections") >= 5


def test_one_request_id_from_the_upload_to_the_embed_task(observed: Observed,
                                                          photos: list[Path]) -> None:
    request_id = f"trace-{uuid.uuid4().hex}"
    resp = upload(observed.base, photos[1], f"obs-{uuid.uuid4().hex[:8]}", request_id)
    assert resp.status_code in (201, 202), resp.text
    assert resp.headers["X-Request-ID"] == request_id
    assert wait_ready(observed.base, resp.json()["id"])["status"] == "ready"
    lines = wait_log(observed.worker_log, lambda line: line.get("request_id") == request_id)
    assert lines, f"no worker line with {request_id}"
    assert {line["task"] for line in lines} == {"lookalike.embed_image"}
    for line in lines:
        assert {"timestamp", "level", "logger", "message", "task_id"} <= line.keys()
    # Celery's own line for the task's end carries the id too.
    assert any("succeeded" in line["message"] for line in lines), lines


def test_an_invalid_request_id_is_replaced(observed: Observed) -> None:
    for bad in ("x" * 129, "two words", "tab\there", "é"):
        resp = requests.get(f"{observed.base}/healthz", headers={"X-Request-ID": bad},
                            timeout=10)
        assert resp.status_code == 200
        given = resp.headers["X-Request-ID"]
        assert given != bad and len(given) == 32 and int(given, 16) >= 0
    fresh = requests.get(f"{observed.base}/healthz", timeout=10).headers["X-Request-ID"]
    assert len(fresh) == 32


def test_a_job_records_its_request_id_and_its_batches_log_it(observed: Observed,
                                                             photos: list[Path]) -> None:
    request_id = f"job-{uuid.uuid4().hex}"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for photo in photos[2:4]:
            zf.writestr(photo.name, photo.read_bytes())
    resp = requests.post(f"{observed.base}/api/v1/jobs", headers={"X-Request-ID": request_id},
                         files={"file": ("two.zip", archive.getvalue(), "application/zip")},
                         data={"collection": f"obs-{uuid.uuid4().hex[:8]}"}, timeout=60)
    assert resp.status_code == 202, resp.text
    assert resp.headers["X-Request-ID"] == request_id
    job_id = resp.json()["id"]
    with observed.app.app_context(), session_scope() as session:
        stored = session.scalar(select(IngestJob.request_id).where(
            IngestJob.id == uuid.UUID(job_id)))
    assert stored == request_id
    lines = wait_log(observed.worker_log, lambda line: line.get("task") == "lookalike.ingest_batch"
                     and "succeeded" in line["message"] and line.get("job_id") == job_id,
                     timeout=90)
    assert lines and all(line["request_id"] == request_id for line in lines), lines


def test_metrics_need_an_admin_key_where_keys_are_required(settings: dict[str, Any]) -> None:
    secure = create_app({**settings, "BIND_HOST": "0.0.0.0"})
    client = secure.test_client()
    with secure.app_context(), session_scope() as session:
        admin = keys.create_key(session=session, scope="admin", collections=None).token
        reader = keys.create_key(session=session, scope="read", collections=None).token
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {reader}"}
                      ).status_code == 403
    ok = client.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
    assert ok.status_code == 200
    assert b"lookalike_http_requests_total" in ok.data


def test_metrics_are_open_without_keys(client: Any) -> None:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain")
    assert b"# TYPE lookalike_http_request_duration_seconds histogram" in resp.data


def test_the_dashboard_uses_real_metric_names(observed: Observed) -> None:
    resp = requests.get(f"{observed.base}/metrics", timeout=30)
    exposed = set()
    for family in text_string_to_metric_families(resp.text):
        exposed.add(family.name)
        exposed.update(s.name for s in family.samples)
    dashboard = (PROJECT_ROOT / "docs" / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"lookalike_[a-z_]+", dashboard)) - {"lookalike_overview"}
    assert used and used <= exposed, sorted(used - exposed)
