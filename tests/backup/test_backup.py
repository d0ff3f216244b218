"""Backup and restore: a populated installation comes back identical in an empty one."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import create_engine, func, select, text

from service.app import create_app
from service.backup.manifest import MANIFEST, OBJECTS, SUMMARY, read_manifest
from service.backup.restore import RestoreFailed, RestoreRefused, restore
from service.backup.service import BackupError, backup
from service.cli import main
from service.db import session_scope, sqlalchemy_url
from service.images.models import Image
from service.images.storage import LocalContentStore
from service.indexing import service as indexing
from service.migrate import upgrade
from service.services.stack import ServiceStack


@pytest.fixture
def databases(stack: ServiceStack) -> Iterator[Any]:
    """Make migrated, empty databases of their own on the suite's server; dropped after."""
    admin = create_engine(sqlalchemy_url(stack.postgres.url()), isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"bk_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        url = stack.postgres.url(name)
        upgrade(url)
        return url

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def installation(settings: dict[str, Any], url: str, storage: Path, redis_db: int = 11) -> Flask:
    """An app on its own database and store; its queue is a Redis database no worker reads."""
    redis = settings["REDIS_URL"].rsplit("/", 1)[0] + f"/{redis_db}"
    return create_app({**settings, "DATABASE_URL": url, "STORAGE_DIR": str(storage),
                       "REDIS_URL": redis})


def populate(app: Flask, photos: list[Path]) -> list[str]:
    """Upload the photos with metadata and embed them here, as the worker would."""
    client = app.test_client()
    ids = []
    for i, photo in enumerate(photos):
        resp = client.post("/api/v1/images", content_type="multipart/form-data", data={
            "file": (io.BytesIO(photo.read_bytes()), photo.name), "collection": "shop",
            "metadata": json.dumps({"n": i, "half": i % 2})})
        assert resp.status_code in (201, 202), resp.get_json()
        ids.append(resp.get_json()["id"])
    with app.app_context(), session_scope() as session:
        for image_id in ids:
            assert indexing.embed_image(
                uuid.UUID(image_id), session=session, store=app.extensions["content_store"],
                model_dir=app.config["MODEL_DIR"], model_name=app.config["DEFAULT_MODEL"],
                max_pixels=int(app.config["MAX_IMAGE_PIXELS"])) == "ready"
    return ids


def snapshot(app: Flask, ids: list[str]) -> dict[str, Any]:
    """What a user sees: searches by each stored image (filtered or not), files, thumbnails."""
    client = app.test_client()
    seen: dict[str, Any] = {}
    for image_id in ids:
        for extra in ({}, {"filter": {"half": 1}}):
            body = client.post("/api/v1/search", json={"image_id": image_id, "k": 5,
                                                       "collection": "shop", **extra})
            assert body.status_code == 200, body.get_json()
            seen[f"{image_id}{extra}"] = [(r["id"], round(r["score"], 5))
                                          for r in body.get_json()["results"]]
        seen[f"{image_id}/file"] = client.get(f"/api/v1/images/{image_id}/file").data
        thumb = client.get(f"/api/v1/images/{image_id}/thumbnail")
        assert thumb.status_code == 200
        seen[f"{image_id}/thumbnail"] = thumb.data
        seen[f"{image_id}/meta"] = client.get(f"/api/v1/images/{image_id}").get_json()["metadata"]
    return seen


def image_rows(url: str) -> int:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Image)) or 0)
    finally:
        engine.dispose()


def test_backup_then_restore_into_an_empty_installation_gives_the_same_answers(
        settings: dict[str, Any], databases: Any, photos: list[Path], tmp_path: Path) -> None:
    source_url, target_url = databases(), databases()
    source = installation(settings, source_url, tmp_path / "store-a")
    ids = populate(source, photos[:6])
    before = snapshot(source, ids)
    folder = tmp_path / "backup"
    env = {"DATABASE_URL": source_url, "LOOKALIKE_STORAGE_DIR": str(tmp_path / "store-a"),
           "LOOKALIKE_STORAGE_URL": ""}
    done = CliRunner().invoke(main, ["backup", str(folder)], env=env)
    assert done.exit_code == 0, done.output
    summary = json.loads((folder / SUMMARY).read_text())
    assert summary["objects"]["originals"] == 6 and summary["objects"]["thumbnails"] == 6
    assert summary["referenced_missing"] == [] and summary["corrupt"] == []
    env = {**env, "DATABASE_URL": target_url, "LOOKALIKE_STORAGE_DIR": str(tmp_path / "store-b")}
    done = CliRunner().invoke(main, ["restore", str(folder)], env=env)
    assert done.exit_code == 0, done.output
    target = installation(settings, target_url, tmp_path / "store-b")
    assert snapshot(target, ids) == before
    # A second restore into the now populated installation is refused, and changes nothing.
    done = CliRunner().invoke(main, ["restore", str(folder)], env=env)
    assert done.exit_code != 0 and "holds 6 images" in done.output
    assert image_rows(target_url) == 6


def test_refusals_write_nothing(settings: dict[str, Any], databases: Any, photos: list[Path],
                                tmp_path: Path) -> None:
    source_url, target_url = databases(), databases()
    store = LocalContentStore(tmp_path / "store-a")
    populate(installation(settings, source_url, tmp_path / "store-a"), photos[6:9])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("someone else's")
    with pytest.raises(BackupError, match="not empty"):
        backup(tmp_path / "busy", database_url=source_url, store=store)
    folder = tmp_path / "backup"
    backup(folder, database_url=source_url, store=store)
    empty = LocalContentStore(tmp_path / "store-b")
    # One original's bytes changed in the folder: refused before anything is written.
    victim = next(e for e in read_manifest(folder / MANIFEST) if e.kind == "original")
    path = folder / OBJECTS / victim.key
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(RestoreFailed, match=victim.digest):
        restore(folder, database_url=target_url, store=empty)
    assert image_rows(target_url) == 0 and list(empty.digests()) == []
    path.write_bytes(good)
    # A folder whose summary was never written is an unfinished backup.
    (folder / SUMMARY).rename(folder / "summary.bak")
    with pytest.raises(RestoreRefused, match="no finished backup"):
        restore(folder, database_url=target_url, store=empty)
    (folder / "summary.bak").rename(folder / SUMMARY)
    # A store that already holds objects is not an empty installation.
    empty.put(victim.digest, good)
    with pytest.raises(RestoreRefused, match="store holds objects"):
        restore(folder, database_url=target_url, store=empty)
    assert image_rows(target_url) == 0
