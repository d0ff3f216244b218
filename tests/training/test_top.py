"""The blocks from the last downsampling on ("top"), trained through onnxruntime graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.embedding import registry
from service.embedding.session import Embedder
from service.errors import ApiError
from service.evaluation.metrics import exact_cosine_scores
from service.training.cosine import epoch_order, fit_cosine_head
from service.training.maps import MapRunner, centre_maps
from service.training.onnx_head import append_head
from service.training.tails import GraphTail, find_top
from tests.conftest import DEFAULT_MODEL
from tests.training.test_tail import block_backbone, toy_maps


def strided_backbone() -> onnx.ModelProto:
    """A residual Add, a strided 3x3 conv that nearly ignores input channels 0-2, ReLU6,
    average pool: a head on its output cannot see what those channels hold."""
    rng = np.random.default_rng(6)
    weight = rng.uniform(0.0, 0.03, (8, 12, 3, 3))  # inside ReLU6's range
    weight[:, :3] = 0.0001
    graph = helper.make_graph(
        [helper.make_node("Add", ["image", "image"], ["block_in"]),
         helper.make_node("Conv", ["block_in", "w", "b"], ["conv"], name="strided",
                          kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Clip", ["conv", "lo", "hi"], ["act"], name="act"),
         helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="pool"),
         helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1, name="flat")],
        "strided-backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 12, 4, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(weight.astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(8, np.float32), "b"),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_an_epoch_takes_one_row_of_each_image_in_turn() -> None:
    rng = np.random.default_rng(0)
    groups = np.array([0, 1, 2, 0, 0, 1, 1, 2, 2])  # three images, three rows each
    epochs = [epoch_order(rng, len(groups), groups) for _ in range(30)]
    for order in epochs:
        assert sorted(groups[order].tolist()) == [0, 1, 2]
    seen = {int(r) for order in epochs for r in order}
    assert seen == set(range(9))  # every view gets its turn
    assert len({tuple(groups[o]) for o in epochs}) > 1  # and the images' order changes
    assert sorted(epoch_order(rng, 5).tolist()) == list(range(5))  # no groups: every row


def test_top_starts_at_the_last_strided_block_and_recovers_what_it_drops() -> None:
    model = strided_backbone()
    assert find_top(model) == "block_in"
    runner = MapRunner(model, "image", depth="top")
    assert isinstance(runner.tail, GraphTail) and runner.tail.nodes == [
        "strided", "act", "pool", "flat"]
    images, y = toy_maps(40, 0)
    test_images, test_y = toy_maps(30, 1)
    maps, test_maps = runner.run(images), runner.run(test_images)
    labels = [str(v) for v in test_y]
    mirrored = maps[..., ::-1]  # a second view of each image, in the groups' turns
    rows = np.concatenate([maps, mirrored])
    groups = np.tile(np.arange(len(maps)), 2)
    stock = fit_cosine_head(runner.tail.pool(maps), y, ["0", "1", "2"], hidden=0,
                            epochs=20, batch_size=16)
    tuned = fit_cosine_head(rows, np.tile(y, 2), ["0", "1", "2"], hidden=0, epochs=40,
                            batch_size=16, tail=runner.tail, tail_lr=1e-2, groups=groups)
    stock_map = exact_cosine_scores(stock.transform(runner.tail.pool(test_maps)),
                                    labels).mean_ap
    tuned_map = exact_cosine_scores(tuned.transform_maps(test_maps), labels).mean_ap
    assert tuned_map > stock_map + 0.2, (stock_map, tuned_map)
    assert isinstance(tuned.tail, GraphTail)
    assert not np.allclose(tuned.tail.weights["w"], runner.tail.weights["w"])
    exported = append_head(model, tuned)
    out = ort.InferenceSession(exported.SerializeToString()).run(
        ["embedding"], {"image": test_images})[0]
    np.testing.assert_allclose(out, tuned.transform_maps(2 * test_images), atol=1e-4)


def test_a_backbone_without_a_strided_conv_has_no_top() -> None:
    with pytest.raises(ApiError) as err:
        find_top(block_backbone(0))
    assert err.value.status == 409 and "--tune last-conv" in err.value.message


def test_top_of_lite0_is_blocks_11_to_15_and_installs_its_weights(
        model_dir: Path, photos: list[Path]) -> None:
    info = registry.verify(model_dir, DEFAULT_MODEL)
    base = onnx.load_model(model_dir / DEFAULT_MODEL / "model.onnx")
    runner = MapRunner(base, info.input_name, info.outputs[0], "top")
    tail = runner.tail
    assert isinstance(tail, GraphTail)
    # The oracle's `top` (bench/oracle_finetune.py): blocks 11-15 and the head conv.
    blocks = {n.split(".")[1] for n in tail.nodes if n.startswith("_blocks.")}
    assert blocks == {str(b) for b in range(11, 16)}
    assert len(tail.params()) == 2 * 16  # 5 blocks of 3 convs, the head conv; with biases
    maps = centre_maps((p.read_bytes() for p in photos[:6]), runner, info.preprocessing,
                       max_pixels=10**8)
    assert maps.shape == (6, 112, 14, 14)
    stock = Embedder(info, model_dir / DEFAULT_MODEL / "model.onnx").embed_bytes(
        [p.read_bytes() for p in photos[:6]], max_pixels=10**8).vectors
    np.testing.assert_allclose(tail.pool(maps), stock, atol=0.02)  # float16 maps
    rng = np.random.default_rng(0)
    changed = tail.with_params({k: v * rng.uniform(0.9, 1.1, v.shape).astype(np.float32)
                                for k, v in tail.params().items()})
    model = onnx.ModelProto()
    model.CopyFrom(base)
    changed.install(model)
    tapped = MapRunner(model, info.input_name, info.outputs[0], "top")
    assert tapped.tail.tap == tail.tap
    np.testing.assert_allclose(tapped.run(np.zeros((1, 3, 224, 224), np.float32)),
                               runner.run(np.zeros((1, 3, 224, 224), np.float32)))
    session = ort.InferenceSession(model.SerializeToString())
    images = rng.normal(0, 1, (2, 3, 224, 224)).astype(np.float32)
    ours = session.run([info.outputs[0]], {info.input_name: images})[0]
    np.testing.assert_allclose(ours, changed.pool(runner.run(images)), atol=0.02)
    assert not np.allclose(ours, tail.pool(runner.run(images)), atol=0.02)
