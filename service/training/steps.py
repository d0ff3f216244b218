"""The gradient graphs of backprop.py in onnxruntime sessions.

`StepRunner` runs the forward and the backward graph as two sessions (the embedding alone,
or what the backward pass reads kept in between). `TrainingStep` runs a whole training step
in one session: the forward graph, the loss and its seed, then the backward graph, so that
no activation leaves onnxruntime. The loss's seed is the one derivative written by hand:
softmax cross-entropy's gradient with respect to the logits, (softmax - target) / batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.training.backprop import GradientGraphs, grad_name, model_of


def _session(model: onnx.ModelProto) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused initializers (the clips' bounds) are expected
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


class StepRunner:
    """The two graphs in onnxruntime sessions; the weights are fed with every call."""

    def __init__(self, graphs: GradientGraphs) -> None:
        self.graphs = graphs
        self._forward = _session(graphs.forward)
        self._backward: object | None = None
        self._outputs = [o.name for o in graphs.forward.graph.output]

    def forward(self, x: np.ndarray, weights: dict[str, np.ndarray],
                inputs: dict[str, np.ndarray] | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The first output of a batch, and what the backward pass reads."""
        feed = {self.graphs.start: x, **(inputs or {}), **weights}
        out = dict(zip(self._outputs, self._forward.run(self._outputs, feed), strict=True))
        out.update({self.graphs.start: x, **(inputs or {})})
        return out[self.graphs.embedding], out

    def embed(self, x: np.ndarray, weights: dict[str, np.ndarray],
              inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The first output of a batch only (nothing kept for a backward pass)."""
        return self._forward.run([self.graphs.embedding],
                                 {self.graphs.start: x, **(inputs or {}), **weights})[0]

    def backward(self, saved: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                 grad: np.ndarray) -> dict[str, np.ndarray]:
        """Each weight's gradient, given the first output's."""
        if self._backward is None:
            self._backward = _session(self.graphs.backward)
        feed = {n: saved[n] for n in self.graphs.saved} | weights
        feed[grad_name(self.graphs.embedding)] = grad
        names = list(self.graphs.weights)
        return dict(zip(names, self._backward.run([grad_name(n) for n in names], feed),
                        strict=True))


@dataclass
class Loss:
    """Nodes that compute a scalar loss from the forward outputs and seed their gradients."""

    nodes: list[onnx.NodeProto]
    inputs: list[onnx.ValueInfoProto]
    loss: str
    initializers: list[onnx.TensorProto] = field(default_factory=list)


def softmax_cross_entropy(logits: str, target: str, classes: int, dtype: type = np.float32,
                          penalties: tuple[str, ...] = ()) -> Loss:
    """Mean cross-entropy of softmax(`logits`) against `target` rows (probabilities, fed with
    each step), plus the scalar forward outputs `penalties`."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    p = "loss/"
    nodes = [
        helper.make_node("LogSoftmax", [logits], [p + "logp"], axis=1),
        helper.make_node("Exp", [p + "logp"], [p + "prob"]),
        helper.make_node("Shape", [logits], [p + "shape"]),
        helper.make_node("Gather", [p + "shape", p + "zero"], [p + "rows"], axis=0),
        helper.make_node("Cast", [p + "rows"], [p + "n"], to=elem),
        # The seed: d(mean cross-entropy)/d(logits) = (softmax - target) / batch.
        helper.make_node("Sub", [p + "prob", target], [p + "diff"]),
        helper.make_node("Div", [p + "diff", p + "n"], [grad_name(logits)]),
        helper.make_node("Mul", [target, p + "logp"], [p + "terms"]),
        helper.make_node("ReduceSum", [p + "terms"], [p + "sum"], keepdims=0),
        helper.make_node("Div", [p + "sum", p + "n"], [p + "negative"]),
        helper.make_node("Neg", [p + "negative"], [p + "ce"]),
    ]
    total = p + "ce"
    for i, name in enumerate(penalties):  # added to the loss: their seed is 1
        nodes.append(helper.make_node("Add", [total, name], [f"{p}total{i}"]))
        nodes.append(helper.make_node("Identity", [p + "one"], [grad_name(name)]))
        total = f"{p}total{i}"
    return Loss(nodes, [helper.make_tensor_value_info(target, elem, [None, classes])], total,
                [numpy_helper.from_array(np.array(0, np.int64), p + "zero"),
                 numpy_helper.from_array(np.array(1, dtype), p + "one")])


def fuse(graphs: GradientGraphs, loss: Loss) -> onnx.ModelProto:
    """One graph: forward, loss and seeds, backward; the loss and each weight's gradient out."""
    fwd, bwd = graphs.forward.graph, graphs.backward.graph
    outputs = [helper.make_tensor_value_info(loss.loss, fwd.input[0].type.tensor_type.elem_type,
                                             [])]
    outputs += [o for o in bwd.output]
    inits: dict[str, onnx.TensorProto] = {}
    for t in [*fwd.initializer, *bwd.initializer, *loss.initializers]:
        inits.setdefault(t.name, t)
    graph = helper.make_graph([*fwd.node, *loss.nodes, *bwd.node], "step",
                              [*fwd.input, *loss.inputs], outputs,
                              initializer=list(inits.values()))
    return model_of(graph)


class TrainingStep:
    """Forward, loss and backward of one batch in one onnxruntime session."""

    def __init__(self, graphs: GradientGraphs, loss: Loss) -> None:
        self.graphs = graphs
        self.names = list(graphs.weights)
        self._outputs = [loss.loss, *(grad_name(n) for n in self.names)]
        self._session = _session(fuse(graphs, loss))

    def run(self, inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray]
            ) -> tuple[float, dict[str, np.ndarray]]:
        """The loss of a batch and each weight's gradient; `inputs` holds the start tensor,
        the graph's other inputs and the loss's."""
        loss, *grads = self._session.run(self._outputs, {**inputs, **weights})
        return float(loss), dict(zip(self.names, grads, strict=True))
