"""Fine-tuning on a real labelled collection installs a backbone+head model that works."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from flask import Flask
from onnx import numpy_helper

from service.db import session_scope
from service.embedding import registry
from service.embedding.session import Embedder
from service.errors import ApiError
from service.evaluation.metrics import exact_cosine_scores
from service.training.augment import VIEWS
from service.training.service import _side, finetune
from service.training.tails import TOP_SCHEDULE, find_tail, find_top, top_tail
from tests.conftest import wait_for_status

pytestmark = pytest.mark.usefixtures("worker")
COLLECTION = "t-train"


@pytest.fixture(scope="module")
def labelled(app: Flask, clothing: Path) -> list[tuple[str, str]]:
    """48 photos from 4 classes with their sender ids."""
    client = app.test_client()
    with (clothing / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    chosen = []
    for label in ("Shoes", "Hat", "Pants", "T-Shirt"):
        chosen += [r for r in rows if r["label"] == label][:12]
    out = []
    for r in chosen:
        meta = {"label": r["label"], "sender_id": r["sender_id"]}
        resp = client.post("/api/v1/images", data={
            "file": (io.BytesIO((clothing / r["file"]).read_bytes()), "x.jpg"),
            "collection": COLLECTION, "metadata": json.dumps(meta)},
            content_type="multipart/form-data")
        out.append((resp.get_json()["id"], r["file"]))
    for image_id, _ in out:
        assert wait_for_status(client, image_id)["status"] == "ready"
    return out


@pytest.fixture
def models(model_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(model_dir / "efficientnet-lite0", tmp_path / "efficientnet-lite0")
    return tmp_path


@pytest.mark.parametrize("unsupervised", [False, True])
def test_finetune_installs_a_working_model(app: Flask, labelled, models: Path, clothing: Path,
                                           unsupervised: bool) -> None:
    with app.app_context(), session_scope() as session:
        out = finetune(session=session, collection=COLLECTION, label_key="label",
                       base="efficientnet-lite0", model_dir=models, split_key=None,
                       unsupervised=unsupervised, dim=16, head_kind="linear")
    assert out.model == "efficientnet-lite0+head-1"
    info = registry.verify(models, out.model)
    assert info.extra["training"]["train_images"] == out.train_images
    assert info.dim == (16 if unsupervised else 4)
    embedder = Embedder(info, models / out.model / "model.onnx")
    photo = (clothing / labelled[0][1]).read_bytes()
    result = embedder.embed_bytes([photo], max_pixels=10**8)
    assert result.vectors.shape == (1, info.dim) and np.isfinite(result.vectors).all()
    if not unsupervised:
        assert result.vectors.sum() == pytest.approx(1.0, abs=1e-4)  # class probabilities
        assert out.head_test_map >= out.raw_test_map - 0.05


def test_augmented_cosine_head_trains_on_extra_views(app: Flask, labelled, models: Path,
                                                     clothing: Path) -> None:
    with app.app_context(), session_scope() as session:
        out = finetune(session=session, collection=COLLECTION, label_key="label",
                       base="efficientnet-lite0", model_dir=models, split_key="sender_id",
                       head_kind="cosine", hidden=32, epochs=3,
                       store=app.extensions["content_store"])
    record = registry.verify(models, out.model).extra["training"]
    assert record["head"] == "cosine-mlp" and record["augment"] == list(VIEWS)
    assert record["fit_rows"] == record["fit_images"] * (1 + len(VIEWS))
    info = registry.verify(models, out.model)
    assert info.dim == 32 + 4  # hidden layer, then the 4 class probabilities
    embedder = Embedder(info, models / out.model / "model.onnx")
    result = embedder.embed_bytes([(clothing / labelled[0][1]).read_bytes()], max_pixels=10**8)
    assert result.vectors.shape == (1, info.dim) and np.isfinite(result.vectors).all()


@pytest.mark.parametrize("tune", [None, "last-block"])  # None: last-conv when it can
def test_finetune_retrains_the_backbones_last_layers(app: Flask, labelled, models: Path,
                                                     clothing: Path, tune: str | None) -> None:
    reports: list[tuple[str, int, int]] = []
    with app.app_context(), session_scope() as session:
        out = finetune(session=session, collection=COLLECTION, label_key="label",
                       base="efficientnet-lite0", model_dir=models, split_key="sender_id",
                       hidden=32, epochs=2, store=app.extensions["content_store"], tune=tune,
                       progress=lambda *report: reports.append(report))
        with pytest.raises(ApiError, match="needs the cosine head"):
            finetune(session=session, collection=COLLECTION, label_key="label",
                     base="efficientnet-lite0", model_dir=models, head_kind="linear",
                     store=app.extensions["content_store"], tune="last-conv")
        with pytest.raises(ApiError, match="unknown --tune"):
            finetune(session=session, collection=COLLECTION, label_key="label",
                     base="efficientnet-lite0", model_dir=models, tune="everything")
    info = registry.verify(models, out.model)
    record = info.extra["training"]
    assert record["tail"]["tap"] and record["fit_rows"] == record["fit_images"] * (
        1 + len(VIEWS))
    depth = tune or "last-conv"
    tuned = find_tail(onnx.load_model(models / out.model / "model.onnx"), "embedding_backbone",
                      depth)
    stock = find_tail(onnx.load_model(models / "efficientnet-lite0" / "model.onnx"), depth=depth)
    assert record["tail"]["layers"] == stock.nodes == tuned.nodes
    # The whole last block, or the last conv; then the pool and the flatten.
    assert len(stock.nodes) == (9 if tune else 4)
    last = {stage: (done, total) for stage, done, total in reports}
    assert last == {"feature maps": (len(labelled), len(labelled)),
                    "augmentation views": (record["fit_images"], record["fit_images"]),
                    "epochs": (2, 2)}
    assert set(tuned.weights) == set(stock.weights)
    for name, old in stock.weights.items():
        assert tuned.weights[name].shape == old.shape
        assert not np.allclose(tuned.weights[name], old), name
    embedder = Embedder(info, models / out.model / "model.onnx")
    result = embedder.embed_bytes([(clothing / labelled[0][1]).read_bytes()], max_pixels=10**8)
    assert result.vectors.shape == (1, 32 + 4) and np.isfinite(result.vectors).all()


def test_finetune_retrains_the_top_blocks_through_onnx_graphs(app: Flask, labelled,
                                                             models: Path,
                                                             clothing: Path) -> None:
    with app.app_context(), session_scope() as session:
        out = finetune(session=session, collection=COLLECTION, label_key="label",
                       base="efficientnet-lite0", model_dir=models, split_key="sender_id",
                       hidden=32, epochs=2, store=app.extensions["content_store"], tune="top")
    info = registry.verify(models, out.model)
    record = info.extra["training"]
    stock = onnx.load_model(models / "efficientnet-lite0" / "model.onnx")
    assert record["tail"]["tap"] == find_top(stock) and record["epochs"] <= 2
    assert record["fit_rows"] == record["fit_images"] * (1 + len(VIEWS))
    assert record["rows_per_epoch"] == record["fit_images"]  # the views take turns
    assert record["tail"]["warmup_epochs"] == TOP_SCHEDULE["tail_warmup"] > 0
    trained = {i.name: numpy_helper.to_array(i) for i in onnx.load_model(
        models / out.model / "model.onnx").graph.initializer}
    tail = top_tail(stock)
    for name, old in tail.weights.items():  # every conv of blocks 11-15 and the head conv
        assert trained[name].shape == old.shape and not np.allclose(trained[name], old), name
    embedder = Embedder(info, models / out.model / "model.onnx")
    result = embedder.embed_bytes([(clothing / labelled[0][1]).read_bytes()], max_pixels=10**8)
    assert result.vectors.shape == (1, 32 + 4) and np.isfinite(result.vectors).all()


def test_joined_backbones_retrain_their_top_blocks(app: Flask, labelled, models: Path,
                                                   clothing: Path) -> None:
    registry.install("efficientnet-lite2", models)
    with app.app_context(), session_scope() as session:
        out = finetune(session=session, collection=COLLECTION, label_key="label",
                       base="efficientnet-lite0,efficientnet-lite2", model_dir=models,
                       split_key="sender_id", hidden=16, epochs=1, tune="top",
                       store=app.extensions["content_store"])
    info = registry.verify(models, out.model)
    record = info.extra["training"]
    assert all(b["rows_per_epoch"] == b["fit_images"] for b in record["branches"])
    embedder = Embedder(info, models / out.model / "model.onnx")
    result = embedder.embed_bytes([(clothing / labelled[0][1]).read_bytes()], max_pixels=10**8)
    assert result.vectors.shape == (1, info.dim) and np.isfinite(result.vectors).all()


def test_finetune_joins_two_backbones_into_one_model(app: Flask, labelled, models: Path,
                                                     clothing: Path) -> None:
    registry.install("efficientnet-lite2", models)
    bases = "efficientnet-lite0,efficientnet-lite2"
    store = app.extensions["content_store"]
    reports: list[tuple[str, int, int]] = []
    with app.app_context(), session_scope() as session:
        out = finetune(session=session, collection=COLLECTION, label_key="label", base=bases,
                       model_dir=models, split_key="sender_id", hidden=16, epochs=2,
                       store=store, tune=None,  # None: last-conv, as the CLI's default
                       progress=lambda *report: reports.append(report))
        for bad, match in (({"tune": "none"}, "need the cosine head"),
                           ({"store": None}, "need the cosine head"),
                           ({"head_kind": "linear"}, "need the cosine head"),
                           ({"base": "efficientnet-lite0,efficientnet-lite0"}, "twice")):
            with pytest.raises(ApiError, match=match):
                finetune(session=session, collection=COLLECTION, label_key="label",
                         model_dir=models, **{"base": bases, "store": store, "tune": None, **bad})
    assert out.model == "efficientnet-lite0+efficientnet-lite2+head-1"
    info = registry.verify(models, out.model)
    record = info.extra["training"]
    assert record["bases"] == bases.split(",") and len(record["branches"]) == 2
    # lite2's input is the model's; lite0 sees it resized to 224 inside the graph.
    assert (info.input_size, info.resize, info.outputs) == (260, 297, ["embedding", "logits"])
    assert info.dim == sum(b["dim"] for b in record["branches"]) == 2 * (16 + 4)
    assert all(b["tail"]["layers"] for b in record["branches"])
    # Each backbone reports its own stages, so that the CLI draws a bar for each.
    assert {stage for stage, _, _ in reports} == {
        f"{b}: {stage}" for b in bases.split(",")
        for stage in ("feature maps", "augmentation views", "epochs")}
    # The installed graph reproduces what training scored: each test photo through it.
    with (clothing / "labels.csv").open() as fh:
        sender = {r["file"]: r["sender_id"] for r in csv.DictReader(fh)}
    test = [(f, lab) for (_, f), lab in zip(labelled, _labels(clothing, labelled), strict=True)
            if _side(sender[f])]
    embedder = Embedder(info, models / out.model / "model.onnx")
    vectors = embedder.embed_bytes([(clothing / f).read_bytes() for f, _ in test],
                                   max_pixels=10**8).vectors
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    scored = exact_cosine_scores(vectors, [lab for _, lab in test], ks=(10,))
    assert len(test) == out.test_images
    assert scored.mean_ap == pytest.approx(out.head_test_map, abs=0.005)


def test_cli_finetune_draws_the_shots_of_its_seed(settings: dict, labelled,
                                                  models: Path) -> None:
    from click.testing import CliRunner

    from service.cli import main
    from tests.conftest import worker_env

    env = {**worker_env(settings), "LOOKALIKE_MODEL_DIR": str(models)}
    args = ["finetune", "--collection", COLLECTION, "--split-key", "sender_id", "--shots", "3",
            "--no-augment", "--epochs", "2"]
    for seed in ("0", "7"):
        result = CliRunner().invoke(main, [*args, "--seed", seed], env=env)
        assert result.exit_code == 0, result.output
    first, second = (registry.verify(models, f"efficientnet-lite0+head-{n}").extra["training"]
                     for n in (1, 2))
    assert (first["seed"], second["seed"]) == (0, 7)
    assert first["shots"] == second["shots"] == 3 and first["fit_images"] == 4 * 3
    refused = CliRunner().invoke(main, [*args, "--seed", "-1"], env=env)
    assert refused.exit_code == 2 and "--seed" in refused.output


def _labels(clothing: Path, labelled: list[tuple[str, str]]) -> list[str]:
    with (clothing / "labels.csv").open() as fh:
        label = {r["file"]: r["label"] for r in csv.DictReader(fh)}
    return [label[f] for _, f in labelled]


@pytest.mark.parametrize("option", [{"shots": 0}, {"shots": -3}, {"dim": 0}, {"epochs": 0},
                                    {"epochs": -1}, {"hidden": -1}])
def test_bad_sizes_are_refused(app: Flask, labelled, models: Path, option: dict) -> None:
    # Before this check, epochs 0 fell back to the default and -1 trained nothing.
    name = next(iter(option))
    with app.app_context(), session_scope() as session, \
            pytest.raises(ApiError, match=f"--{name} must be at least"):
        finetune(session=session, collection=COLLECTION, label_key="label",
                 base="efficientnet-lite0", model_dir=models, **option)


def test_bad_labels_and_splits(app: Flask, labelled, models: Path) -> None:
    with app.app_context(), session_scope() as session:
        with pytest.raises(ApiError, match="carry the metadata key 'nope'"):
            finetune(session=session, collection=COLLECTION, label_key="nope",
                     base="efficientnet-lite0", model_dir=models)
        with pytest.raises(ApiError, match="no metadata key 'missing'"):
            finetune(session=session, collection=COLLECTION, label_key="label",
                     base="efficientnet-lite0", model_dir=models, split_key="missing")
