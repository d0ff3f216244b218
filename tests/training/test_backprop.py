"""Backward graphs built from a backbone's ONNX graph and run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from service.errors import ApiError
from service.training.backprop import GradientGraphs, build
from service.training.steps import StepRunner
from tests.conftest import DEFAULT_MODEL
from tests.training.test_tail import block_backbone, pooled_by_hand


def step(graphs: GradientGraphs, x: np.ndarray,
         grad: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The embedding and the weights' gradients, by the two graphs."""
    runner = StepRunner(graphs)
    embedding, saved = runner.forward(x, graphs.weights)
    return embedding, runner.backward(saved, graphs.weights, grad)


def test_toy_block_gradients_match_finite_differences() -> None:
    # Conv (pointwise and depthwise, with and without a bias), Clip, GlobalAveragePool and
    # Flatten, against the block written out with loops in float64.
    model = block_backbone(3, head_bias=False)
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1.5, (4, 3, 5, 5)).astype(np.float32)
    grad = rng.normal(size=(4, 5)).astype(np.float32)
    graphs = build(model, start="block_in", input_shape=(3, 5, 5))
    # Every conv after the tap is trainable; the bias-less head conv has a weight only.
    assert set(graphs.weights) == {"expand_w", "expand_b", "dw_w", "dw_b", "project_w",
                                   "project_b", "head_w"}
    embedding, grads = step(graphs, maps, grad)
    weights = {n: w.astype(np.float64) for n, w in graphs.weights.items()}
    np.testing.assert_allclose(embedding, pooled_by_hand(maps, weights), rtol=1e-5, atol=1e-5)

    def loss(ws: dict[str, np.ndarray]) -> float:
        return float((pooled_by_hand(maps, ws) * grad).sum())

    for name, w in weights.items():
        for index in [tuple(rng.integers(0, d) for d in w.shape) for _ in range(3)]:
            plus, minus = w.copy(), w.copy()
            plus[index] += 1e-5
            minus[index] -= 1e-5
            numeric = (loss({**weights, name: plus}) - loss({**weights, name: minus})) / 2e-5
            # float32 graphs against a float64 reference: 0.1 % or 1e-4.
            assert grads[name][index] == pytest.approx(numeric, rel=1e-3, abs=1e-4), name


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
