"""Reindexing a collection under a new model while searches keep being served."""

from __future__ import annotations

import io
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from sqlalchemy import delete

from service.db import session_scope
from service.embedding import registry
from service.embedding.defaults import ServiceSetting, default_model
from service.embedding.service import find_model
from service.errors import ApiError
from service.indexing.reindex import drop_model, progress, start_reindex, unindexed
from service.queue import REINDEX, enqueue
from tests.conftest import wait_for_status
from tests.embedding.test_registry import tiny_onnx

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def tiny_model(settings: dict, tmp_path: Path):
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    registry.add_onnx(name, tiny_onnx(tmp_path / "m.onnx"), Path(settings["MODEL_DIR"]),
                      size=224, resize=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    yield name
    shutil.rmtree(Path(settings["MODEL_DIR"]) / name, ignore_errors=True)


def cli_default(settings: dict, name: str, *flags: str) -> Result:
    """`lookalike models default NAME` against the test services."""
    from service.cli import main
    from tests.conftest import worker_env

    return CliRunner().invoke(main, ["models", "default", name, *flags],
                              env=worker_env(settings))


def test_reindex_under_concurrent_searches(app: Flask, photos: list[Path], settings: dict,
                                           tiny_model: str) -> None:
    client = app.test_client()
    collection = f"t-reindex-{uuid.uuid4().hex[:6]}"
    ids = []
    for path in photos[:10]:
        resp = client.post("/api/v1/images", data={
            "file": (io.BytesIO(path.read_bytes() + collection.encode()), "x.jpg"),
            "collection": collection}, content_type="multipart/form-data")
        ids.append(resp.get_json()["id"])
    for image_id in ids:
        wait_for_status(client, image_id)

    errors: list[str] = []
    stop = threading.Event()

    def searcher() -> None:
        c = app.test_client()
        while not stop.is_set():
            r = c.post("/api/v1/search", json={"image_id": ids[0], "k": 5,
                                               "collection": collection})
            if r.status_code != 200 or not r.get_json()["results"]:
                errors.append(f"{r.status_code} {r.get_json()}")

    # Not reindexed yet: switching the global default would leave this collection unsearchable.
    refused = cli_default(settings, tiny_model)
    assert refused.exit_code == 1 and "ready images have no" in refused.output
    with app.app_context(), session_scope() as session:
        assert default_model(session=session) != tiny_model
        row = find_model(tiny_model, session=session)
        assert row is not None and unindexed(row.id, session=session)[collection] == 10

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        with app.app_context():
            with session_scope() as session:
                run = start_reindex(collection, tiny_model, session=session,
                                    model_dir=app.config["MODEL_DIR"])
                run_id = run.id
            enqueue(REINDEX, str(run_id))
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                with session_scope() as session:
                    state = progress(run_id, session=session)
                if state.status != "running":
                    break
                time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert (state.status, state.done, state.total, state.failed) == ("done", 10, 10, 0)
    with app.app_context(), session_scope() as session:
        row = find_model(tiny_model, session=session)
        assert row is not None and collection not in unindexed(row.id, session=session)

    with app.app_context(), session_scope() as session:
        old = default_model(session=session)
        try:
            # --force: other test collections may still lack this model's vectors.
            assert cli_default(settings, tiny_model, "--force").exit_code == 0
            session.expire_all()
            resp = client.post("/api/v1/search", json={"image_id": ids[0], "k": 3,
                                                       "collection": collection})
            assert resp.status_code == 200 and resp.get_json()["model"] == tiny_model
            assert len(resp.get_json()["results"]) == 3
            with pytest.raises(ApiError, match="is the default model"):
                drop_model(tiny_model, session=session)
        finally:
            session.execute(delete(ServiceSetting))
            session.commit()
        assert default_model(session=session) == old
        assert drop_model(tiny_model, session=session) == 1
    resp = client.post("/api/v1/search", json={"image_id": ids[0], "k": 3,
                                               "model": tiny_model})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "unknown_model"
