"""Evaluation of a real labelled collection through the search path, and its report."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask

from service.db import session_scope
from service.embedding.service import find_model
from service.errors import ApiError
from service.evaluation.service import evaluate_collection
from tests.conftest import wait_for_status

pytestmark = pytest.mark.usefixtures("worker")
COLLECTION = "t-eval"


@pytest.fixture(scope="module")
def labelled(app: Flask, clothing: Path) -> list[str]:
    """24 real photos from 4 classes, uploaded with their labels."""
    client = app.test_client()
    with (clothing / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    chosen = []
    for label in ("Shoes", "Hat", "Dress", "Longsleeve"):
        chosen += [r for r in rows if r["label"] == label][:6]
    ids = []
    for r in chosen:
        resp = client.post("/api/v1/images", data={
            "file": (io.BytesIO((clothing / r["file"]).read_bytes()), "x.jpg"),
            "collection": COLLECTION, "metadata": json.dumps({"label": r["label"]})},
            content_type="multipart/form-data")
        assert resp.status_code in (200, 202), resp.get_json()
        ids.append(resp.get_json()["id"])
    for image_id in ids:
        assert wait_for_status(client, image_id)["status"] == "ready"
    return ids


@pytest.mark.parametrize("method", ["index", "exact"])
def test_service_path_matches_brute_force(app: Flask, labelled: list[str], method: str) -> None:
    with app.app_context(), session_scope() as session:
        model = find_model("efficientnet-lite0", session=session)
        result = evaluate_collection(session=session, collection=COLLECTION, label_key="label",
                                     model=model, ks=(1, 5), method=method)
    assert result.images == 24 and result.classes == 4 and result.service.queries == 24
    assert abs(result.service.mean_ap - result.exact.mean_ap) < 0.01
    # Real features separate shoes from hats: far better than chance (about 0.2).
    assert result.exact.mean_ap > 0.5
    assert set(result.per_class_ap) == {"Shoes", "Hat", "Dress", "Longsleeve"}


@pytest.mark.parametrize("method", ["index", "exact"])
def test_query_expansion_through_the_search_path_matches_brute_force(
        app: Flask, labelled: list[str], method: str) -> None:
    with app.app_context(), session_scope() as session:
        model = find_model("efficientnet-lite0", session=session)
        plain = evaluate_collection(session=session, collection=COLLECTION, label_key="label",
                                    model=model, ks=(1, 5), method=method)
        expanded = evaluate_collection(session=session, collection=COLLECTION,
                                       label_key="label", model=model, ks=(1, 5),
                                       method=method, rerank="aqe")
    assert expanded.rerank == "aqe" and expanded.summary()["rerank"] == "aqe"
    assert abs(expanded.service.mean_ap - expanded.exact.mean_ap) < 0.01
    # The expansion re-orders the rankings: their AP is not the plain one.
    assert expanded.exact.mean_ap != plain.exact.mean_ap
    with app.app_context(), session_scope() as session, pytest.raises(ApiError, match="aqe"):
        evaluate_collection(session=session, collection=COLLECTION, label_key="label",
                            model=model, rerank="diffusion")


def test_bad_labels_are_clear_errors(app: Flask, labelled: list[str]) -> None:
    with app.app_context(), session_scope() as session:
        model = find_model("efficientnet-lite0", session=session)
        with pytest.raises(ApiError, match="carry the metadata key 'colour'"):
            evaluate_collection(session=session, collection=COLLECTION, label_key="colour",
                                model=model)


def test_cli_report(settings: dict, labelled: list[str], tmp_path: Path) -> None:
    from tests.conftest import worker_env

    result = CliRunner().invoke(
        __import__("service.cli", fromlist=["main"]).main,
        ["eval", "--collection", COLLECTION, "--k", "1,5", "--rerank", "aqe",
         "--report", str(tmp_path)],
        env=worker_env(settings))
    assert result.exit_code == 0, result.output
    assert "exact brute force" in result.output and "re-ranked by aqe" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 24 and report["rerank"] == "aqe"
    assert 0 <= report["service"]["map"] <= 1
    for name in ("pr_curve.png", "per_class_ap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "index.html").read_text()
    assert "Worst queries" in page and "data:image/jpeg;base64," in page


def test_evaluation_job_over_http(app: Flask, labelled: list[str]) -> None:
    import time

    client = app.test_client()
    resp = client.post("/api/v1/evaluations",
                       json={"collection": COLLECTION, "ks": [1, 5], "rerank": "aqe"})
    assert resp.status_code == 202, resp.get_json()
    run_id = resp.get_json()["id"]
    deadline = time.monotonic() + 60
    body = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/evaluations/{run_id}").get_json()
        if body["status"] in ("done", "failed"):
            break
        time.sleep(0.3)
    assert body["status"] == "done", body
    assert body["result"]["images"] == 24 and 0.5 < body["result"]["exact"]["map"] <= 1
    assert body["result"]["rerank"] == "aqe"
    bad = client.post("/api/v1/evaluations", json={"collection": COLLECTION, "model": "nope"})
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "unknown_model"
    assert client.get("/api/v1/evaluations/not-an-id").status_code == 404


@pytest.mark.parametrize(("body", "code"), [
    ({"collection": COLLECTION, "label_key": "colour"}, "no_labelled_images"),
    ({"collection": "t-eval-nothing-here"}, "no_labelled_images"),
    ({"collection": COLLECTION, "ks": [0]}, "invalid_request"),
    ({"collection": COLLECTION, "ks": [10, 20_000]}, "invalid_request"),
    ({"collection": COLLECTION, "rerank": "diffusion"}, "invalid_request"),
])
def test_an_evaluation_that_cannot_run_is_refused_at_once(
        app: Flask, labelled: list[str], body: dict, code: str) -> None:
    from sqlalchemy import func, select

    from service.evaluation.models import EvaluationRun

    with app.app_context(), session_scope() as session:
        before = session.scalar(select(func.count()).select_from(EvaluationRun))
    resp = app.test_client().post("/api/v1/evaluations", json=body)
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["code"] == code
    with app.app_context(), session_scope() as session:  # nothing queued
        assert session.scalar(select(func.count()).select_from(EvaluationRun)) == before


def test_one_class_is_refused_at_once(app: Flask, labelled: list[str]) -> None:
    client = app.test_client()
    image_id = labelled[0]
    assert client.patch(f"/api/v1/images/{image_id}", json={"metadata": {
        "label": "Shoes", "only": "x"}}).status_code == 200
    resp = client.post("/api/v1/evaluations", json={"collection": COLLECTION,
                                                    "label_key": "only"})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "one_class"
