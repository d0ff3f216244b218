"""Each backward rule of the heads' ops against central finite differences, in float64.

A tiny graph per case: the op under test on trainable initializers (and on the batch input
`x` where broadcasting along the batch is the point). The loss is Σ out · R for a fixed
random R, so the backward graph gets R as the output's gradient. float64 throughout, a step
of 1e-6: the tolerance (rtol 1e-6, atol 1e-9) is far below any wrong rule's error.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.training.backprop import build, model_of
from service.training.math_rules import SQRT_FLOOR
from service.training.steps import StepRunner, TrainingStep, softmax_cross_entropy

rng = np.random.default_rng(0)


def away_from_zero(*shape: int) -> np.ndarray:
    """Values in ±[0.5, 1.5]: no Max tie, no Sqrt or Div near zero, no Relu kink."""
    return rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)


def positive(*shape: int) -> np.ndarray:
    return rng.uniform(0.5, 1.5, shape)


def node(op: str, inputs: list[str], **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, ["out"], **attrs)


def toy(nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray],
        consts: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "toy", [], [helper.make_tensor_value_info("out", TensorProto.DOUBLE, None)],
        initializer=[numpy_helper.from_array(v if v.dtype.kind == "i" else v.astype(np.float64),
                                             k) for k, v in {**weights, **consts}.items()])
    return model_of(graph, check=False)


def gradcheck(nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray],
              x: np.ndarray | None = None, consts: dict[str, np.ndarray] | None = None,
              ) -> dict[str, np.ndarray]:
    """Assert the backward graph's gradients equal central differences; return them."""
    x = np.zeros((2, 1)) if x is None else x
    model = toy(nodes, weights, consts or {})
    graphs = build(model, start="x", input_shape=x.shape[1:], outputs=["out"],
                   trainable=list(weights), dtype=np.float64)
    runner = StepRunner(graphs)
    out, saved = runner.forward(x, weights)
    r = rng.normal(size=out.shape)
    grads = runner.backward(saved, weights, r)

    def loss(ws: dict[str, np.ndarray]) -> float:
        return float((runner.embed(x, ws) * r).sum())

    step = 1e-6
    for name, w in weights.items():
        numeric = np.zeros_like(w)
        for index in np.ndindex(w.shape):
            plus, minus = w.copy(), w.copy()
            plus[index] += step
            minus[index] -= step
            numeric[index] = (loss({**weights, name: plus}) -
                              loss({**weights, name: minus})) / (2 * step)
        assert grads[name].shape == w.shape, name
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-9, err_msg=name)
    return grads


CASES = {
    "MatMul of two weights": ([node("MatMul", ["a", "b"])],
                              {"a": away_from_zero(2, 3), "b": away_from_zero(3, 4)}, None),
    "MatMul of the batch by a weight": ([node("MatMul", ["x", "w"])],
                                        {"w": away_from_zero(3, 2)}, away_from_zero(4, 3)),
    "Add, a bias broadcast over the batch": ([node("Add", ["x", "b"])],
                                             {"b": away_from_zero(3)}, away_from_zero(4, 3)),
    "Add, a row broadcast": ([node("Add", ["a", "b"])],
                             {"a": away_from_zero(2, 3), "b": away_from_zero(1, 3)}, None),
    "Sub, broadcast": ([node("Sub", ["a", "b"])],
                       {"a": away_from_zero(2, 3), "b": away_from_zero(3)}, None),
    "Mul, a column broadcast": ([node("Mul", ["a", "b"])],
                                {"a": away_from_zero(2, 3), "b": away_from_zero(2, 1)}, None),
    "Mul of the batch by a row": ([node("Mul", ["x", "w"])],
                                  {"w": away_from_zero(1, 3)}, away_from_zero(4, 3)),
    "Div, broadcast": ([node("Div", ["a", "b"])],
                       {"a": away_from_zero(2, 3), "b": positive(1, 3)}, None),
    "Div of the batch by a weight": ([node("Div", ["x", "w"])],
                                     {"w": positive(3)}, away_from_zero(4, 3)),
    "Sqrt": ([node("Sqrt", ["a"])], {"a": positive(2, 3)}, None),
    "Max of two weights": ([node("Max", ["a", "b"])],
                           {"a": away_from_zero(2, 3), "b": away_from_zero(2, 3)}, None),
    "Max with a constant": ([node("Max", ["a", "zero"])], {"a": away_from_zero(2, 3)}, None),
    "Relu": ([node("Relu", ["a"])], {"a": away_from_zero(2, 3)}, None),
    "ReduceL2 kept": ([node("ReduceL2", ["a"], axes=[1], keepdims=1)],
                      {"a": away_from_zero(2, 3)}, None),
    "ReduceL2 dropped": ([node("ReduceL2", ["a"], axes=[0], keepdims=0)],
                         {"a": away_from_zero(2, 3)}, None),
    "ReduceSumSquare of all": ([node("ReduceSumSquare", ["a"], keepdims=0)],
                               {"a": away_from_zero(2, 3)}, None),
    "ReduceSumSquare kept": ([node("ReduceSumSquare", ["a"], axes=[-1], keepdims=1)],
                             {"a": away_from_zero(2, 3)}, None),
    "ReduceMean over positions": ([node("ReduceMean", ["a"], axes=[2, 3], keepdims=0)],
                                  {"a": away_from_zero(2, 3, 2, 2)}, None),
    "ReduceMean of the batch, kept": ([node("ReduceMean", ["x"], axes=[2, 3], keepdims=1)],
                                      {}, None),
    "Flatten": ([node("Flatten", ["a"], axis=1)], {"a": away_from_zero(2, 3, 1, 2)}, None),
    "Reshape": ([node("Reshape", ["a", "shape"])], {"a": away_from_zero(2, 3)}, None),
    "Squeeze": ([node("Squeeze", ["a", "axes"])], {"a": away_from_zero(2, 1, 3)}, None),
    "Unsqueeze": ([node("Unsqueeze", ["a", "axes"])], {"a": away_from_zero(2, 3)}, None),
    "Identity": ([node("Identity", ["a"])], {"a": away_from_zero(2, 3)}, None),
}
CONSTS = {"zero": np.array(0.0), "shape": np.array([3, 2], np.int64),
          "axes": np.array([1], np.int64)}


@pytest.mark.parametrize("case", [c for c in CASES if "batch, kept" not in c])
def test_rule_matches_finite_differences(case: str) -> None:
    nodes, weights, x = CASES[case]
    used = {i for n in nodes for i in n.input}
    gradcheck(nodes, weights, x, {k: v for k, v in CONSTS.items() if k in used})


def test_reduce_mean_spreads_a_batch_gradient() -> None:
    # The mean as a pool of the batch's maps, with a weight after it to be trained.
    nodes = [helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[2, 3], keepdims=1),
             node("Mul", ["pooled", "w"])]
    gradcheck(nodes, {"w": away_from_zero(1, 3, 1, 1)}, away_from_zero(2, 3, 2, 2))


def test_a_chain_of_rules_accumulates_a_weight_used_twice() -> None:
    # w2 / (‖w2‖ + eps): the normalised class weights of the cosine head, w2 on both paths.
    nodes = [helper.make_node("ReduceL2", ["w"], ["norm"], axes=[0], keepdims=1),
             helper.make_node("Add", ["norm", "eps"], ["denominator"]),
             helper.make_node("Div", ["w", "denominator"], ["unit"]),
             node("MatMul", ["x", "unit"])]
    gradcheck(nodes, {"w": away_from_zero(3, 2)}, away_from_zero(4, 3),
              {"eps": np.array(1e-6)})


def test_sqrt_slope_is_floored_and_an_all_zero_norm_passes_nothing() -> None:
    values = np.array([[0.0, SQRT_FLOOR / 4, 4.0]])
    nodes = [helper.make_node("Sqrt", ["a"], ["root"]),
             helper.make_node("ReduceL2", ["z"], ["norm"], axes=[1], keepdims=1),
             node("Add", ["root", "norm"])]
    model = toy(nodes, {"a": values, "z": np.zeros((1, 3))}, {})
    graphs = build(model, start="x", input_shape=(1,), outputs=["out"], trainable=["a", "z"],
                   dtype=np.float64)
    runner = StepRunner(graphs)
    weights = {"a": values, "z": np.zeros((1, 3))}
    _, saved = runner.forward(np.zeros((1, 1)), weights)
    grads = runner.backward(saved, weights, np.ones((1, 3)))
    floor = 0.5 / np.sqrt(SQRT_FLOOR)
    np.testing.assert_allclose(grads["a"], [[floor, floor, 0.25]])
    np.testing.assert_array_equal(grads["z"], np.zeros((1, 3)))


def test_the_cross_entropy_seed_is_the_gradient_of_its_loss() -> None:
    classes = 4
    logits_w = away_from_zero(classes, classes)
    target = np.full((3, classes), 0.1 / classes)
    target[np.arange(3), [0, 2, 3]] += 0.9
    model = toy([node("MatMul", ["x", "w"])], {"w": logits_w}, {})
    graphs = build(model, start="x", input_shape=(classes,), outputs=["out"], trainable=["w"],
                   dtype=np.float64)
    step = TrainingStep(graphs, softmax_cross_entropy("out", "target", classes, np.float64))
    x = away_from_zero(3, classes)

    def loss(w: np.ndarray) -> float:
        return step.run({"x": x, "target": target}, {"w": w})[0]

    value, grads = step.run({"x": x, "target": target}, {"w": logits_w})
    logits = x @ logits_w
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert value == pytest.approx(-(target * logp).sum(axis=1).mean(), rel=1e-12)
    numeric = np.zeros_like(logits_w)
    for index in np.ndindex(logits_w.shape):
        plus, minus = logits_w.copy(), logits_w.copy()
        plus[index] += 1e-6
        minus[index] -= 1e-6
        numeric[index] = (loss(plus) - loss(minus)) / 2e-6
    np.testing.assert_allclose(grads["w"], numeric, rtol=1e-6, atol=1e-9)
