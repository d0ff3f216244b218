"""The one builder of the service's ONNX graphs, on top of `onnx.helper`.

Every graph the service writes goes through `GraphBuilder`: the image models converted from
PyTorch checkpoints, the sentence model converted from safetensors, and the heads and joins
appended to existing models. It names tensors uniquely, holds the initializers, wraps a
graph into a checked model at the opset below, and adds its nodes to an existing graph.

Batch norm is folded into the convolution before it (see `weights.fold_batch_norm`), so the
CNN graphs have no BatchNormalization nodes: fewer ops at run time and nothing that depends
on training-mode statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.embedding.convert.weights import Weights, fold_batch_norm

# Opset 17 is the newest every runtime we target (onnxruntime >= 1.13) runs; IR 8 is the
# IR version that came with it, so older onnxruntime builds accept the file too.
OPSET = 17
IR_VERSION = 8


def tensor(name: str, dims: Sequence[int | str], elem_type: int = TensorProto.FLOAT
           ) -> onnx.ValueInfoProto:
    """A graph input or output: name, element type and shape (a str is a dynamic axis)."""
    return helper.make_tensor_value_info(name, elem_type, list(dims))


def check(model: onnx.ModelProto, *, infer_shapes: bool = True) -> onnx.ModelProto:
    """Check the model, by default with strict shape inference; return it."""
    onnx.checker.check_model(model, full_check=infer_shapes)
    return model


def same_padding(size: tuple[int, int], kernel: int, stride: int) -> list[int]:
    """TensorFlow "SAME" padding for a static input size, as ONNX [top, left, bottom, right].

    The total is split with the odd pixel at the bottom/right, as TF (and the
    reference PyTorch port's ZeroPad2d) does, so it is asymmetric for even sizes
    with stride 2.
    """
    pads: list[int] = []
    for dim in size:
        out = -(-dim // stride)
        pads.append(max((out - 1) * stride + kernel - dim, 0))
    pad_h, pad_w = pads
    return [pad_h // 2, pad_w // 2, pad_h - pad_h // 2, pad_w - pad_w // 2]


def conv_output_size(
    size: tuple[int, int], kernel: int, stride: int, pads: list[int]
) -> tuple[int, int]:
    """Spatial output size of a convolution with explicit pads."""
    height = (size[0] + pads[0] + pads[2] - kernel) // stride + 1
    width = (size[1] + pads[1] + pads[3] - kernel) // stride + 1
    return height, width


class GraphBuilder:
    """Accumulates nodes and initializers; names are made unique by a counter.

    `prefix` starts every name the builder makes, so that what it adds to an existing graph
    cannot clash with that graph's own names.
    """

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._prefix = prefix
        self._count = 0
        self._shared: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{self._prefix}{prefix}_{self._count}"

    # --- mechanics --------------------------------------------------------------------------

    def constant(self, prefix: str, array: np.ndarray) -> str:
        """Add an initializer and return its name."""
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def shared(self, prefix: str, array: np.ndarray) -> str:
        """A small constant added once per distinct value (dtype, shape and bytes)."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._shared:
            self._shared[key] = self.constant(prefix, array)
        return self._shared[key]

    def op(self, op_type: str, inputs: Sequence[str], *, output: str | None = None,
           prefix: str | None = None, **attrs: object) -> str:
        """Add one node and return its output: `output`, else a new name from `prefix`."""
        out = output or self._name(prefix or op_type.lower())
        # A node is named after its output; an explicit output gets the builder's prefix on
        # the node's name so that it cannot repeat a node name of a graph it is added to.
        node_name = out if output is None else f"{self._prefix}{output}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        return out

    def include(self, graph: onnx.GraphProto) -> None:
        """Copy another graph's nodes and initializers in (prefix its names first if need be)."""
        self.nodes.extend(graph.node)
        self.initializers.extend(graph.initializer)

    def add_to(self, graph: onnx.GraphProto, *, first: bool = False) -> None:
        """Add the nodes and initializers to an existing graph, before its own nodes if `first`."""
        graph.initializer.extend(self.initializers)
        if first:
            for node in reversed(self.nodes):
                graph.node.insert(0, node)
        else:
            graph.node.extend(self.nodes)

    def model(
        self,
        *,
        name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        doc: str = "",
        metadata: Mapping[str, str] | None = None,
        opsets: Sequence[onnx.OperatorSetIdProto] | None = None,
        ir_version: int = IR_VERSION,
        infer_shapes: bool = True,
    ) -> onnx.ModelProto:
        """Wrap the graph in a checked model (the opset above unless `opsets` is given)."""
        graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs),
                                  initializer=self.initializers)
        model = helper.make_model(
            graph,
            producer_name="lookalike",
            doc_string=doc,
            opset_imports=list(opsets or [helper.make_opsetid("", OPSET)]),
        )
        model.ir_version = ir_version
        if metadata:
            helper.set_model_props(model, dict(metadata))
        return check(model, infer_shapes=infer_shapes)

    # --- convolutional networks -------------------------------------------------------------

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray, *, stride: int,
             pads: list[int], group: int = 1, name: str) -> str:
        """Add a Conv with explicit pads and return its output name."""
        kernel = weight.shape[-1]
        w = self.constant(f"{name}.weight", weight)
        b = self.constant(f"{name}.bias", bias)
        return self.op("Conv", [x, w, b], prefix=name, kernel_shape=[kernel, kernel],
                       strides=[stride, stride], pads=pads, group=group)

    def conv_bn(self, weights: Weights, x: str, *, conv: str, bn: str,
                shape: tuple[int, int, int, int], stride: int, pads: list[int], eps: float,
                group: int = 1, relu6: bool = True) -> str:
        """Bias-free conv `{conv}.weight` with batch norm `{bn}.*` folded in, then ReLU6."""
        channels = shape[0]
        weight, bias = fold_batch_norm(
            weights.get(f"{conv}.weight", shape),
            None,
            weights.get(f"{bn}.weight", (channels,)),
            weights.get(f"{bn}.bias", (channels,)),
            weights.get(f"{bn}.running_mean", (channels,)),
            weights.get(f"{bn}.running_var", (channels,)),
            eps,
        )
        out = self.conv(x, weight, bias, stride=stride, pads=pads, group=group, name=conv)
        return self.relu6(out) if relu6 else out

    def relu6(self, x: str) -> str:
        """Add Clip(0, 6); the two bounds are shared initializers."""
        low = self.shared("relu6.min", np.array(0.0, dtype=np.float32))
        high = self.shared("relu6.max", np.array(6.0, dtype=np.float32))
        return self.op("Clip", [x, low, high], prefix="relu6")

    def add(self, a: str, b: str) -> str:
        """Add an elementwise Add (residual connection)."""
        return self.op("Add", [a, b])

    def global_pool(self, x: str, output: str) -> str:
        """Global average pool to [N, C] under the name `output`."""
        pooled = self.op("GlobalAveragePool", [x], prefix="pool")
        return self.op("Flatten", [pooled], output=output, axis=1)

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, output: str) -> str:
        """A fully connected layer on [N, in], torch layout [out, in], under the name `output`."""
        w = self.constant("fc.weight", weight.astype(np.float32))
        b = self.constant("fc.bias", bias.astype(np.float32))
        return self.op("Gemm", [x, w, b], output=output, transB=1)

    # --- dense layers, transformers, embeddings ---------------------------------------------

    def dense(self, x: str, weight: np.ndarray, bias: np.ndarray, *, prefix: str,
              output: str | None = None) -> str:
        """x @ weight + bias over the last axis of x (any rank); weight is [in, out]."""
        w = self.constant(f"{prefix}.weight", np.asarray(weight, np.float32))
        b = self.constant(f"{prefix}.bias", np.asarray(bias, np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b], output=output)

    def layer_norm(self, x: str, scale: np.ndarray, bias: np.ndarray, *, eps: float,
                   prefix: str) -> str:
        """LayerNormalization over the last axis."""
        s = self.constant(f"{prefix}.weight", np.asarray(scale, np.float32))
        b = self.constant(f"{prefix}.bias", np.asarray(bias, np.float32))
        return self.op("LayerNormalization", [x, s, b], axis=-1, epsilon=eps)

    def gelu(self, x: str) -> str:
        """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)); opset 17 has no Gelu op."""
        half = self.op("Mul", [x, self.shared("half", np.array(0.5, np.float32))])
        erf = self.op("Erf", [self.op("Div", [x, self.shared(
            "sqrt2", np.array(np.sqrt(2.0), np.float32))])])
        return self.op("Mul", [half, self.op("Add", [
            self.shared("one", np.array(1.0, np.float32)), erf])])

    def attention(self, q: str, k: str, v: str, *, heads: int, width: int,
                  bias: str | None = None) -> str:
        """Multi-head scaled dot-product attention on [N, L, width] projections.

        `bias`, broadcast to [N, heads, L, L], is added to the scores before the softmax
        (a large negative number at padding keeps it out).
        """
        head = width // heads
        split = self.shared("split", np.array([0, 0, heads, head], np.int64))
        merge = self.shared("merge", np.array([0, 0, width], np.int64))
        scale = self.shared("scale", np.array(1.0 / np.sqrt(head), np.float32))

        def by_head(t: str) -> str:
            return self.op("Transpose", [self.op("Reshape", [t, split])], perm=[0, 2, 1, 3])

        keys = self.op("Transpose", [by_head(k)], perm=[0, 1, 3, 2])
        scores = self.op("Mul", [self.op("MatMul", [by_head(q), keys]), scale])
        if bias is not None:
            scores = self.op("Add", [scores, bias])
        probs = self.op("Softmax", [scores], axis=-1)
        context = self.op("Transpose", [self.op("MatMul", [probs, by_head(v)])],
                          perm=[0, 2, 1, 3])
        return self.op("Reshape", [context, merge])

    def masked_mean(self, x: str, mask: str, *, floor: float = 1e-9) -> str:
        """Mean of x [N, L, D] over L counting only where mask [N, L] (float 0/1) is 1."""
        weights = self.op("Unsqueeze", [mask, self.shared("axis", np.array([-1], np.int64))])
        axis = self.shared("axis", np.array([1], np.int64))
        summed = self.op("ReduceSum", [self.op("Mul", [x, weights]), axis], keepdims=0)
        counts = self.op("Max", [self.op("ReduceSum", [weights, axis], keepdims=0),
                                 self.shared("floor", np.array(floor, np.float32))])
        return self.op("Div", [summed, counts])

    def l2_normalize(self, x: str, *, eps: float, clamp: bool = False,
                     output: str | None = None) -> str:
        """Rows of x [N, D] divided by their L2 norm plus eps, or by max(norm, eps) if `clamp`.

        The first is what the training heads compute in numpy, the second torch's
        `F.normalize` (the sentence model's pooling).
        """
        # ReduceL2 still takes its axes as an attribute at opset 17 (ReduceSum takes an input).
        norm = self.op("ReduceL2", [x], axes=[1], keepdims=1)
        floor = self.shared("eps", np.array(eps, np.float32))
        denominator = self.op("Max" if clamp else "Add", [norm, floor])
        return self.op("Div", [x, denominator], output=output)
