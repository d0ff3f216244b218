"""Heads on toy data, and their ONNX export against the numpy reference."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from PIL import Image as PILImage

from service.embedding.transforms import Preprocessing
from service.evaluation.metrics import exact_cosine_scores
from service.training.augment import VIEWS, embed_views, views
from service.training.cosine import fit_cosine_head
from service.training.heads import fit_classifier, fit_pca_whitening
from service.training.onnx_head import append_head


def toy(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes separable in 3 of 40 non-negative dims, drowned in noisy ones."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    x = rng.gamma(2.0, 1.0, size=(len(y), 40))
    x[np.arange(len(y)), y] += 3.0
    return x.astype(np.float32), y


def test_classifier_head_improves_map_on_a_separable_toy_set() -> None:
    x, y = toy(40, 0)
    test_x, test_y = toy(30, 1)
    labels = [str(v) for v in test_y]
    raw = exact_cosine_scores(test_x, labels, ks=(10,)).mean_ap
    head = fit_classifier(x, y, ["0", "1", "2"], val_x=test_x[::2],
                          val_labels=labels[::2])
    tuned = exact_cosine_scores(head.transform(test_x), labels, ks=(10,)).mean_ap
    assert tuned > raw + 0.2, (raw, tuned)
    assert head.record["iterations"] > 0


def test_cosine_head_improves_map_on_a_separable_toy_set() -> None:
    x, y = toy(40, 0)
    test_x, test_y = toy(30, 1)
    labels = [str(v) for v in test_y]
    raw = exact_cosine_scores(test_x, labels, ks=(10,)).mean_ap
    head = fit_cosine_head(x, y, ["0", "1", "2"], val_x=test_x[::2], val_labels=labels[::2],
                           hidden=32, epochs=30, batch_size=32, lr=0.03)
    tuned = exact_cosine_scores(head.transform(test_x), labels, ks=(10,)).mean_ap
    assert tuned > raw + 0.1, (raw, tuned)
    assert head.dim == 32 + 3 and head.record["epochs"] > 0
    assert head.record["mix"] in (0.5, 1.0, 2.0)  # picked on the validation split


def test_augmentation_views_are_model_inputs_and_embed_per_image() -> None:
    prep = Preprocessing(size=8, resize=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    buffer = io.BytesIO()
    PILImage.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3)).save(
        buffer, "PNG")
    data = buffer.getvalue()
    arrays = views(data, prep, max_pixels=10**6)
    assert len(arrays) == len(VIEWS) and all(a.shape == (3, 8, 8) for a in arrays)
    np.testing.assert_allclose(arrays[VIEWS.index("wide-flip")],
                               arrays[VIEWS.index("wide")][:, :, ::-1])
    feats = embed_views([data] * 3, lambda b: b.reshape(len(b), -1)[:, :5], prep,
                        max_pixels=10**6, batch_size=4)
    assert feats.shape == (3, len(VIEWS), 5)  # batches may straddle images


def backbone(dim: int = 40) -> onnx.ModelProto:
    """A stand-in backbone: image (N,3,4,4)->embedding (N,dim) by a fixed linear map."""
    w = np.abs(np.random.default_rng(2).normal(size=(48, dim))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["embedding"]),
         helper.make_node("Identity", ["flat"], ["logits"])],
        "backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 48])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_onnx_head_computes_what_numpy_does(tmp_path: Path) -> None:
    base = backbone()
    images = np.abs(np.random.default_rng(3).normal(size=(6, 3, 4, 4))).astype(np.float32)
    features = ort.InferenceSession(base.SerializeToString()).run(None, {"image": images})[0]
    x, y = toy(20, 4)
    for head in (fit_classifier(x, y, ["a", "b", "c"], max_iter=50),
                 fit_pca_whitening(x, dim=8, shrinkage=0.5),
                 fit_cosine_head(x, y, ["a", "b", "c"], hidden=16, epochs=3, batch_size=16),
                 fit_cosine_head(x, y, ["a", "b", "c"], hidden=0, epochs=3, mix=None)):
        model = append_head(base, head)
        session = ort.InferenceSession(model.SerializeToString())
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {"image": images}), strict=True))
        np.testing.assert_allclose(outputs["embedding"], head.transform(features), atol=1e-4)
        assert outputs["embedding"].shape == (6, head.dim)
        assert outputs["logits"].shape == (6, 48)  # the backbone's other outputs stay
