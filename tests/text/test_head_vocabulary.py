"""The label bridge through a fine-tuned head's own classes: real photos, heads and SQL."""

from __future__ import annotations

import csv
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from onnx import TensorProto, helper

from service.db import session_scope
from service.embedding import registry
from service.embedding.service import find_model, stored_vector
from service.indexing.reindex import reindex_step, start_reindex
from service.text.vocabulary import head_vocabulary, vocabulary_weights
from service.training.service import finetune
from tests.api.test_images import upload
from tests.conftest import DEFAULT_MODEL, wait_for_status

# Shirt has no ImageNet class: the ImageNet bridge cannot find shirts (docs/search.md), the
# head's vocabulary can.
LABELS = ("Hat", "Shirt", "Shoes")
PER_LABEL = 8


def mean_rgb_model(path: Path) -> Path:
    """A tiny image model without an ImageNet head (no logits): the mean colour."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["embedding"], axes=[2, 3], keepdims=0)],
        "mean-rgb", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def heads(app: Flask, settings: dict[str, Any], worker: object, clothing: Path,
          sentence_model: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[str, dict[str, str], dict[str, str]]]:
    """8 photos each of a hat, a shirt and shoes; a cosine, a linear and a PCA head fitted on
    them, and a model with no classes at all, each reindexed over the collection."""
    client = app.test_client()
    collection = f"heads-{uuid.uuid4().hex[:6]}"
    with (clothing / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    label_of = {}
    for label in LABELS:
        for i, r in enumerate([r for r in rows if r["label"] == label][:PER_LABEL]):
            # `part` fixes the split (8 of the 24 photos on the test side, all 3 labels on the
            # training side): the same heads every run.
            meta = {"label": label, "sender_id": r["sender_id"], "part": f"{label}-{i}"}
            resp = upload(client, clothing / r["file"], collection=collection,
                          metadata=json.dumps(meta))
            assert resp.status_code in (200, 202), resp.get_json()
            label_of[resp.get_json()["id"]] = label
    for image_id in label_of:
        assert wait_for_status(client, image_id)["status"] == "ready"
    model_dir = Path(settings["MODEL_DIR"])
    tag = uuid.uuid4().hex[:6]
    names = {"plain": f"mean-rgb-{tag}"}
    registry.add_onnx(names["plain"], mean_rgb_model(tmp_path_factory.mktemp("plain") / "m.onnx"),
                      model_dir, size=16, resize=None, mean=(0, 0, 0), std=(1, 1, 1))
    try:
        with app.app_context(), session_scope() as session:
            for kind, options in (("cosine", {"head_kind": "cosine"}),
                                  ("linear", {"head_kind": "linear"}),
                                  ("pca", {"unsupervised": True, "dim": 8})):
                names[kind] = finetune(session=session, collection=collection,
                                       label_key="label", split_key="part", base=DEFAULT_MODEL,
                                       model_dir=model_dir, name=f"{DEFAULT_MODEL}+{kind}-{tag}",
                                       **options).model
            for name in names.values():
                run = start_reindex(collection, name, session=session, model_dir=model_dir)
                while reindex_step(run.id, session=session, store=app.extensions["content_store"],
                                   model_dir=model_dir, max_pixels=10**8):
                    pass
        yield collection, label_of, names
    finally:
        for name in names.values():
            shutil.rmtree(model_dir / name, ignore_errors=True)


def semantic(client: FlaskClient, **query: Any) -> Any:
    return client.post("/api/v1/search", json={"text_mode": "semantic", "explain": True,
                                               **query})


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("words,label", [("hat", "Hat"), ("shirt", "Shirt"),
                                         ("a pair of shoes", "Shoes")])
def test_head_vocabulary_ranks_the_label_first(app: Flask, client: FlaskClient, heads,
                                               settings: dict[str, Any], kind: str, words: str,
                                               label: str) -> None:
    collection, label_of, names = heads
    resp = semantic(client, text=words, model=names[kind], collection=collection,
                    k=PER_LABEL)
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    got = [label_of[r["id"]] for r in body["results"]]
    # Two thirds of the photos trained the head; the rest it has never seen.
    assert got[0] == label and got.count(label) >= PER_LABEL - 2, got
    assert body["metric"] == "label_bridge" and body["model"] == names[kind]
    assert any(n.startswith("vocabulary: the 3 classes of head") and "Shirt" in n
               for n in body["explain"]["notes"]), body["explain"]["notes"]
    # The SQL score is the query's class weights against the class slice of the stored vector.
    vocabulary = head_vocabulary(settings["MODEL_DIR"], names[kind])
    assert vocabulary is not None and vocabulary.classes == tuple(sorted(LABELS))
    weights = vocabulary_weights(words, vocabulary, model_dir=settings["MODEL_DIR"])
    assert vocabulary.classes[int(np.argmax(weights))] == label
    with app.app_context(), session_scope() as session:
        model = find_model(names[kind], session=session)
        for hit in body["results"]:
            vector = stored_vector(uuid.UUID(hit["id"]), model, session=session)
            assert hit["score"] == pytest.approx(
                float(vector[-vocabulary.count:] @ weights), abs=2e-3)
    if kind == "linear":  # the embedding is the probabilities: the whole vector
        assert vocabulary.start == 1 and vocabulary.dim == 3


def test_head_vocabulary_in_a_hybrid(client: FlaskClient, heads) -> None:
    collection, label_of, names = heads
    hat = next(i for i, label in label_of.items() if label == "Hat")
    for weight, first in ((0.8, "Shirt"), (0.2, "Hat")):
        resp = semantic(client, text="shirt", model=names["cosine"], image_id=hat,
                        collection=collection, text_weight=weight, k=5)
        assert resp.status_code == 200, resp.get_json()
        body = resp.get_json()
        ids = [r["id"] for r in body["results"]]
        assert hat not in ids and label_of[ids[0]] == first, [label_of[i] for i in ids]
        assert body["metric"] == "rrf" and body["explain"]["method"] == "hybrid_semantic"
        assert any(n.startswith("vocabulary: the 3 classes") for n in body["explain"]["notes"])


def test_models_without_head_classes(client: FlaskClient, heads) -> None:
    collection, label_of, names = heads
    # A PCA head keeps its backbone's ImageNet logits, so its images have class probabilities:
    # the ImageNet vocabulary serves it (as before heads had one), which finds hats.
    resp = semantic(client, text="hat", model=names["pca"], collection=collection, k=3)
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert any(n.startswith("vocabulary: the 1,000 ImageNet classes")
               for n in body["explain"]["notes"])
    assert [label_of[r["id"]] for r in body["results"]] == ["Hat"] * 3
    # A model with neither head classes nor ImageNet probabilities: a clear 400, not a 500.
    for query in ({}, {"image_id": next(iter(label_of))}):
        resp = semantic(client, text="hat", model=names["plain"], collection=collection,
                        **query)
        assert resp.status_code == 400, resp.get_json()
        error = resp.get_json()["error"]
        assert error["code"] == "no_vocabulary" and names["plain"] in error["message"]
