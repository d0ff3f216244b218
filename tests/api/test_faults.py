"""Dependencies failing under the API: clear 503s, nothing half-written, recovery by itself."""

from __future__ import annotations

import io
import stat
import time
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.app import create_app
from service.db import session_scope
from service.images.models import Image
from service.services.stack import ServiceStack


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
