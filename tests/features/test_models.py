"""Hand-crafted models (hsv-hist, phash) and centre regions: embedded, searched, tiered."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from pgvector.sqlalchemy import HALFVEC
from PIL import Image as PILImage
from sqlalchemy import bindparam, cast, literal_column, select, text

from service.db import session_scope
from service.embedding.models import ImageEmbedding
from service.embedding.service import ensure_model_row, find_model, index_name
from service.features.handcrafted import hsv_histogram, phash
from service.features.models import HSV_HIST, PHASH, handcrafted_info, region_model_name
from service.graph.duplicates import phash_pairs, region_pairs
from service.indexing.reindex import drop_model, reindex_step, start_reindex
from service.search.metrics import get_metric
from service.search.sql import Explain
from tests.conftest import DEFAULT_MODEL, wait_for_status
from tests.embedding.builds import wait_for_indexes

pytestmark = pytest.mark.usefixtures("worker")
REGION = region_model_name(DEFAULT_MODEL)


def upload(client: FlaskClient, data: bytes, collection: str, name: str = "x.jpg") -> str:
    resp = client.post("/api/v1/images", data={"file": (io.BytesIO(data), name),
                                               "collection": collection},
                       content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    image_id = resp.get_json()["id"]
    assert wait_for_status(client, image_id)["status"] == "ready"
    return image_id


def colours(parts: list[tuple[tuple[int, int, int], float]]) -> bytes:
    """A 64 x 64 PNG made of vertical bands of colours covering the given shares."""
    img = PILImage.new("RGB", (64, 64))
    left = 0
    for colour, share in parts:
        width = round(64 * share)
        img.paste(colour, (left, 0, left + width, 64))
        left += width
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def search(client: FlaskClient, **query: Any) -> dict[str, Any]:
    resp = client.post("/api/v1/search", json=query)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


@pytest.fixture(scope="module")
def handcrafted(app: Flask) -> Iterator[None]:
    """hsv-hist and phash enabled for this module's uploads, and dropped after it."""
    with app.app_context(), session_scope() as session:
        models = [ensure_model_row(handcrafted_info(name), session=session).id
                  for name in (HSV_HIST, PHASH)]
        engine = session.get_bind()
    for model_id in models:  # the searches below walk their HNSW indexes
        wait_for_indexes(engine, model_id)
    yield
    with app.app_context(), session_scope() as session:
        for name in (HSV_HIST, PHASH, REGION):
            if find_model(name, session=session) is not None:
                drop_model(name, session=session)


RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def test_hsv_histogram_search_ranks_colours(client: FlaskClient, handcrafted: None) -> None:
    collection = f"hsv-{uuid.uuid4().hex[:6]}"
    ids = {name: upload(client, colours(parts), collection, f"{name}.png") for name, parts in [
        ("red", [(RED, 1.0)]), ("mostly_red", [(RED, 0.75), (BLUE, 0.25)]),
        ("half_red", [(RED, 0.5), (GREEN, 0.5)]), ("blue", [(BLUE, 1.0)])]}
    by_id = {v: k for k, v in ids.items()}
    body = search(client, image_id=ids["red"], model=HSV_HIST, collection=collection, k=3)
    assert body["model"] == HSV_HIST and body["metric"] == "chi2"  # the model's default
    assert [by_id[r["id"]] for r in body["results"]] == ["mostly_red", "half_red", "blue"]
    # 1/2 sum (a-b)^2/(a+b): 1/2 (0.25^2/1.75 + 0.25) = 1/7, 1/2 (0.25/1.5 + 0.5) = 1/3, 1.
    assert [r["distance"] for r in body["results"]] == pytest.approx([1 / 7, 1 / 3, 1.0],
                                                                     abs=2e-3)
    body = search(client, image_id=ids["red"], model=HSV_HIST, metric="l1",
                  collection=collection, k=3, explain=True)
    assert [by_id[r["id"]] for r in body["results"]] == ["mostly_red", "half_red", "blue"]
    assert [r["distance"] for r in body["results"]] == pytest.approx([0.5, 1.0, 2.0], abs=2e-3)
    # Unfiltered (a raw histogram as the query), the L1 HNSW index serves the candidates.
    with PILImage.open(io.BytesIO(colours([(RED, 1.0)]))) as img:
        red = hsv_histogram(img.convert("RGB")).tolist()
    for metric in ("l1", "chi2"):  # chi2 re-ranks the L1 index's candidates exactly
        body = search(client, vector=red, model=HSV_HIST, metric=metric, k=2, explain=True)
        assert body["explain"]["method"] == "index", body["explain"]
        assert body["explain"]["index_metric"] == "l1" and not body["explain"]["notes"]
        assert [r["id"] for r in body["results"]] == [ids["red"], ids["mostly_red"]]
    # An uploaded red photo finds the stored red one at distance 0.
    resp = client.post("/api/v1/search", data={
        "file": (io.BytesIO(colours([(RED, 1.0)])), "q.png"),
        "query": json.dumps({"model": HSV_HIST, "collection": collection, "k": 2})},
        content_type="multipart/form-data")
    assert resp.status_code == 200, resp.get_json()
    results = resp.get_json()["results"]
    assert results[0]["id"] == ids["red"] and results[0]["distance"] == pytest.approx(0.0)
    assert results[1]["id"] == ids["mostly_red"]
    resp = client.post("/api/v1/search", json={"image_id": ids["red"], "model": HSV_HIST,
                                               "metric": "hamming"})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_metric"


def index_scans(app: Flask, name: str, metric: str, query: list[float]) -> bool:
    """Whether PostgreSQL orders a model's rows by `metric` with its HNSW index."""
    with app.app_context(), session_scope() as session:
        model = find_model(name, session=session)
        assert model is not None
        walk = get_metric(metric)
        q = bindparam("q", np.asarray(query, np.float32), type_=HALFVEC(model.dim))
        order = (walk.indexed(ImageEmbedding.vector, q, model.dim) if walk.indexed
                 else walk.distance(cast(ImageEmbedding.vector, HALFVEC(model.dim)), q))
        # Only an ordered index scan avoids both: the btree on (model_id, collection) plus a
        # sort would otherwise win on a small table.
        session.execute(text("SET LOCAL enable_seqscan = off"))
        session.execute(text("SET LOCAL enable_sort = off"))
        plan = session.execute(Explain(
            select(ImageEmbedding.image_id).where(
                ImageEmbedding.model_id == literal_column(str(model.id)))
            .order_by(order).limit(5))).scalar_one()
        return index_name(model.id, metric) in json.dumps(plan)


def test_phash_search_and_the_phash_duplicate_tier(app: Flask, client: FlaskClient,
                                                   handcrafted: None,
                                                   photos: list[Path]) -> None:
    collection = f"phash-{uuid.uuid4().hex[:6]}"
    with PILImage.open(photos[0]) as img:
        img = img.convert("RGB")
        small = img.resize((img.width * 3 // 10, img.height * 3 // 10),
                           PILImage.Resampling.LANCZOS)
        original = upload(client, photos[0].read_bytes(), collection)
        copy = upload(client, jpeg(small), collection)
    others = [upload(client, p.read_bytes(), collection) for p in photos[9:12]]
    body = search(client, image_id=original, model=PHASH, collection=collection, k=4)
    assert body["metric"] == "hamming"
    assert body["results"][0]["id"] == copy and body["results"][0]["distance"] <= 4
    assert all(r["distance"] > 16 for r in body["results"][1:])
    # Unfiltered (the raw bits as the query), the phash model's HNSW index over bit(64).
    with PILImage.open(photos[0]) as img:
        bits = phash(img.convert("RGB")).astype(float).tolist()
    body = search(client, vector=bits, model=PHASH, k=2, explain=True)
    assert body["explain"]["method"] == "index", body["explain"]
    assert body["explain"]["index_metric"] == "hamming" and not body["explain"]["notes"]
    assert [r["id"] for r in body["results"]] == [original, copy]
    assert body["results"][0]["distance"] == 0
    assert index_scans(app, PHASH, "hamming", bits) and index_scans(app, HSV_HIST, "l1", bits * 4)

    resp = client.get(f"/api/v1/duplicates?collection={collection}")
    assert resp.status_code == 200, resp.get_json()
    groups = resp.get_json()["clusters"]
    assert [set(g["ids"]) for g in groups] == [{original, copy}]
    assert groups[0]["tier"] == "phash"
    [link] = groups[0]["links"]
    assert {link["a"], link["b"]} == {original, copy} and link["tier"] == "phash"
    assert not set(others) & set(groups[0]["ids"])
    # Without the pHash tier only the CNN can group them, and it reports so.
    body = client.get(f"/api/v1/duplicates?collection={collection}&tiers=exact,cnn").get_json()
    assert all(g["tier"] == "cnn" for g in body["clusters"])


def test_phash_pairs_are_exact_hamming_pairs() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, size=(40, 64)).astype(np.float32)
    codes[7] = codes[3]
    codes[7, :5] = 1 - codes[7, :5]  # 5 bits from item 3
    ids = [uuid.UUID(int=i) for i in range(40)]
    brute = {(ids[i], ids[j]) for i in range(40) for j in range(i + 1, 40)
             if int(np.sum(codes[i] != codes[j])) <= 6}
    found = phash_pairs(ids, codes, 6)
    assert {(a, b) for a, b, _ in found} == brute and (ids[3], ids[7], 5.0) in found


def test_query_crops_find_the_original_of_a_crop(app: Flask, client: FlaskClient,
                                                 handcrafted: None, photos: list[Path]) -> None:
    collection = f"crops-{uuid.uuid4().hex[:6]}"
    with PILImage.open(photos[4]) as img:
        img = img.convert("RGB")
        w, h = img.size
        cw, ch = round(w * 0.7), round(h * 0.7)
        crop = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    original = upload(client, photos[4].read_bytes(), collection)
    cropped = upload(client, jpeg(crop), collection)
    for p in photos[5:9]:
        upload(client, p.read_bytes(), collection)
    resp = client.post("/api/v1/search", json={"image_id": cropped, "query_crops": True,
                                               "collection": collection})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "unknown_model"
    # The region model is filled for the collection by the reindex machinery, in process.
    with app.app_context(), session_scope() as session:
        run = start_reindex(collection, REGION, session=session,
                            model_dir=app.config["MODEL_DIR"])
        while reindex_step(run.id, session=session, store=app.extensions["content_store"],
                           model_dir=app.config["MODEL_DIR"], max_pixels=10**8):
            pass
        region = find_model(REGION, session=session)
        assert region is not None
        assert session.query(ImageEmbedding).filter(
            ImageEmbedding.model_id == region.id).count() == 6
    plain = search(client, image_id=cropped, collection=collection, k=6)
    crops = search(client, image_id=cropped, collection=collection, k=6, query_crops=True,
                   explain=True)
    assert crops["results"][0]["id"] == original
    assert crops["explain"]["method"] == "crops" and len(crops["explain"]["notes"]) == 3
    before = {r["id"]: r["distance"] for r in plain["results"]}
    after = {r["id"]: r["distance"] for r in crops["results"]}
    assert after[original] < before[original]
    assert all(after[i] <= before[i] + 1e-6 for i in before)
    # The other way round: the original's centre region matches the stored crop.
    back = search(client, image_id=original, collection=collection, k=1, query_crops=True)
    assert back["results"][0]["id"] == cropped
    # Duplicate detection with crops: the cnn tier compares whole images and centre regions.
    resp = client.get(f"/api/v1/duplicates?collection={collection}&crops=true&tiers=cnn")
    assert resp.status_code == 200, resp.get_json()
    [group] = [g for g in resp.get_json()["clusters"] if original in g["ids"]]
    assert cropped in group["ids"] and group["tier"] == "cnn"


def test_region_pairs_take_the_best_of_whole_and_region() -> None:
    rng = np.random.default_rng(1)
    whole, regions = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    ids = [uuid.UUID(int=i) for i in range(30)]
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (whole, regions)]
    best = 1 - np.maximum(np.maximum(unit[0] @ unit[0].T, unit[0] @ unit[1].T),
                          unit[1] @ unit[0].T)
    brute = {(ids[i], ids[j]) for i in range(30) for j in range(i + 1, 30) if best[i, j] <= 0.3}
    assert brute and {(a, b) for a, b, _ in region_pairs(ids, whole, regions, 0.3)} == brute


def test_cli_installs_a_hand_crafted_model_into_the_database(
        app: Flask, settings: dict[str, Any], handcrafted: None) -> None:
    import subprocess
    import sys

    from service.config import PROJECT_ROOT
    from tests.conftest import worker_env

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "service.cli", "models", *args],
                              cwd=PROJECT_ROOT, env=worker_env(settings), capture_output=True,
                              text=True, timeout=120)

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "hsv-hist" in listed.stdout and "phash" in listed.stdout
    with app.app_context(), session_scope() as session:
        drop_model(PHASH, session=session)  # installed from scratch (the fixture drops it)
    done = cli("install", PHASH)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "enabled phash (dim=64)" in done.stdout
    with app.app_context(), session_scope() as session:
        model = find_model(PHASH, session=session)
        assert model is not None and model.dim == 64
        engine = session.get_bind()
    wait_for_indexes(engine, model.id)  # built CONCURRENTLY after the command's commit
    with app.app_context(), session_scope() as session:
        assert session.scalar(text("SELECT to_regclass(:n) IS NOT NULL"),
                              {"n": index_name(model.id, "hamming")})
