"""Heads on toy data, and their ONNX export against the numpy reference."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image as PILImage

from service.embedding import registry
from service.embedding.session import Embedder
from service.embedding.transforms import Preprocessing, preprocess
from service.errors import ApiError
from service.evaluation.metrics import exact_cosine_scores
from service.training.augment import VIEWS, embed_views, views
from service.training.heads import (
    ConvStage,
    _conv_grads,
    fit_classifier,
    fit_cosine_head,
    fit_pca_whitening,
)
from service.training.last_conv import MapRunner, centre_maps, find_last_conv
from service.training.onnx_head import append_head
from tests.conftest import DEFAULT_MODEL


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


def conv_backbone(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """A stand-in CNN ending like the real ones: 1x1 conv -> Clip(0, 6) -> average pool."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], name="head_conv",
                          kernel_shape=[1, 1]),
         helper.make_node("Clip", ["conv", "lo", "hi"], ["act"]),
         helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
         helper.make_node("Identity", ["pooled"], ["logits"])],
        "conv-backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", weight.shape[1]]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["N", weight.shape[1], 1, 1])],
        [onnx.numpy_helper.from_array(weight.T[:, :, None, None].astype(np.float32), "conv_w"),
         onnx.numpy_helper.from_array(bias.astype(np.float32), "conv_b"),
         onnx.numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         onnx.numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def toy_maps(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes told apart by which of 3 input channels is bright, plus 9 noisy ones."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    maps = rng.gamma(2.0, 0.5, size=(len(y), 12, 16))
    maps[np.arange(len(y)), y] += 1.5
    return maps.astype(np.float32), y


def test_conv_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(5)
    maps = rng.uniform(0.5, 1.5, size=(4, 3, 5))
    conv = ConvStage(rng.uniform(0.1, 0.5, (3, 6)).astype(np.float32),
                     np.full(6, 0.2, np.float32), 0.0, 6.0)
    mean, std = np.full(6, 0.5, np.float32), np.full(6, 2.0, np.float32)
    target = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    params = {"wc": conv.weight.copy(), "bc": conv.bias.copy(),
              "w1": rng.normal(0, 0.5, (6, 4)).astype(np.float32),
              "b1": np.full(4, 0.3, np.float32),
              "w2": rng.normal(0, 0.5, (4, 3)).astype(np.float32)}

    def loss(p: dict[str, np.ndarray]) -> float:  # written out again, in float64
        a = maps.transpose(0, 2, 1) @ p["wc"].astype(np.float64) + p["bc"]
        z = (np.sqrt(np.clip(a, 0, 6).mean(axis=1)) - mean) / std
        h = np.maximum(z @ p["w1"] + p["b1"], 0)
        u = h / (np.linalg.norm(h, axis=1, keepdims=True) + 1e-6)
        v = p["w2"] / (np.linalg.norm(p["w2"], axis=0, keepdims=True) + 1e-6)
        logits = 16.0 * u @ v
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-(target * logp).sum(axis=1).mean())

    grads = _conv_grads(params, maps, target, mean, std, conv, 16.0, 0.0,
                        np.random.default_rng(0), kept=5)
    for key, index in (("wc", (0, 1)), ("wc", (2, 5)), ("bc", (3,)), ("w1", (1, 2))):
        step = 1e-3
        plus = {k: v.astype(np.float64) for k, v in params.items()}
        minus = {k: v.astype(np.float64) for k, v in params.items()}
        plus[key][index] += step
        minus[key][index] -= step
        numeric = (loss(plus) - loss(minus)) / (2 * step)
        assert grads[key][index] == pytest.approx(numeric, rel=2e-2, abs=1e-4), key


def test_retrained_conv_recovers_what_the_pretrained_one_drops() -> None:
    # The "pretrained" conv nearly ignores the 3 informative channels: a head on its pooled
    # output cannot tell the classes apart; re-training the conv can.
    weight = np.random.default_rng(6).uniform(0.0, 0.3, (12, 8)).astype(np.float32)
    weight[:3] = 0.001
    conv = ConvStage(weight, np.zeros(8, np.float32), 0.0, 6.0)
    maps, y = toy_maps(40, 0)
    test_maps, test_y = toy_maps(30, 1)
    labels = [str(v) for v in test_y]
    stock = fit_cosine_head(conv.pool(maps), y, ["0", "1", "2"], hidden=0, epochs=20,
                            batch_size=16)
    tuned = fit_cosine_head(maps, y, ["0", "1", "2"], hidden=0, epochs=20, batch_size=16,
                            conv=conv, conv_lr=1e-2)
    stock_map = exact_cosine_scores(stock.transform(conv.pool(test_maps)), labels).mean_ap
    tuned_map = exact_cosine_scores(tuned.transform_maps(test_maps), labels).mean_ap
    assert tuned_map > stock_map + 0.2, (stock_map, tuned_map)
    assert tuned.conv is not None and not np.allclose(tuned.conv.weight, weight)
    assert tuned.record["last_conv"]["lr"] == 1e-2


def test_onnx_export_swaps_in_the_retrained_conv() -> None:
    weight = np.random.default_rng(7).uniform(0.0, 0.5, (3, 5)).astype(np.float32)
    base = conv_backbone(weight, np.full(5, 0.1, np.float32))
    site = find_last_conv(base)
    np.testing.assert_allclose(site.stage.weight, weight)
    assert (site.stage.low, site.stage.high) == (0.0, 6.0)
    images = np.random.default_rng(8).uniform(0, 2, size=(30, 3, 4, 4)).astype(np.float32)
    maps = MapRunner(base, "image").run(images)
    np.testing.assert_allclose(maps, images.reshape(30, 3, 16), atol=1e-2)  # float16
    y = np.repeat(np.arange(3), 10)
    head = fit_cosine_head(maps, y, ["a", "b", "c"], hidden=8, epochs=3, batch_size=8,
                           conv=site.stage, conv_lr=1e-2)
    model = append_head(base, head)
    outputs = dict(zip(["embedding", "logits"], ort.InferenceSession(
        model.SerializeToString()).run(["embedding", "logits"], {"image": images}),
        strict=True))
    np.testing.assert_allclose(outputs["embedding"], head.transform_maps(images.reshape(30, 3, 16)),
                               atol=1e-4)
    assert head.conv is not None
    np.testing.assert_allclose(find_last_conv(model, "embedding_backbone").stage.weight,
                               head.conv.weight)
    np.testing.assert_allclose(find_last_conv(base).stage.weight, weight)  # not mutated


def test_a_backbone_without_a_last_conv_is_refused() -> None:
    with pytest.raises(ApiError, match="1x1 convolution") as err:
        find_last_conv(backbone())
    assert err.value.status == 409


def test_retrained_conv_in_the_real_backbone_computes_what_numpy_does(
        model_dir: Path, photos: list[Path]) -> None:
    info = registry.verify(model_dir, DEFAULT_MODEL)
    base = onnx.load_model(model_dir / DEFAULT_MODEL / "model.onnx")
    runner = MapRunner(base, info.input_name, info.outputs[0])
    maps = centre_maps((p.read_bytes() for p in photos[:8]), runner, info.preprocessing,
                       max_pixels=10**8)
    assert maps.shape == (8, 320, 49)  # lite0: 320 channels on a 7x7 grid
    stock = Embedder(info, model_dir / DEFAULT_MODEL / "model.onnx").embed_bytes(
        [p.read_bytes() for p in photos[:8]], max_pixels=10**8).vectors
    np.testing.assert_allclose(runner.site.stage.pool(maps), stock, atol=0.02)
    head = fit_cosine_head(maps, np.arange(8) % 2, ["a", "b"], hidden=0, epochs=2,
                           batch_size=4, conv=runner.site.stage, conv_lr=1e-2)
    assert head.conv is not None
    model = append_head(base, head)
    # The pooled features of the swapped convolution as an output too: the head's square root
    # and standardisation over 8 photos magnify float16 rounding of the maps, so each half is
    # checked on its own input.
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        "embedding_backbone", TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString())
    inputs = np.stack([preprocess(p.read_bytes(), info.preprocessing, max_pixels=10**8)
                       for p in photos[:8]])
    out, pooled = session.run(["embedding", "embedding_backbone"], {info.input_name: inputs})
    np.testing.assert_allclose(pooled, head.conv.pool(maps), atol=0.02)
    assert not np.allclose(pooled, stock, atol=0.02)  # the swapped weights are in use
    np.testing.assert_allclose(out, head.transform(pooled), atol=1e-4)
