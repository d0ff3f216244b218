"""The backbone's blocks at its last feature resolution ("top"), re-trained through ONNX graphs.

The numpy tail (tail.py) stops at the last block: deeper, the blocks have strided and
depthwise convolutions and residual Adds. Fine-tuning everything from the last downsampling
on (EfficientNet-lite0's blocks 11-15 and head conv) gave four fifths of the whole backbone's
gain in the PyTorch oracle (docs/training.md). `GraphTail` trains those layers with the
gradient graphs of backprop.py, run by onnxruntime, from the cached feature maps that feed
the block of the last strided convolution; it has the numpy `Tail`'s interface, so the heads'
training loop runs it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from service.errors import ApiError
from service.training import backprop

TOP = "top"
# A GraphTail step costs 10-30 times what the numpy tail's does per image: each epoch
# sees one of each image's views (they take turns) instead of all of them, for more epochs
# and smaller batches (about as many steps as the tail path). The blocks' rate ramps up over
# the first two epochs, while the new head is still close to random, so that its first
# gradients do not rewrite the pretrained blocks. Learning rate (TAIL_LR) and warm-up,
# chosen on validation: docs/training.md.
TOP_SCHEDULE: dict[str, Any] = {"epochs": 15, "batch_size": 64, "tail_warmup": 2.0}
CHAIN = ("Conv", "Clip", "Relu")


def find_top(model: onnx.ModelProto, embedding: str = "embedding") -> str:
    """The tensor that feeds the block of the last strided convolution before `embedding`.

    Walks back from that convolution through convolutions and activations to the first
    other node (the previous block's residual Add). 409 when the graph has no strided
    convolution.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    order: list[onnx.NodeProto] = []
    seen: set[int] = set()
    stack = [embedding]
    while stack:  # every node `embedding` depends on
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        stack.extend(node.input)
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    strided = [n for n in order if n.op_type == "Conv" and any(
        s > 1 for a in n.attribute if a.name == "strides" for s in a.ints)]
    if not strided:
        raise ApiError("unsupported_backbone", "this backbone has no strided convolution to "
                       "start --tune top at; use --tune last-conv", status=409)
    node = max(strided, key=lambda n: position[id(n)])
    while (up := producers.get(node.input[0])) is not None and up.op_type in CHAIN:
        node = up
    return node.input[0]


def tensor_shape(model: onnx.ModelProto, name: str) -> tuple[int, int, int]:
    """(C, H, W) of a tensor of `model`, inferred from its input's static shape."""
    inferred = shape_inference.infer_shapes(model)
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        if info.name == name:
            dims = tuple(d.dim_value for d in info.type.tensor_type.shape.dim)
            if len(dims) == 4 and all(dims[1:]):
                return dims[1], dims[2], dims[3]
    raise ApiError("unsupported_backbone", f"cannot infer the static shape of {name!r}: "
                   "--tune top needs a fixed input size", status=409)


@dataclass
class GraphTail:
    """Layers from `tap` to the embedding, trained with onnxruntime gradient graphs.

    Parameters are named `g<i>w` (a conv's weight) and `g<i>b` (its bias), `i` the order of
    the conv's weights in the graph; maps are (N, C, H, W), as for `Tail`.
    """

    graphs: backprop.GradientGraphs
    tap: str
    depth: str = TOP
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    # The onnxruntime sessions, shared by every copy that `with_params` makes.
    _runner: list[backprop.StepRunner] = field(default_factory=list, repr=False)

    spatial = True  # its convolutions mix neighbouring positions: no position subsampling

    @property
    def names(self) -> list[str]:
        """The graph's weight names, in parameter order."""
        return list(self.graphs.weights)

    def key(self, i: int, name: str) -> str:
        """The parameter name of graph weight `name`, the i-th."""
        return f"g{i}{'w' if self.graphs.weights[name].ndim > 1 else 'b'}"

    def params(self) -> dict[str, np.ndarray]:
        """The trainable weights by parameter name, as float32 copies."""
        return {self.key(i, n): self.weights[n].astype(np.float32).copy()
                for i, n in enumerate(self.names)}

    def with_params(self, params: dict[str, np.ndarray]) -> GraphTail:
        """The same layers with other weights."""
        return replace(self, weights=self._feed(params))

    def _feed(self, params: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if params is None:
            return self.weights
        return {n: params[self.key(i, n)] for i, n in enumerate(self.names)}

    @property
    def runner(self) -> backprop.StepRunner:
        """The sessions, made on first use."""
        if not self._runner:
            self._runner.append(backprop.StepRunner(self.graphs))
        return self._runner[0]

    def forward(self, maps: np.ndarray, params: dict[str, np.ndarray] | None = None,
                keep: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Embeddings (N, width) of (N, C, H, W) maps, and with `keep` what backward reads."""
        x = np.ascontiguousarray(maps, np.float32)
        if not keep:
            return self.runner.embed(x, self._feed(params)), {}
        return self.runner.forward(x, self._feed(params))

    def backward(self, grad: np.ndarray, params: dict[str, np.ndarray],
                 saved: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Gradients of the parameters, given the gradient of the embeddings."""
        grads = self.runner.backward(saved, self._feed(params),
                                     np.ascontiguousarray(grad, np.float32))
        return {self.key(i, n): grads[n] for i, n in enumerate(self.names)}

    def pool(self, maps: np.ndarray, chunk: int = 64) -> np.ndarray:
        """The embeddings of maps, computed in chunks."""
        out = [self.forward(maps[i:i + chunk])[0] for i in range(0, len(maps), chunk)]
        if not out:
            return np.zeros((0, self.width), np.float32)
        return np.concatenate(out).astype(np.float32)

    @property
    def width(self) -> int:
        """Channels of the embedding."""
        dims = self.graphs.forward.graph.output[0].type.tensor_type.shape.dim
        return int(dims[-1].dim_value)

    def install(self, model: onnx.ModelProto) -> None:
        """Swap the layers' weights in `model` for these, in place."""
        inits = {init.name: init for init in model.graph.initializer}
        for name, value in self.weights.items():
            inits[name].CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(value, np.float32), name))


def top_tail(model: onnx.ModelProto, embedding: str = "embedding") -> GraphTail:
    """The GraphTail from the last strided block's input to `embedding`; 409 when an op on the
    way has no backward rule."""
    tap = find_top(model, embedding)
    graphs = backprop.build(model, start=tap, embedding=embedding,
                            input_shape=tensor_shape(model, tap))
    nodes = [n.name for n in graphs.forward.graph.node]
    return GraphTail(graphs, tap, weights=dict(graphs.weights), nodes=nodes)
