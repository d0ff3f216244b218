"""Backward graphs built from a backbone's ONNX graph and run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from service.errors import ApiError
from service.training.backprop import GradientGraphs, StepRunner, build
from service.training.tail import find_tail
from tests.conftest import DEFAULT_MODEL
from tests.training.test_tail import block_backbone


def step(graphs: GradientGraphs, x: np.ndarray,
         grad: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The embedding and the weights' gradients, by the two graphs."""
    runner = StepRunner(graphs)
    embedding, saved = runner.forward(x, graphs.weights)
    return embedding, runner.backward(saved, graphs.weights, grad)


def test_gradients_equal_the_numpy_tail_on_a_toy_block() -> None:
    model = block_backbone(3, head_bias=False)
    tail = find_tail(model, depth="last-block")
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1.5, (4, 3, 5, 5)).astype(np.float32)
    grad = rng.normal(size=(4, 5)).astype(np.float32)
    graphs = build(model, start=tail.tap, input_shape=(3, 5, 5))
    # Every conv after the tap is trainable; the bias-less head conv has a weight only.
    assert set(graphs.weights) == {"expand_w", "expand_b", "dw_w", "dw_b", "project_w",
                                   "project_b", "head_w"}
    embedding, grads = step(graphs, maps, grad)
    params = tail.params()
    pooled, inputs = tail.forward(maps, params, keep=True)
    np.testing.assert_allclose(embedding, pooled, rtol=1e-5, atol=1e-5)
    expected = tail.backward(grad, params, inputs)
    for i, layer in enumerate(tail.layers):
        if layer.weight is None:
            continue
        ours = grads[layer.weight_name]
        # The tail keeps 1x1 weights as (in, out) and depthwise ones as (k, k, channels).
        ours = ours[:, :, 0, 0].T if layer.kind == "conv" else ours[:, 0].transpose(1, 2, 0)
        np.testing.assert_allclose(ours, expected[f"t{i}w"], rtol=1e-4, atol=1e-5)
        if layer.bias_name:
            np.testing.assert_allclose(grads[layer.bias_name],
                                       expected[f"t{i}b"], rtol=1e-4, atol=1e-5)


def test_whole_backbone_gradients_equal_pytorch_autograd(model_dir: Path) -> None:
    torch = pytest.importorskip("torch")  # a reference-test dependency
    from bench.oracle_finetune import torch_net

    path = model_dir / DEFAULT_MODEL / "model.onnx"
    graphs = build(onnx.load(path), start="image", input_shape=(3, 224, 224))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 224, 224)).astype(np.float32)
    grad = rng.normal(size=(2, 1280)).astype(np.float32)
    embedding, grads = step(graphs, x, grad)
    net = torch_net(path)
    reference = net(torch.from_numpy(x))
    (reference * torch.from_numpy(grad)).sum().backward()
    np.testing.assert_allclose(embedding, reference.detach().numpy(), rtol=1e-4, atol=1e-4)
    assert len(grads) == len(net.keys) == len(graphs.weights)  # the stem to the head conv
    for name, key in net.keys.items():
        expected = net.params[key].grad.numpy()
        # float32 forward passes differ in the last bits, which moves a few activations across
        # ReLU6's bounds (a discrete change in the mask): hence 2 % of the largest gradient.
        np.testing.assert_allclose(grads[name], expected, rtol=0,
                                   atol=0.02 * np.abs(expected).max(), err_msg=name)


def test_an_op_without_a_backward_rule_is_refused() -> None:
    model = block_backbone(0)
    model.graph.node[2].op_type = "Sigmoid"  # the expand's activation
    del model.graph.node[2].input[1:]
    with pytest.raises(ApiError) as err:
        build(model, start="image", input_shape=(3, 5, 5))
    assert err.value.status == 409 and "Sigmoid" in err.value.message
