"""Automatic tags from the classifier, and the label bridge from words to images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient

from service.text import sentence
from service.text.labels import class_synonyms


def test_uploads_get_automatic_tags(client: FlaskClient, cat_and_coffee) -> None:
    collection, ids = cat_and_coffee
    cat = client.get(f"/api/v1/images/{ids['cat']}").get_json()
    coffee = client.get(f"/api/v1/images/{ids['coffee']}").get_json()
    assert len(cat["auto_tags"]) == 5 and len(coffee["auto_tags"]) == 5
    assert "cat" in cat["auto_tags"][0]["label"], cat["auto_tags"]
    probs = [t["p"] for t in cat["auto_tags"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    # Automatic tags are full-text searchable.
    found = client.post("/api/v1/search", json={"text": "cat", "collection": collection})
    assert [r["id"] for r in found.get_json()["results"]] == [ids["cat"]]


@pytest.mark.parametrize("text,first", [("a cat", "cat"), ("kitten", "cat"),
                                        ("a cup of coffee", "coffee"), ("espresso", "coffee")])
def test_label_bridge_ranks_the_right_photo_first(client: FlaskClient, cat_and_coffee,
                                                  sentence_model: Path, text: str,
                                                  first: str) -> None:
    collection, ids = cat_and_coffee
    resp = client.post("/api/v1/search", json={"text": text, "text_mode": "semantic",
                                               "collection": collection, "explain": True})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert [r["id"] for r in body["results"]][0] == ids[first]
    assert body["results"][0]["score"] > body["results"][1]["score"]
    assert body["metric"] == "label_bridge" and body["explain"]["method"] == "semantic"


def test_hybrid_semantic_with_an_image(client: FlaskClient, cat_and_coffee,
                                       sentence_model: Path) -> None:
    collection, ids = cat_and_coffee
    body = client.post("/api/v1/search", json={
        "text": "coffee", "text_mode": "semantic", "image_id": ids["cat"],
        "collection": collection}).get_json()
    # The query image is left out; the coffee photo is the only other one.
    assert [r["id"] for r in body["results"]] == [ids["coffee"]]
    assert body["metric"] == "rrf"


def test_bridge_weights_are_a_sparse_distribution() -> None:
    sims = np.linspace(-1, 1, 1000)
    w = sentence.bridge_weights(sims, sentence.Bridge(top=10, temperature=0.05))
    assert w.sum() == pytest.approx(1.0) and np.count_nonzero(w) == 10
    assert w.argmax() == 999


def test_onnx_sentence_model_matches_a_torch_reference(sentence_model: Path) -> None:
    """The ONNX graph against BERT written out in PyTorch from the same safetensors weights."""
    torch = pytest.importorskip("torch")
    encoder = sentence.get_sentence_encoder(sentence_model)
    texts = ["a cat", "red dress", "a longer sentence, with punctuation and [brackets]"]
    got = encoder.encode(texts)
    w = {k: torch.from_numpy(v.copy()) for k, v in sentence.read_safetensors(
        sentence.package_dir() / "model.safetensors").items()}
    enc = encoder.tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc]).float()
    length = ids.shape[1]

    def ln(x, p):  # noqa: ANN001, ANN202
        return torch.nn.functional.layer_norm(x, (384,), w[f"{p}.weight"], w[f"{p}.bias"], 1e-12)

    def lin(x, p):  # noqa: ANN001, ANN202
        return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    def heads(t):  # noqa: ANN001, ANN202
        return t.view(t.shape[0], length, 12, 32).transpose(1, 2)

    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:length]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    bias = (1 - mask)[:, None, None, :] * -10000.0
    for i in range(6):
        p = f"encoder.layer.{i}"
        q, k, v = (heads(lin(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5 + bias, -1)
        c = (a @ v).transpose(1, 2).reshape(-1, length, 384)
        x = ln(lin(c, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = torch.nn.functional.gelu(lin(x, f"{p}.intermediate.dense"))
        x = ln(lin(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    want = torch.nn.functional.normalize(pooled, dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(class_synonyms()) == 1000 and encoder.labels is not None
    assert encoder.labels.shape == (1000, 384)


def test_backfill_classifies_images_embedded_before_migration_0007(
        app, settings: dict, cat_and_coffee) -> None:  # noqa: ANN001
    from click.testing import CliRunner
    from sqlalchemy import delete, select

    from service.cli import main
    from service.db import session_scope
    from service.images.models import Image
    from service.text.models import ImageClasses
    from tests.conftest import worker_env

    collection, ids = cat_and_coffee
    with app.app_context(), session_scope() as session:
        session.execute(delete(ImageClasses).where(ImageClasses.image_id == ids["cat"]))
        session.get(Image, ids["cat"]).auto_tags = []
        session.commit()
    result = CliRunner().invoke(main, ["tags", "backfill", "--collection", collection],
                                env=worker_env(settings))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("classified 1 images")
    with app.app_context(), session_scope() as session:
        assert session.scalar(select(ImageClasses.image_id).where(
            ImageClasses.image_id == ids["cat"])) is not None
        assert "cat" in session.get(Image, ids["cat"]).auto_tags[0]["label"]


def test_hybrid_with_an_uploaded_photo(client: FlaskClient, cat_and_coffee,
                                       sentence_model: Path) -> None:
    import io
    import json

    import skimage.data

    from tests.text.conftest import jpeg

    collection, ids = cat_and_coffee
    for weight, first in ((0.8, "coffee"), (0.2, "cat")):
        query = {"text": "coffee", "text_mode": "semantic", "collection": collection,
                 "text_weight": weight}
        resp = client.post("/api/v1/search", data={
            "file": (io.BytesIO(jpeg(skimage.data.chelsea())), "q.jpg"),
            "query": json.dumps(query)}, content_type="multipart/form-data")
        assert resp.status_code == 200, resp.get_json()
        assert resp.get_json()["results"][0]["id"] == ids[first]
