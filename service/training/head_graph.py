"""The heads' training forward passes as ONNX graphs, differentiated by backprop.py.

The cosine classifier: (with a tail, the tail's pooled output through the square root and
standardisation of the head's input) a hidden MatMul + bias, ReLU and a dropout mask fed
with each step, L2 normalisation, and logits = scale · cos(hidden, class weight) with the
class weights normalised too. With a tail (tails.py) its nodes come first, in the same
graph, from the tapped maps: one onnxruntime session per step computes every gradient,
the layers' and the head's. The logistic classifier is a MatMul + bias with an L2 penalty,
in float64 for L-BFGS. The loss and its seed: steps.py.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.training import backprop
from service.training.math_rules import SQRT_FLOOR
from service.training.steps import TrainingStep, softmax_cross_entropy
from service.training.tails import GraphTail

NORM_EPS = 1e-6  # added to L2 norms so that an all-zero row stays finite
P = "head/"
__all__ = ["NORM_EPS", "SQRT_FLOOR", "ClassifierStep", "CosineStep"]


class _Graph:
    """Nodes and initializers appended to a source model (or to an empty one)."""

    def __init__(self, base: onnx.ModelProto | None, dtype: type) -> None:
        self.model = base if base is not None else backprop.model_of(
            helper.make_graph([], "head", [], []), check=False)
        self.dtype = dtype
        self.count = 0

    def const(self, name: str, value: np.ndarray | float) -> str:
        self.model.graph.initializer.append(numpy_helper.from_array(
            np.asarray(value, self.dtype), P + name))
        return P + name

    def op(self, op: str, inputs: list[str], **attrs: object) -> str:
        self.count += 1
        out = f"{P}{op.lower()}{self.count}"
        self.model.graph.node.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def input(self, name: str, dims: list[int | str]) -> str:
        self.model.graph.input.append(helper.make_tensor_value_info(
            P + name, helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype)), dims))
        return P + name

    def unit(self, x: str, axis: int) -> str:
        norm = self.op("ReduceL2", [x], axes=[axis], keepdims=1)
        return self.op("Div", [x, self.op("Add", [norm, self.const(f"eps{axis}", NORM_EPS)])])


class CosineStep:
    """Gradients of the cosine classifier's loss on one batch, and of the tail under it.

    `params`: "w2" (hidden, classes), with a hidden layer "w1" and "b1", and the tail's
    parameters (GraphTail.params); `input_shape`: a batch row's shape, the tail's maps
    (C, H, W) or the standardised features (d,).
    """

    def __init__(self, params: dict[str, np.ndarray], *, scale: float, dropout: bool,
                 input_shape: tuple[int, ...], tail: GraphTail | None = None,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        g = _Graph(tail.source() if tail is not None else None, np.float32)
        head = [k for k in ("w1", "b1", "w2") if k in params]
        g.model.graph.initializer.extend(numpy_helper.from_array(
            np.asarray(params[k], np.float32), P + k) for k in head)
        if tail is None:
            start, h = P + "z", P + "z"
        else:
            assert mean is not None and std is not None
            start = tail.tap
            root = g.op("Sqrt", [g.op("Max", [tail.embedding, g.const("zero", 0.0)])])
            h = g.op("Div", [g.op("Sub", [root, g.const("mean", mean)]), g.const("std", std)])
        self.dropout = dropout and "w1" in params
        if "w1" in params:
            h = g.op("Relu", [g.op("Add", [g.op("MatMul", [h, P + "w1"]), P + "b1"])])
            if self.dropout:
                h = g.op("Mul", [h, g.input("keep", ["N", params["w1"].shape[1]])])
        cosine = g.op("MatMul", [g.unit(h, 1), g.unit(P + "w2", 0)])
        logits = g.op("Mul", [cosine, g.const("scale", scale)])
        graphs = backprop.build(g.model, start=start, input_shape=input_shape,
                                outputs=[logits], trainable=[P + k for k in head])
        self.start = start
        classes = params["w2"].shape[1]
        self.step = TrainingStep(graphs, softmax_cross_entropy(logits, P + "target", classes))
        self.keys = {P + k: k for k in head} | (tail.keys() if tail is not None else {})

    def grads(self, x: np.ndarray, target: np.ndarray, params: dict[str, np.ndarray],
              keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Each parameter's gradient of the mean cross-entropy against `target` rows;
        `keep`: the dropout mask of the hidden layer (0 or 1 / (1 - rate))."""
        inputs = {self.start: np.ascontiguousarray(x, np.float32),
                  P + "target": np.ascontiguousarray(target, np.float32)}
        if self.dropout:
            assert keep is not None
            inputs[P + "keep"] = np.ascontiguousarray(keep, np.float32)
        weights = {n: params[k] for n, k in self.keys.items()}
        _, grads = self.step.run(inputs, weights)
        return {self.keys[n]: g for n, g in grads.items()}


class ClassifierStep:
    """Loss and gradient of multinomial logistic regression with an L2 penalty, in float64."""

    def __init__(self, dim: int, classes: int, l2: float) -> None:
        g = _Graph(None, np.float64)
        g.model.graph.initializer.extend([
            numpy_helper.from_array(np.zeros((dim, classes)), P + "w"),
            numpy_helper.from_array(np.zeros(classes), P + "b")])
        logits = g.op("Add", [g.op("MatMul", [P + "z", P + "w"]), P + "b"])
        penalty = g.op("Mul", [g.op("ReduceSumSquare", [P + "w"], keepdims=0),
                               g.const("l2", l2)])
        graphs = backprop.build(g.model, start=P + "z", input_shape=(dim,),
                                outputs=[logits, penalty], trainable=[P + "w", P + "b"],
                                dtype=np.float64)
        self.step = TrainingStep(graphs, softmax_cross_entropy(
            logits, P + "target", classes, np.float64, penalties=(penalty,)))

    def loss_grad(self, z: np.ndarray, target: np.ndarray, w: np.ndarray,
                  b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """The loss and its gradients with respect to `w` and `b`."""
        loss, grads = self.step.run(
            {P + "z": np.ascontiguousarray(z, np.float64),
             P + "target": np.ascontiguousarray(target, np.float64)},
            {P + "w": np.ascontiguousarray(w, np.float64),
             P + "b": np.ascontiguousarray(b, np.float64)})
        return loss, grads[P + "w"], grads[P + "b"]

