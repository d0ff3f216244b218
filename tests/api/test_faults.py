"""Dependencies failing under the API: clear 503s, nothing half-written, recovery by itself."""

from __future__ import annotations

import io
import signal
import stat
import time
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.app import create_app
from service.db import session_scope
from service.images.models import Image
from service.services.ports import free_port
from service.services.redis import EmbeddedRedis
from service.services.stack import ServiceStack
from tests.conftest import wait_for_status
from tests.jobs.conftest import job_settings, kill_group, start_beat, start_job_worker


def test_database_down_gives_503_and_recovers(client: FlaskClient, stack: ServiceStack) -> None:
    assert client.get("/api/v1/images?limit=1").status_code == 200
    stack.postgres.stop()
    try:
        resp = client.get("/api/v1/images?limit=1")
        assert resp.status_code == 503
        assert resp.get_json()["error"]["code"] == "database_unavailable"
        assert resp.headers["Retry-After"]
        assert client.get("/readyz").status_code == 503
    finally:
        stack.postgres.start()
    deadline = time.monotonic() + 30
    while client.get("/api/v1/images?limit=1").status_code != 200:
        assert time.monotonic() < deadline, "the API did not recover"
        time.sleep(0.5)
    assert client.get("/readyz").status_code == 200


def test_storage_not_writable_gives_503_and_no_row(settings: dict[str, Any], photos: list[Path],
                                                   tmp_path: Path) -> None:
    # Root ignores permission bits, so make the storage root unusable another way: a file
    # stands where the content store needs a directory.
    blocked = tmp_path / "storage"
    blocked.write_text("not a directory")
    app = create_app(dict(settings, STORAGE_DIR=str(blocked)))
    client = app.test_client()
    with app.app_context(), session_scope() as session:
        before = session.scalar(select(func.count()).select_from(Image))
    data = photos[5].read_bytes() + b"storage-down"
    resp = client.post("/api/v1/images", data={"file": (io.BytesIO(data), "x.jpg"),
                                               "collection": "t-storage"},
                       content_type="multipart/form-data")
    assert resp.status_code == 503, resp.get_json()
    assert resp.get_json()["error"]["code"] == "storage_unavailable"
    with app.app_context(), session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == before
    assert stat.S_ISREG(blocked.stat().st_mode)


def test_upload_with_redis_down_is_accepted_and_the_sweeper_embeds_it(
        settings: dict[str, Any], photos: list[Path], tmp_path: Path) -> None:
    # A Redis of its own (the session's worker keeps its broker), its own queue, a sweeper
    # every second and pending rows stale after 2 s; rate limits on, so their Redis storage
    # being down is exercised too.
    redis = EmbeddedRedis(tmp_path / "redis", free_port())
    redis.start()
    config = job_settings({**settings, "REDIS_URL": redis.url()}, "lookalike-redis-down",
                          JOB_ITEM_TIMEOUT=2, JOB_SWEEP_INTERVAL=1, RATE_LIMIT_ENABLED=True)
    client = create_app(config).test_client()
    data = photos[6].read_bytes() + b"redis-down"
    redis.stop()
    try:
        started = time.monotonic()
        resp = client.post("/api/v1/images", data={"file": (io.BytesIO(data), "x.jpg"),
                                                   "collection": "t-redis-down"},
                           content_type="multipart/form-data")
        assert resp.status_code == 202, resp.get_json()
        assert time.monotonic() - started < 30, "an upload must not hang on a dead broker"
        image_id = resp.get_json()["id"]
        assert client.get(f"/api/v1/images/{image_id}").get_json()["status"] == "pending"
    finally:
        redis.start()
    worker = start_job_worker(config, tmp_path / "worker.log")
    beat = start_beat(config, tmp_path)
    try:
        # The message was never sent: only the sweeper's claim_stale_pending can enqueue it.
        assert wait_for_status(client, image_id, timeout=120)["status"] == "ready"
    finally:
        kill_group(worker, signal.SIGTERM)
        kill_group(beat, signal.SIGTERM)
        redis.stop()
