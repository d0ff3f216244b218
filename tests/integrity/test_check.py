"""`lookalike check [--repair]` on an installation damaged on purpose, one fault of each kind."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import redis
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import delete, insert, select, text

from service.cli import main
from service.db import session_scope
from service.embedding.models import ImageEmbedding
from service.images.models import Image
from service.images.storage import LocalContentStore
from service.indexing import service as indexing
from service.jobs.models import IngestItem, IngestJob
from tests.backup.test_backup import databases, installation, populate  # noqa: F401

REDIS_DB = 12


def run_check(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    done = CliRunner().invoke(main, ["check", "--json", *args], env=env)
    assert done.exit_code in (0, 1), done.output
    return done.exit_code, json.loads(done.stdout.strip().splitlines()[-1])


def queued(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, argsrepr) of every message waiting in the installation's queue."""
    url = settings["REDIS_URL"].rsplit("/", 1)[0] + f"/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    messages = [json.loads(m) for m in client.lrange("lookalike", 0, -1)]
    return [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in messages]


def damage(app: Flask, store: LocalContentStore, ids: list[str]) -> dict[str, Any]:
    """One fault of each kind; what the test needs to find them again."""
    stray = b"bytes no row names"
    stray_digest = hashlib.sha256(stray).hexdigest()
    store.put(stray_digest, stray)
    with app.app_context(), session_scope() as session:
        digests = {str(i): d for i, d in session.execute(
            select(Image.id, Image.sha256).where(Image.id.in_(ids)))}
        store.delete(digests[ids[0]])                                    # missing
        path = store.path(digests[ids[1]])                              # corrupt
        path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        session.execute(delete(ImageEmbedding).where(ImageEmbedding.image_id == ids[2]))
        session.execute(text("UPDATE images SET status = 'pending', "
                             "updated_at = now() - interval '2 hours' WHERE id = :i"),
                        {"i": ids[3]})
        live, ended = uuid.uuid4(), uuid.uuid4()
        session.execute(insert(IngestJob), [
            {"id": live, "collection": "shop", "kind": "manifest", "status": "running",
             "total": 1},
            {"id": ended, "collection": "shop", "kind": "manifest", "status": "done",
             "total": 1}])
        session.execute(insert(IngestItem), [
            {"job_id": live, "name": "a.jpg", "source": "/nowhere/a.jpg", "status": "running",
             "claim_token": uuid.uuid4(), "attempts": 1},
            {"job_id": ended, "name": "b.jpg", "source": "/nowhere/b.jpg", "status": "pending"}])
        session.execute(text("UPDATE ingest_items SET claimed_at = now() - interval '2 hours' "
                             "WHERE job_id = :j"), {"j": live})
        session.commit()
    return {"stray": stray_digest, "live": live, "ended": ended, "digests": digests}


def test_check_finds_each_fault_and_repair_mends_it(
        settings: dict[str, Any], databases: Any, photos: list[Path],  # noqa: F811
        tmp_path: Path) -> None:
    url = databases()
    app = installation(settings, url, tmp_path / "store", redis_db=REDIS_DB)
    store = LocalContentStore(tmp_path / "store")
    ids = populate(app, photos[:5])
    env = {"DATABASE_URL": url, "LOOKALIKE_STORAGE_DIR": str(tmp_path / "store"),
           "LOOKALIKE_STORAGE_URL": "", "REDIS_URL": app.config["REDIS_URL"],
           "LOOKALIKE_MODEL_DIR": str(settings["MODEL_DIR"]),
           "LOOKALIKE_DEFAULT_MODEL": settings["DEFAULT_MODEL"]}
    status, clean = run_check(env)
    assert status == 0 and sum(clean["found"].values()) == 0, clean
    assert clean["objects"] == 5 and clean["hashed"] == 5 and clean["images"] == 5
    hurt = damage(app, store, ids)

    status, found = run_check(env)
    assert status == 1
    assert found["found"] == {"orphan": 1, "missing": 1, "corrupt": 1, "unembedded": 1,
                              "stale_pending": 1, "stale_item": 1, "stranded_item": 1}, found
    subjects = {(f["kind"], f["subject"]) for f in found["findings"]}
    assert {("orphan", hurt["stray"]), ("missing", ids[0]), ("corrupt", hurt["digests"][ids[1]]),
            ("unembedded", ids[2]), ("stale_pending", ids[3])} <= subjects
    # Without --hash the corrupt object goes unseen; everything else is still found.
    _, quick = run_check(env, "--no-hash")
    assert quick["found"]["corrupt"] == 0 and quick["found"]["orphan"] == 1

    redis.Redis.from_url(app.config["REDIS_URL"]).flushdb()  # the uploads' own messages
    status, mended = run_check(env, "--repair")
    assert status == 0, mended
    assert sum(mended["left"].values()) == 0
    assert mended["repaired"] == {"orphan": 1, "missing": 1, "corrupt": 1, "unembedded": 1,
                                  "stale_pending": 1, "stale_item": 1, "stranded_item": 1}
    assert not store.exists(hurt["stray"]) and not store.exists(hurt["digests"][ids[1]])
    with app.app_context(), session_scope() as session:
        rows = {str(r.id): r for r in session.execute(
            select(Image.id, Image.status, Image.error).where(Image.id.in_(ids)))}
        assert rows[ids[0]].status == "failed" and "original_missing" in rows[ids[0]].error
        assert rows[ids[1]].status == "failed" and "original_corrupt" in rows[ids[1]].error
        assert rows[ids[2]].status == "pending" and rows[ids[4]].status == "ready"
        items = {r.job_id: r for r in session.execute(
            select(IngestItem.job_id, IngestItem.status, IngestItem.error))}
        assert items[hurt["live"]].status == "pending"
        assert items[hurt["ended"]].status == "failed"
    sent = queued(settings)
    assert sorted(args for task, args in sent if task == "lookalike.embed_image") == sorted(
        repr([image_id]) for image_id in (ids[2], ids[3])), sent
    assert any(task == "lookalike.ingest_batch" and str(hurt["live"]) in args
               for task, args in sent), sent
    # The messages run (here, as the worker would): the two images are whole again.
    with app.app_context(), session_scope() as session:
        for image_id in (ids[2], ids[3]):
            assert indexing.embed_image(
                uuid.UUID(image_id), session=session, store=app.extensions["content_store"],
                model_dir=app.config["MODEL_DIR"], model_name=app.config["DEFAULT_MODEL"],
                max_pixels=int(app.config["MAX_IMAGE_PIXELS"])) == "ready"
    status, after = run_check(env)
    assert status == 0 and sum(after["found"].values()) == 0, after
