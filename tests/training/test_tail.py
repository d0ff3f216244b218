"""The backbone's tail: found in ONNX graphs, trained through gradient graphs, swapped back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.embedding import registry
from service.embedding.session import Embedder
from service.embedding.transforms import preprocess
from service.errors import ApiError
from service.evaluation.metrics import exact_cosine_scores
from service.training.cosine import fit_cosine_head, layer_rates
from service.training.head_graph import CosineStep
from service.training.maps import MapRunner, centre_maps
from service.training.onnx_head import append_head
from service.training.tails import find_tail
from tests.conftest import DEFAULT_MODEL
from tests.training.test_heads import backbone


def block_backbone(seed: int = 0, head_bias: bool = True) -> onnx.ModelProto:
    """A stand-in CNN ending like EfficientNet-lite: a residual Add, then 1x1 expand, ReLU6,
    3x3 depthwise, ReLU6, 1x1 project, 1x1 head conv (with or without a bias), ReLU6, average
    pool."""
    rng = np.random.default_rng(seed)
    weights = {
        "expand_w": rng.uniform(-0.2, 0.6, (6, 3, 1, 1)), "expand_b": rng.normal(0, 0.1, 6),
        "dw_w": rng.uniform(-0.3, 0.6, (6, 1, 3, 3)), "dw_b": rng.normal(0, 0.1, 6),
        "project_w": rng.normal(0, 0.5, (4, 6, 1, 1)), "project_b": rng.normal(0, 0.1, 4),
        "head_w": rng.normal(0, 0.6, (5, 4, 1, 1)), "head_b": np.full(5, 0.5),
    }
    if not head_bias:
        del weights["head_b"]
    graph = helper.make_graph(
        [helper.make_node("Add", ["image", "image"], ["block_in"]),
         helper.make_node("Conv", ["block_in", "expand_w", "expand_b"], ["expand"],
                          name="expand", kernel_shape=[1, 1]),
         helper.make_node("Clip", ["expand", "lo", "hi"], ["expand_act"]),
         helper.make_node("Conv", ["expand_act", "dw_w", "dw_b"], ["dw"], name="depthwise",
                          kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=6),
         helper.make_node("Clip", ["dw", "lo", "hi"], ["dw_act"]),
         helper.make_node("Conv", ["dw_act", "project_w", "project_b"], ["project"],
                          name="project", kernel_shape=[1, 1]),
         helper.make_node("Conv", ["project", "head_w"] + ["head_b"] * head_bias, ["head"],
                          name="head_conv", kernel_shape=[1, 1]),
         helper.make_node("Clip", ["head", "lo", "hi"], ["act"]),
         helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
         helper.make_node("Identity", ["pooled"], ["logits"])],
        "block-backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5, 1, 1])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()] +
        [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def pooled_by_hand(maps: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The block of `block_backbone` written out with loops, in float64 (weights by name)."""
    relu6 = lambda v: np.clip(v, 0, 6)  # noqa: E731
    x = maps.astype(np.float64).transpose(0, 2, 3, 1)  # N, H, W, C

    def pointwise(v: np.ndarray, name: str) -> np.ndarray:
        return v @ w[f"{name}_w"][:, :, 0, 0].T + w.get(f"{name}_b", 0.0)

    e = relu6(pointwise(x, "expand"))
    padded = np.pad(e, ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = w["dw_w"][:, 0].transpose(1, 2, 0)  # k, k, channels
    d = np.zeros_like(e)
    for i in range(e.shape[1]):
        for j in range(e.shape[2]):
            d[:, i, j] = (padded[:, i:i + 3, j:j + 3] * kernel).sum(axis=(1, 2))
    d = relu6(d + w["dw_b"])
    a = relu6(pointwise(pointwise(d, "project"), "head"))
    return a.mean(axis=(1, 2))


def conv_backbone(weight: np.ndarray) -> onnx.ModelProto:
    """image (N, 12, 4, 4) -> 1x1 conv by `weight` (in, out), ReLU6, average pool."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["conv"], name="conv",
                          kernel_shape=[1, 1]),
         helper.make_node("Clip", ["conv", "lo", "hi"], ["act"], name="act"),
         helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="pool"),
         helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1, name="flat")],
        "conv-backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 12, 4, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", weight.shape[1]])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T[:, :, None, None], np.float32),
                                 "w"),
         numpy_helper.from_array(np.zeros(weight.shape[1], np.float32), "b"),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_find_tail_reads_the_last_block_or_the_last_conv() -> None:
    model = block_backbone()
    tail = find_tail(model, depth="last-block")
    assert tail.nodes == ["expand", "expand_act", "depthwise", "dw_act", "project",
                          "head_conv", "act", "pooled", "embedding"]
    assert set(tail.weights) == {"expand_w", "expand_b", "dw_w", "dw_b", "project_w",
                                 "project_b", "head_w", "head_b"}
    assert tail.tap == "block_in" and tail.spatial
    conv = find_tail(model)  # the default
    assert conv.nodes[:2] == ["head_conv", "act"] and set(conv.weights) == {"head_w", "head_b"}
    assert conv.tap == "project" and not conv.spatial
    images = np.random.default_rng(1).uniform(0, 1, (4, 3, 5, 5)).astype(np.float32)
    stock = ort.InferenceSession(model.SerializeToString()).run(["embedding"],
                                                                {"image": images})[0]
    maps = MapRunner(model, "image", depth="last-block").run(images)
    np.testing.assert_allclose(maps, 2 * images, atol=1e-2)  # float16 of the Add's output
    np.testing.assert_allclose(tail.pool(2 * images), stock, atol=1e-5)
    np.testing.assert_allclose(pooled_by_hand(2 * images, tail.weights), stock, atol=1e-5)


def test_a_backbone_without_a_tail_is_refused() -> None:
    with pytest.raises(ApiError, match="average pool") as err:
        find_tail(backbone())
    assert err.value.status == 409


def test_tail_and_head_gradients_match_finite_differences() -> None:
    # One graph from the block's input maps to the cosine logits: the convolutions, the
    # head's square root and standardisation, hidden layer, dropout mask and normalisations.
    tail = find_tail(block_backbone(2), depth="last-block")
    rng = np.random.default_rng(5)
    maps = rng.uniform(0, 1, (4, 3, 5, 5))
    mean, std = np.full(5, 0.5), np.full(5, 2.0)
    target = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    keep = (rng.random((4, 4)) >= 0.25) / 0.75
    params = {**tail.params(), "w1": rng.normal(0, 0.5, (5, 4)).astype(np.float32),
              "b1": np.full(4, 0.3, np.float32),
              "w2": rng.normal(0, 0.5, (4, 3)).astype(np.float32)}
    keys = tail.keys()

    def loss(p: dict[str, np.ndarray]) -> float:  # written out again, in float64
        z = (np.sqrt(pooled_by_hand(maps, {n: p[k] for n, k in keys.items()})) - mean) / std
        h = np.maximum(z @ p["w1"] + p["b1"], 0) * keep
        u = h / (np.linalg.norm(h, axis=1, keepdims=True) + 1e-6)
        v = p["w2"] / (np.linalg.norm(p["w2"], axis=0, keepdims=True) + 1e-6)
        logits = 16.0 * u @ v
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-(target * logp).sum(axis=1).mean())

    step = CosineStep(params, scale=16.0, dropout=True, input_shape=(3, 5, 5), tail=tail,
                      mean=mean.astype(np.float32), std=std.astype(np.float32))
    grads = step.grads(maps, target, params, keep)
    assert set(grads) == set(params)
    checked = [("expand_w", (1, 2, 0, 0)), ("expand_b", (3,)), ("dw_w", (4, 0, 0, 1)),
               ("dw_w", (0, 0, 2, 2)), ("dw_b", (5,)), ("project_w", (1, 3, 0, 0)),
               ("head_w", (4, 2, 0, 0)), ("head_b", (0,)), ("w1", (1, 2)), ("b1", (3,)),
               ("w2", (2, 1))]
    for name, index in checked:
        key = keys.get(name, name)
        step_size = 1e-4
        plus = {k: v.astype(np.float64) for k, v in params.items()}
        minus = {k: v.astype(np.float64) for k, v in params.items()}
        plus[key][index] += step_size
        minus[key][index] -= step_size
        numeric = (loss(plus) - loss(minus)) / (2 * step_size)
        # float32 graphs against a float64 reference: 2 % or 1e-4.
        assert grads[key][index] == pytest.approx(numeric, rel=2e-2, abs=1e-4), name


def toy_maps(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes told apart by which of 3 input channels is bright, plus 9 noisy ones."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    maps = rng.gamma(2.0, 0.5, size=(len(y), 12, 4, 4))
    maps[np.arange(len(y)), y] += 1.5
    return maps.astype(np.float32), y


def test_retrained_tail_recovers_what_the_pretrained_one_drops() -> None:
    # The "pretrained" conv nearly ignores the 3 informative channels: a head on its pooled
    # output cannot tell the classes apart; re-training the conv can.
    weight = np.random.default_rng(6).uniform(0.0, 0.3, (12, 8)).astype(np.float32)
    weight[:3] = 0.001
    tail = find_tail(conv_backbone(weight))
    assert tail.tap == "image" and not tail.spatial
    maps, y = toy_maps(40, 0)
    test_maps, test_y = toy_maps(30, 1)
    labels = [str(v) for v in test_y]
    stock = fit_cosine_head(tail.pool(maps), y, ["0", "1", "2"], hidden=0, epochs=20,
                            batch_size=16)
    tuned = fit_cosine_head(maps, y, ["0", "1", "2"], hidden=0, epochs=20, batch_size=16,
                            tail=tail, tail_lr=1e-2)
    stock_map = exact_cosine_scores(stock.transform(tail.pool(test_maps)), labels).mean_ap
    tuned_map = exact_cosine_scores(tuned.transform_maps(test_maps), labels).mean_ap
    assert tuned_map > stock_map + 0.2, (stock_map, tuned_map)
    assert tuned.tail is not None and not np.allclose(tuned.tail.weights["w"],
                                                      tail.weights["w"])
    assert tuned.record["tail"]["lr"] == 1e-2 and tuned.record["tail"]["positions"] == 0.5


def test_warm_up_and_layer_scaling_set_the_tails_rates() -> None:
    rates = layer_rates({"a": np.full((2, 2), 0.01), "b": np.full((3, 1), -0.1),
                         "c": np.full((4, 1, 1, 1), 1.0), "c_bias": np.full(4, 5.0)})
    assert rates == pytest.approx({"a": 0.1, "b": 1.0, "c": 10.0, "c_bias": 1.0})
    weight = np.random.default_rng(6).uniform(0.0, 0.3, (12, 8)).astype(np.float32)
    tail = find_tail(conv_backbone(weight))
    maps, y = toy_maps(40, 0)

    def moved(warmup: float) -> float:
        head = fit_cosine_head(maps, y, ["0", "1", "2"], hidden=0, epochs=1, batch_size=16,
                               tail=tail, tail_lr=1e-2, tail_warmup=warmup)
        assert head.tail is not None and head.record["tail"]["warmup_epochs"] == warmup
        return float(np.abs(head.tail.weights["w"] - tail.weights["w"]).mean())

    plain, ramped = moved(0.0), moved(1.0)
    # Adam's steps are about the rate each: a linear ramp over the epoch halves the distance.
    assert 0.3 * plain < ramped < 0.7 * plain, (plain, ramped)


@pytest.mark.parametrize("head_bias", [True, False])
def test_onnx_export_swaps_in_the_retrained_tail(head_bias: bool) -> None:
    base = block_backbone(3, head_bias)
    tail = find_tail(base, depth="last-block")
    images = np.random.default_rng(8).uniform(0, 1, size=(30, 3, 5, 5)).astype(np.float32)
    maps = MapRunner(base, "image", depth="last-block").run(images)
    head = fit_cosine_head(maps, np.repeat(np.arange(3), 10), ["a", "b", "c"], hidden=8,
                           epochs=3, batch_size=8, tail=tail, tail_lr=1e-2)
    assert head.tail is not None and "positions" not in head.record["tail"]
    model = append_head(base, head)
    outputs = dict(zip(["embedding", "logits"], ort.InferenceSession(
        model.SerializeToString()).run(["embedding", "logits"], {"image": images}),
        strict=True))
    np.testing.assert_allclose(outputs["embedding"], head.transform_maps(2 * images),
                               atol=1e-4)
    swapped = find_tail(model, "embedding_backbone", "last-block")
    assert set(swapped.weights) == set(tail.weights)  # a conv without a bias stays so
    for name, old in tail.weights.items():
        np.testing.assert_allclose(swapped.weights[name], head.tail.weights[name], atol=1e-6)
        assert not np.allclose(swapped.weights[name], old), name  # every layer was trained
    np.testing.assert_allclose(find_tail(base, depth="last-block").weights["dw_w"],
                               tail.weights["dw_w"])  # the base graph is not mutated


def test_retrained_tail_in_the_real_backbone_computes_what_numpy_does(
        model_dir: Path, photos: list[Path]) -> None:
    info = registry.verify(model_dir, DEFAULT_MODEL)
    base = onnx.load_model(model_dir / DEFAULT_MODEL / "model.onnx")
    runner = MapRunner(base, info.input_name, info.outputs[0], "last-block")
    assert runner.tail.nodes[0].startswith("_blocks.15.")  # lite0's last block
    maps = centre_maps((p.read_bytes() for p in photos[:8]), runner, info.preprocessing,
                       max_pixels=10**8)
    assert maps.shape == (8, 192, 7, 7)  # the block's input: 192 channels on a 7x7 grid
    stock = Embedder(info, model_dir / DEFAULT_MODEL / "model.onnx").embed_bytes(
        [p.read_bytes() for p in photos[:8]], max_pixels=10**8).vectors
    np.testing.assert_allclose(runner.tail.pool(maps), stock, atol=0.02)
    head = fit_cosine_head(maps, np.arange(8) % 2, ["a", "b"], hidden=0, epochs=2,
                           batch_size=4, tail=runner.tail, tail_lr=1e-2)
    assert head.tail is not None
    model = append_head(base, head)
    # The pooled features of the swapped tail as an output too: the head's square root and
    # standardisation over 8 photos magnify float16 rounding of the maps, so each half is
    # checked on its own input.
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        "embedding_backbone", TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString())
    inputs = np.stack([preprocess(p.read_bytes(), info.preprocessing, max_pixels=10**8)
                       for p in photos[:8]])
    out, pooled = session.run(["embedding", "embedding_backbone"], {info.input_name: inputs})
    np.testing.assert_allclose(pooled, head.tail.pool(maps), atol=0.02)
    assert not np.allclose(pooled, stock, atol=0.02)  # the swapped weights are in use
    np.testing.assert_allclose(out, head.transform(pooled), atol=1e-4)
