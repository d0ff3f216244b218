"""Backward passes of ONNX graphs, built as ONNX graphs and run by the inference onnxruntime.

Every gradient of fine-tuning comes from here: the backbone's re-trained layers, the head on
top of them and the logistic classifier. PyTorch is not a run-time dependency, and
onnxruntime-training would replace the inference package, so reverse mode is written once
over ONNX graphs (`build`):

- the forward graph: the source graph's nodes from tensor `start` to its outputs, with its
  trainable weights as inputs, and every tensor that the backward pass needs as an extra
  output;
- the backward graph: those tensors, the weights and the gradient of each output in, the
  gradient of each weight out, made of one backward rule per forward node (conv_rules.py
  for the backbones' ops, math_rules.py for the heads').

Trainable: every Conv weight and bias on the way, and the initializers named in `trainable`.
Other graph inputs (a dropout mask) are fed with each call. Shapes must be static except the
batch: the graphs are built for one input shape. steps.py runs them (`StepRunner`), or runs
forward, the loss's seed and backward in one session (`TrainingStep`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from service.embedding.convert.graph import IR_VERSION, OPSET
from service.errors import ApiError
from service.training import conv_rules, math_rules

RULES = {**conv_rules.RULES, **math_rules.RULES}
SUPPORTED = tuple(RULES)
NO_GRADIENT = ("Constant",)  # in the forward graph, never differentiated


@dataclass
class GradientGraphs:
    """The two graphs of a training step and the names that connect them."""

    forward: onnx.ModelProto
    backward: onnx.ModelProto
    start: str
    outputs: list[str]
    weights: dict[str, np.ndarray]
    saved: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # fed each call, not trained

    @property
    def embedding(self) -> str:
        """The first output."""
        return self.outputs[0]

    def grad_name(self, tensor: str) -> str:
        """Name of a tensor's gradient in the backward graph."""
        return grad_name(tensor)


def grad_name(tensor: str) -> str:
    """Name of a tensor's gradient in the backward graph (the outputs' are inputs)."""
    return f"grad/{tensor}"


def trace(model: onnx.ModelProto, *, start: str, outputs: Iterable[str],
          trainable: Iterable[str] = ()) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The nodes from `start` to `outputs` in topological order, and their trainable weights.

    409 when the path holds an op without a backward rule or a conv of computed weights.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    path = _path(producers, start, list(outputs))
    inits = {i.name: i for i in model.graph.initializer}
    names = [n for node in path if node.op_type == "Conv" for n in node.input[1:] if n]
    if any(n not in inits for n in names):
        raise ApiError("unsupported_backbone", "cannot train a convolution whose weights are "
                       "computed, not stored", status=409)
    names += [n for n in trainable if n not in names]
    return path, {n: numpy_helper.to_array(inits[n]) for n in names}


def build(model: onnx.ModelProto, *, start: str, input_shape: tuple[int, ...],
          embedding: str = "embedding", outputs: list[str] | None = None,
          trainable: Iterable[str] = (), dtype: type = np.float32) -> GradientGraphs:
    """Forward and backward graphs of `model` from tensor `start` (shape without the batch)
    to `outputs` (default: `embedding`), in float32 or float64 (`dtype`)."""
    outputs = outputs or [embedding]
    path, weights = trace(model, start=start, outputs=outputs, trainable=trainable)
    weights = {n: w.astype(dtype) for n, w in weights.items()}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    used = {n for node in path for n in node.input}
    extras = {v.name: v for v in model.graph.input if v.name in used and v.name != start
              and v.name not in inits}
    shapes = _shapes(path, start, input_shape, extras, inits, outputs, elem)
    constants = _unique([numpy_helper.from_array(inits[n], n) for node in path
                         for n in node.input if n in inits and n not in weights])

    def value(name: str, like: str | None = None) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, list(shapes[like or name]))

    differentiable = set(weights)
    for node in path:
        if any(i in differentiable for i in node.input) and node.op_type not in NO_GRADIENT:
            differentiable.update(node.output)
    tape = Backward(model, shapes, inits, weights, start, dtype, differentiable)
    saved = tape.run(path, outputs)
    fwd = helper.make_graph(
        path, "forward", [value(start)] + [value(n) for n in extras] +
        [value(n) for n in weights], [value(n) for n in outputs], initializer=constants)
    fwd.output.extend(value(n) for n in saved if n not in (*outputs, start, *extras))
    bwd = helper.make_graph(
        tape.nodes, "backward", [value(n) for n in saved] + [value(n) for n in weights] +
        [value(grad_name(n), n) for n in outputs],
        [value(grad_name(n), n) for n in weights],
        initializer=_unique(constants + tape.constants))
    return GradientGraphs(model_of(fwd), model_of(bwd), start, list(outputs), weights, saved,
                          list(extras))


def model_of(graph: onnx.GraphProto, check: bool = True) -> onnx.ModelProto:
    """A graph as a model at the service's opset, checked."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    if check:
        onnx.checker.check_model(model)
    return model


def _unique(tensors: list[onnx.TensorProto]) -> list[onnx.TensorProto]:
    seen: dict[str, onnx.TensorProto] = {}
    for t in tensors:
        seen.setdefault(t.name, t)
    return list(seen.values())


def _path(producers: dict[str, onnx.NodeProto], start: str,
          outputs: list[str]) -> list[onnx.NodeProto]:
    """Nodes that `outputs` depend on from `start`, in topological order."""
    order: list[onnx.NodeProto] = []
    seen: set[int] = set()

    def visit(name: str) -> None:
        node = producers.get(name)
        if name == start or node is None or id(node) in seen:
            return
        if node.op_type not in RULES and node.op_type not in NO_GRADIENT:
            raise ApiError("unsupported_backbone", f"cannot train through {node.op_type} "
                           f"({node.name or name}); fine-tune with --tune none or last-conv",
                           status=409)
        seen.add(id(node))
        for inp in node.input:
            visit(inp)
        order.append(node)

    for out in outputs:
        visit(out)
    return order


def _shapes(path: list[onnx.NodeProto], start: str, input_shape: tuple[int, ...],
            extras: dict[str, onnx.ValueInfoProto], inits: dict[str, np.ndarray],
            outputs: list[str], elem: int) -> dict[str, tuple[int | None, ...]]:
    """Each tensor's shape, None where it is the batch: inferred at batch 1 and at batch 2."""
    found = []
    for batch in (1, 2):
        inputs = [helper.make_tensor_value_info(start, elem, (batch, *input_shape))]
        for name, info in extras.items():
            dims = [batch if d.dim_param else d.dim_value
                    for d in info.type.tensor_type.shape.dim]
            inputs.append(helper.make_tensor_value_info(
                name, info.type.tensor_type.elem_type, dims))
        graph = helper.make_graph(
            list(path), "shapes", inputs,
            [helper.make_empty_tensor_value_info(n) for n in outputs],
            initializer=_unique([numpy_helper.from_array(inits[n], n) for node in path
                                 for n in node.input if n in inits]))
        inferred = shape_inference.infer_shapes(model_of(graph, check=False),
                                                strict_mode=True)
        shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
                  for i in inputs}
        for info in [*inferred.graph.value_info, *inferred.graph.output]:
            shapes[info.name] = tuple(d.dim_value for d in info.type.tensor_type.shape.dim)
        shapes.update({n: tuple(a.shape) for n, a in inits.items()})
        found.append(shapes)
    one, two = found
    return {n: tuple(None if a != b else a for a, b in zip(s, two[n], strict=True))
            for n, s in one.items()}


class Backward:
    """Appends the gradient nodes of each forward node, last node first."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int | None, ...]],
                 inits: dict[str, np.ndarray], weights: dict[str, np.ndarray], start: str,
                 dtype: type, differentiable: set[str]) -> None:
        self.model = model
        self.shapes, self.inits, self.weights, self.start = shapes, inits, weights, start
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.differentiable = differentiable
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.saved: list[str] = []
        self.count = 0

    def wants(self, name: str) -> bool:
        """Whether tensor `name` depends on a trainable weight (so needs a gradient)."""
        return name in self.differentiable

    def fresh(self, stem: str) -> str:
        """A new tensor name."""
        self.count += 1
        return f"bw/{stem}/{self.count}"

    def const(self, values: np.ndarray | list[int] | float, stem: str) -> str:
        """A constant: integers as int64 (shapes, axes), floats in the graphs' type."""
        name = self.fresh(stem)
        arr = np.asarray(values)
        self.constants.append(numpy_helper.from_array(
            arr.astype(np.int64 if arr.dtype.kind in "iu" else self.dtype), name))
        return name

    def add(self, op: str, inputs: list[str], stem: str, **attrs: object) -> str:
        """A backward node with one output; its name."""
        out = self.fresh(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def save(self, name: str) -> str:
        """A forward tensor that the backward graph reads (weights and constants it has)."""
        if name not in self.saved and name not in self.weights and name not in self.inits:
            self.saved.append(name)
        return name

    def shape_const(self, name: str) -> str:
        """The static shape of tensor `name`, -1 for the batch, as a Reshape input."""
        return self.const([-1 if d is None else d for d in self.shapes[name]], "shape")

    def unbroadcast(self, grad: str, out: str, to: str) -> str:
        """`grad` (of output `out`) summed over the axes along which input `to` was broadcast."""
        have, want = self.shapes[out], self.shapes[to]
        lead = len(have) - len(want)
        axes = list(range(lead)) + [lead + i for i, d in enumerate(want)
                                    if d == 1 and have[lead + i] != 1]
        if not axes:
            return grad
        summed = self.add("ReduceSum", [grad, self.const(axes, "axes")], "unbroadcast",
                          keepdims=1)
        return self.add("Reshape", [summed, self.shape_const(to)], "unbroadcast")

    def run(self, path: list[onnx.NodeProto], outputs: list[str]) -> list[str]:
        """Build every gradient; returns the forward tensors that the backward graph reads."""
        pending: dict[str, list[str]] = {o: [grad_name(o)] for o in outputs}
        for node in reversed(path):
            parts = pending.pop(node.output[0], [])
            if not parts or node.op_type in NO_GRADIENT:
                continue
            grad = parts[0] if len(parts) == 1 else self.add("Sum", parts, "sum")
            for name, g in RULES[node.op_type](self, node, grad):
                if self.wants(name):  # a weight, or a tensor computed from one
                    pending.setdefault(name, []).append(g)
        for name in self.weights:
            parts = pending.pop(name, [])
            total = parts[0] if len(parts) == 1 else (
                self.add("Sum", parts, "sum") if parts else self.add(
                    "Mul", [name, self.const(0.0, "zero")], "unused"))
            self.nodes.append(helper.make_node("Identity", [total], [grad_name(name)]))
        return self.saved
