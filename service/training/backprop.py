"""Backward passes of a CNN backbone as ONNX graphs, run by the same ONNX Runtime as inference.

Fine-tuning deeper than the last block needs the whole network's backward pass; PyTorch is
not a run-time dependency, and onnxruntime-training would replace the inference package. So
the gradient graph is built here from the backbone's own graph, for the ops that the
convolutional backbones use (Conv of any group, stride and padding; Clip/Relu; Add;
GlobalAveragePool; Flatten), and run with onnxruntime (`build`, then `StepRunner`):

- the forward graph: the backbone with its trainable weights as inputs, and every tensor that
  the backward pass needs as an extra output;
- the backward graph: those tensors, the weights and the gradient of the embedding in, the
  gradient of each weight out. A convolution's input gradient is a ConvTranspose with the
  same kernel (a Conv by the transposed kernel for pointwise ones); its weight gradient
  correlates the input with the output gradient: for full convolutions a MatMul over
  positions per kernel offset, for depthwise ones a single convolution with a group per
  channel over the batch's images.

Shapes must be static except the batch: the graphs are built for one input size.

Over 300 lines: the forward taps and the backward graph of each op must match one to one;
they are kept together until training computes every gradient one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from service.embedding.convert.graph import IR_VERSION, OPSET
from service.errors import ApiError
from service.training.tail import clip_layer

SUPPORTED = ("Conv", "Clip", "Relu", "Add", "GlobalAveragePool", "Flatten")


@dataclass
class GradientGraphs:
    """The two graphs of a training step and the names that connect them."""

    forward: onnx.ModelProto
    backward: onnx.ModelProto
    start: str
    embedding: str
    weights: dict[str, np.ndarray]
    saved: list[str] = field(default_factory=list)

    def grad_name(self, tensor: str) -> str:
        """Name of a tensor's gradient in the backward graph."""
        return grad_name(tensor)


def grad_name(tensor: str) -> str:
    """Name of a tensor's gradient in the backward graph (the embedding's is an input)."""
    return f"grad/{tensor}"


class StepRunner:
    """The two graphs in onnxruntime sessions; the weights are fed with every call."""

    def __init__(self, graphs: GradientGraphs) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # unused initializers (the clips' bounds) are expected
        self.graphs = graphs
        self._forward = ort.InferenceSession(graphs.forward.SerializeToString(), options,
                                             providers=["CPUExecutionProvider"])
        self._backward = ort.InferenceSession(graphs.backward.SerializeToString(), options,
                                              providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in graphs.forward.graph.output]

    def forward(self, x: np.ndarray, weights: dict[str, np.ndarray]
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The embedding of a batch, and what the backward pass reads."""
        out = dict(zip(self._outputs, self._forward.run(
            self._outputs, {self.graphs.start: x, **weights}), strict=True))
        out[self.graphs.start] = x
        return out[self.graphs.embedding], out

    def embed(self, x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
        """The embedding of a batch only (nothing kept for a backward pass)."""
        return self._forward.run([self.graphs.embedding], {self.graphs.start: x, **weights})[0]

    def backward(self, saved: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                 grad: np.ndarray) -> dict[str, np.ndarray]:
        """Each weight's gradient, given the embedding's."""
        feed = {n: saved[n] for n in self.graphs.saved} | weights
        feed[grad_name(self.graphs.embedding)] = grad
        names = list(self.graphs.weights)
        return dict(zip(names, self._backward.run(
            [self.graphs.grad_name(n) for n in names], feed), strict=True))


def build(model: onnx.ModelProto, *, start: str, embedding: str = "embedding",
          input_shape: tuple[int, int, int]) -> GradientGraphs:
    """Forward and backward graphs of `model` from tensor `start` (C, H, W) to `embedding`.

    Every Conv weight and bias between the two is trainable. 409 when the path holds an op
    outside SUPPORTED.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    path = _path(producers, start, embedding)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    names = [n for node in path if node.op_type == "Conv" for n in node.input[1:] if n]
    if any(n not in inits for n in names):
        raise ApiError("unsupported_backbone", "cannot train a convolution whose weights are "
                       "computed, not stored", status=409)
    weights = {n: inits[n].astype(np.float32) for n in names}
    shapes = _shapes(model, path, start, input_shape, inits)
    constants = [numpy_helper.from_array(inits[n], n) for node in path
                 for n in node.input if n in inits and n not in weights]
    fwd = helper.make_graph(
        path, "forward",
        [_value(start, (None, *input_shape))] + [_value(n, w.shape) for n, w in weights.items()],
        [_value(embedding, (None, *shapes[embedding][1:]))],
        initializer=_unique(constants))
    grads = _Backward(model, shapes, inits, weights, start)
    saved = grads.run(path, embedding)
    fwd.output.extend(_value(n, (None, *shapes[n][1:])) for n in saved
                      if n not in (embedding, start))
    bwd = helper.make_graph(
        grads.nodes, "backward",
        [_value(n, (None, *shapes[n][1:])) for n in saved] +
        [_value(n, w.shape) for n, w in weights.items()] +
        [_value(grad_name(embedding), (None, *shapes[embedding][1:]))],
        [_value(grad_name(n), w.shape) for n, w in weights.items()],
        initializer=_unique(constants + grads.constants))
    return GradientGraphs(_model(fwd), _model(bwd), start, embedding, weights, saved)


def _model(graph: onnx.GraphProto, check: bool = True) -> onnx.ModelProto:
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


def _value(name: str, shape: tuple) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _path(producers: dict[str, onnx.NodeProto], start: str,
          embedding: str) -> list[onnx.NodeProto]:
    """Nodes that `embedding` depends on from `start`, in topological order."""
    order: list[onnx.NodeProto] = []
    seen: set[int] = set()

    def visit(name: str) -> None:
        node = producers.get(name)
        if name == start or node is None or id(node) in seen:
            return
        if node.op_type not in SUPPORTED:
            raise ApiError("unsupported_backbone", f"cannot train through {node.op_type} "
                           f"({node.name or name}); fine-tune with --tune none or last-conv",
                           status=409)
        seen.add(id(node))
        for inp in node.input[:1] if node.op_type in ("Conv", "Clip") else node.input:
            visit(inp)
        order.append(node)

    visit(embedding)
    return order


def _shapes(model: onnx.ModelProto, path: list[onnx.NodeProto], start: str,
            input_shape: tuple[int, int, int],
            inits: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    graph = helper.make_graph(
        list(path), "shapes", [_value(start, (1, *input_shape))],
        [helper.make_empty_tensor_value_info(path[-1].output[0])],
        initializer=_unique([numpy_helper.from_array(inits[n], n) for node in path
                             for n in node.input if n in inits]))
    inferred = shape_inference.infer_shapes(_model(graph, check=False), strict_mode=True)
    shapes = {start: (1, *input_shape)}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        shapes[info.name] = tuple(d.dim_value for d in info.type.tensor_type.shape.dim)
    return shapes


class _Backward:
    """Appends the gradient nodes of each forward node, last node first."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                 inits: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                 start: str) -> None:
        self.model = model
        self.shapes, self.inits, self.weights, self.start = shapes, inits, weights, start
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.saved: list[str] = []
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"bw/{stem}/{self.count}"

    def const(self, values: np.ndarray | list[int], stem: str) -> str:
        name = self.fresh(stem)
        arr = np.asarray(values)
        self.constants.append(numpy_helper.from_array(
            arr.astype(np.int64 if arr.dtype.kind in "iu" else np.float32), name))
        return name

    def add(self, op: str, inputs: list[str], stem: str, **attrs: object) -> str:
        out = self.fresh(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def save(self, name: str) -> str:
        if name not in self.saved:
            self.saved.append(name)
        return name

    def run(self, path: list[onnx.NodeProto], embedding: str) -> list[str]:
        """Build every gradient; returns the forward tensors that the backward graph reads."""
        pending: dict[str, list[str]] = {embedding: [grad_name(embedding)]}
        for node in reversed(path):
            parts = pending.pop(node.output[0], [])
            if not parts:
                continue
            grad = parts[0] if len(parts) == 1 else self.add("Sum", parts, "sum")
            for name, g in self.node_grads(node, grad):
                if name in self.weights:
                    self.nodes.append(helper.make_node("Identity", [g], [grad_name(name)]))
                elif name != self.start and name not in self.inits:
                    pending.setdefault(name, []).append(g)
        return self.saved

    def node_grads(self, node: onnx.NodeProto, grad: str) -> list[tuple[str, str]]:
        """(input name, its gradient) for each input of `node` that needs one."""
        x = node.input[0]
        if node.op_type == "Flatten":
            return [(x, self.add("Reshape", [grad, self.const(list(
                (-1, *self.shapes[x][1:])), "shape")], "flat"))]
        if node.op_type == "GlobalAveragePool":
            _, c, h, w = self.shapes[x]
            scaled = self.add("Mul", [grad, self.const(np.float32(1 / (h * w)), "area")], "gap")
            return [(x, self.add("Expand", [scaled, self.const([1, c, h, w], "shape")], "gap"))]
        if node.op_type == "Add":
            return [(x, grad), (node.input[1], grad)]
        if node.op_type in ("Clip", "Relu"):
            clip = clip_layer(self.model, node)  # the bounds as the numpy tail reads them
            inside = self.add("Greater", [self.save(x), self.const(
                np.float32(clip.low), "low")], "gt")
            if np.isfinite(clip.high):
                inside = self.add("And", [inside, self.add(
                    "Less", [x, self.const(np.float32(clip.high), "high")], "lt")], "and")
            # A cast mask times the gradient: Where, or the mask as float ops (Sign of Relu),
            # measured slower in onnxruntime.
            mask = self.add("Cast", [inside], "mask", to=TensorProto.FLOAT)
            return [(x, self.add("Mul", [grad, mask], "clip"))]
        return self.conv_grads(node, grad)

    def conv_grads(self, node: onnx.NodeProto, grad: str) -> list[tuple[str, str]]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, w_name = node.input[0], node.input[1]
        weight = self.weights[w_name]
        out_c, in_per_group, k, kw = weight.shape
        group = int(attrs.get("group", 1))
        strides = list(attrs.get("strides", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if list(attrs.get("dilations", [1, 1])) != [1, 1] or \
                attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ApiError("unsupported_backbone", "cannot train through a dilated or "
                           "auto-padded convolution", status=409)
        _, in_c, hx, wx = self.shapes[x]
        _, _, hy, wy = self.shapes[node.output[0]]
        out: list[tuple[str, str]] = []
        if len(node.input) > 2 and node.input[2]:
            out.append((node.input[2], self.add("ReduceSum", [grad, self.const(
                [0, 2, 3], "axes")], "db", keepdims=0)))
        xp = self.save(x)
        if any(pads):
            xp = self.add("Pad", [x, self.const([0, 0, pads[0], pads[1], 0, 0, pads[2],
                                                 pads[3]], "pads")], "pad")
        if group > 1:
            if not (in_per_group == 1 and group == out_c == in_c):
                raise ApiError("unsupported_backbone", "cannot train through a grouped "
                               "convolution other than a depthwise one", status=409)
            out.append((w_name, self.depthwise_weight_grad(xp, grad, weight.shape, strides,
                                                           hx + pads[0] + pads[2],
                                                           wx + pads[1] + pads[3])))
        else:
            out.append((w_name, self.dense_weight_grad(xp, grad, weight.shape, strides,
                                                       in_c, hy, wy)))
        if x == self.start:
            return out
        if (k, kw, group, *strides, *pads) == (1, 1, 1, 1, 1, 0, 0, 0, 0):
            # A pointwise convolution's input gradient is the pointwise convolution by the
            # transposed kernel: onnxruntime runs that as one GEMM, faster than ConvTranspose.
            dx = self.add("Conv", [grad, self.add("Transpose", [w_name], "wt",
                                                  perm=[1, 0, 2, 3])], "dx")
        else:
            extra = [hx - ((hy - 1) * strides[0] - pads[0] - pads[2] + k),
                     wx - ((wy - 1) * strides[1] - pads[1] - pads[3] + kw)]
            dx = self.add("ConvTranspose", [grad, w_name], "dx", group=group, strides=strides,
                          pads=pads, output_padding=extra, kernel_shape=[k, kw])
        return [*out, (x, dx)]

    def depthwise_weight_grad(self, xp: str, grad: str, shape: tuple[int, ...],
                              strides: list[int], hp: int, wp: int) -> str:
        """dW[c] = Σ_n correlation of the padded input's channel c with the grad's."""
        # One convolution with a group per channel, each over the batch's N images: the
        # input (1, C·N, Hp, Wp), the output gradient as its kernel (C, N, Hy, Wy), dilated
        # by the stride. Per kernel offset, a slice, product and sum over the whole batch
        # cost 5-6 times as much (most of a backward step through depthwise blocks).
        channels, _, k, kw = shape
        rows = self.add("Reshape", [self.add("Transpose", [xp], "dwx", perm=[1, 0, 2, 3]),
                                    self.const([1, -1, hp, wp], "shape")], "dwx")
        kernel = self.add("Transpose", [grad], "dwg", perm=[1, 0, 2, 3])
        dw = self.add("Conv", [rows, kernel], "dw", group=channels, dilations=strides)
        dw = self.add("Slice", [dw, self.const([0, 0], "starts"), self.const([k, kw], "ends"),
                                self.const([2, 3], "axes")], "dw")  # rows the stride skipped
        return self.add("Reshape", [dw, self.const(list(shape), "shape")], "dw")

    def dense_weight_grad(self, xp: str, grad: str, shape: tuple[int, ...],
                          strides: list[int], in_c: int, hy: int, wy: int) -> str:
        """dW of an ungrouped convolution: per kernel offset, grad rows times shifted input."""
        out_c, _, k, kw = shape
        per_offset = []
        # (O, N·HW) times (N·HW, I): one GEMM per offset that sums over the batch too (a
        # batched MatMul per image, then a sum, wrote an (N, O, I) array first).
        grad_rows = self.add("Reshape", [self.add("Transpose", [grad], "rows", perm=[
            1, 0, 2, 3]), self.const([out_c, -1], "shape")], "rows")
        for a in range(k):
            for b in range(kw):
                shifted = xp
                if (k, kw, *strides) != (1, 1, 1, 1):
                    shifted = self.add("Slice", [xp, self.const([a, b], "starts"), self.const(
                        [a + (hy - 1) * strides[0] + 1, b + (wy - 1) * strides[1] + 1], "ends"),
                        self.const([2, 3], "axes"), self.const(strides, "steps")], "shift")
                cols = self.add("Reshape", [self.add("Transpose", [shifted], "cols", perm=[
                    0, 2, 3, 1]), self.const([-1, in_c], "shape")], "cols")
                per_offset.append(self.add("MatMul", [grad_rows, cols], "dw"))  # (O, I)
        stacked = per_offset[0] if len(per_offset) == 1 else self.add(
            "Concat", [self.add("Unsqueeze", [p, self.const([-1], "axes")], "dw")
                       for p in per_offset], "dw", axis=-1)
        return self.add("Reshape", [stacked, self.const(list(shape), "shape")], "dw")
