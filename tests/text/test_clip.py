"""Bring your own CLIP: a tiny generated image/text encoder pair through the real plumbing."""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from onnx import TensorProto, helper, numpy_helper
from PIL import Image as PILImage

from service.cli import main
from service.db import session_scope
from service.indexing.reindex import reindex_step, start_reindex
from tests.api.test_images import upload
from tests.conftest import wait_for_status

WORDS = {"[PAD]": 0, "[UNK]": 1, "red": 2, "green": 3, "blue": 4}


def tiny_clip(folder: Path) -> tuple[Path, Path, Path]:
    """An image encoder (mean RGB) and a text encoder (mean of word vectors) into one 3-d space,
    with a word-level tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    image = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["embedding"], axes=[2, 3], keepdims=0)],
        "tiny-clip-image",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    table = np.zeros((len(WORDS), 3), np.float32)
    table[WORDS["[UNK]"]] = 0.1
    for i, word in enumerate(("red", "green", "blue")):
        table[WORDS[word], i] = 1.0
    text = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["words"]),
         helper.make_node("ReduceMean", ["words"], ["text_embedding"], axes=[1], keepdims=0)],
        "tiny-clip-text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("text_embedding", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(table, "table")]),
        opset_imports=[helper.make_opsetid("", 17)])
    for model in (image, text):
        model.ir_version = 8
    onnx.save_model(image, folder / "image.onnx")
    onnx.save_model(text, folder / "text.onnx")
    tokenizer = Tokenizer(WordLevel(WORDS, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "image.onnx", folder / "text.onnx", folder / "tokenizer.json"


def solid(rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (40, 30), rgb).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def clip(app: Flask, settings: dict[str, Any], worker: object,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The tiny pair added with `lookalike models add`, and three solid colours reindexed."""
    name = f"tinyclip-{uuid.uuid4().hex[:6]}"
    image, text, tokenizer = tiny_clip(tmp_path_factory.mktemp("clip"))
    result = CliRunner().invoke(main, [
        "models", "add", name, "--onnx", str(image), "--size", "16", "--mean", "0", "--std", "1",
        "--text-onnx", str(text), "--tokenizer", str(tokenizer), "--text-length", "8"],
        env={"LOOKALIKE_MODEL_DIR": settings["MODEL_DIR"]})
    assert result.exit_code == 0, result.output
    assert "with a text encoder" in result.output
    client = app.test_client()
    collection = f"colours-{uuid.uuid4().hex[:6]}"
    ids = {}
    for colour, rgb in (("red", (230, 20, 20)), ("green", (20, 200, 30)),
                        ("blue", (10, 30, 220))):
        ids[colour] = upload(client, solid(rgb), collection=collection,
                             name=f"{colour}.png").get_json()["id"]
    for image_id in ids.values():
        assert wait_for_status(client, image_id)["status"] == "ready"
    with app.app_context(), session_scope() as session:
        run = start_reindex(collection, name, session=session,
                            model_dir=settings["MODEL_DIR"])
        while reindex_step(run.id, session=session, store=app.extensions["content_store"],
                           model_dir=settings["MODEL_DIR"], max_pixels=10**7):
            pass
    yield name, collection, ids
    shutil.rmtree(Path(settings["MODEL_DIR"]) / name, ignore_errors=True)


@pytest.mark.parametrize("words,first", [("red", "red"), ("green", "green"),
                                         ("blue please", "blue")])
def test_clip_text_search_finds_the_colour(client: FlaskClient, clip, words: str,
                                           first: str) -> None:
    name, collection, ids = clip
    resp = client.post("/api/v1/search", json={"text": words, "text_mode": "clip",
                                               "model": name, "collection": collection})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["results"][0]["id"] == ids[first] and len(body["results"]) == 3
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=0.02)


def test_clip_hybrid_and_errors(client: FlaskClient, clip) -> None:
    name, collection, ids = clip
    body = client.post("/api/v1/search", json={
        "text": "green", "text_mode": "clip", "model": name, "image_id": ids["red"],
        "collection": collection, "text_weight": 0.9}).get_json()
    assert [r["id"] for r in body["results"]][0] == ids["green"]
    assert ids["red"] not in [r["id"] for r in body["results"]]
    # The default model has no text encoder.
    none = client.post("/api/v1/search", json={"text": "red", "text_mode": "clip",
                                               "collection": collection})
    assert none.status_code == 400 and none.get_json()["error"]["code"] == "no_text_encoder"


def test_models_add_refuses_a_text_encoder_of_another_size(settings: dict[str, Any],
                                                           tmp_path: Path) -> None:
    image, text, tokenizer = tiny_clip(tmp_path)
    model = onnx.load_model(text)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.zeros((len(WORDS), 4), np.float32), "table"))
    onnx.save_model(model, tmp_path / "wide.onnx")
    name = f"badclip-{uuid.uuid4().hex[:6]}"
    try:
        result = CliRunner().invoke(main, [
            "models", "add", name, "--onnx", str(image), "--size", "16",
            "--text-onnx", str(tmp_path / "wide.onnx"), "--tokenizer", str(tokenizer)],
            env={"LOOKALIKE_MODEL_DIR": settings["MODEL_DIR"]})
        assert result.exit_code != 0 and "image vectors have 3" in result.output
    finally:
        shutil.rmtree(Path(settings["MODEL_DIR"]) / name, ignore_errors=True)
