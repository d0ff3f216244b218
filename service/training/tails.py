"""The backbone's last layers ("tail") that fine-tuning re-trains, found in its ONNX graph.

Three depths, one mechanism: the layers from a tapped tensor to the pooled embedding are the
backbone's own graph nodes, differentiated by backprop.py and run by onnxruntime (with the
head on top, head_graph.py), from the tapped tensor's feature maps, computed once per
training image and view (maps.py). At export the same graph gets the re-trained weights: the
model runs exactly as fast as the backbone did.

- "last-conv": the final convolution and its activation (EfficientNet-lite's 1x1 head conv,
  ReLU6, average pool);
- "last-block": walking further back through convolutions and activations until another
  kind of node (the previous block's residual Add): the last inverted-residual block;
- "top": every block from the last strided convolution on, with their residual Adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.errors import ApiError
from service.training import backprop
from service.training.steps import StepRunner

POOLS = ("GlobalAveragePool", "ReduceMean")
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Identity")
ACTIVATIONS = ("Clip", "Relu")
DEPTHS = ("last-conv", "last-block")
TOP = "top"
CHAIN = ("Conv", "Clip", "Relu")
# Learning rates of the re-trained layers, chosen on the clothing set's validation split
# (docs/training.md).
TAIL_LR = {"last-conv": 4e-3, "last-block": 2e-3, TOP: 2e-4}
# A "top" step costs 10-30 times what a last-conv one does per image: each epoch sees one
# of each image's views (they take turns) instead of all of them, for more epochs and
# smaller batches (about as many steps as the other depths). The blocks' rate ramps up over
# the first two epochs, while the new head is still close to random, so that its first
# gradients do not rewrite the pretrained blocks. Chosen on validation: docs/training.md.
TOP_SCHEDULE: dict[str, Any] = {"epochs": 15, "batch_size": 64, "tail_warmup": 2.0}


@dataclass
class GraphTail:
    """The backbone's nodes from `tap` to `embedding`, with their conv weights trainable.

    Parameters are named `g<i>w` (a conv's weight) and `g<i>b` (its bias), `i` the order of
    the conv's weights in the graph; maps are (N, C, H, W). `spatial`: some layer mixes
    neighbouring positions (else the training step may see a subset of them).
    """

    tap: str
    embedding: str
    depth: str
    path: list[onnx.NodeProto]
    constants: list[onnx.TensorProto]
    weights: dict[str, np.ndarray]
    spatial: bool = True
    # Graphs and sessions by map shape, shared by every copy that `with_params` makes.
    _cache: dict[tuple[int, ...], StepRunner] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, model: onnx.ModelProto, tap: str, embedding: str, depth: str,
           spatial: bool = True) -> GraphTail:
        """The tail of `model` from `tap`; 409 when an op on the way has no backward rule."""
        path, weights = backprop.trace(model, start=tap, outputs=[embedding])
        used = {n for node in path for n in node.input}
        constants = [init for init in model.graph.initializer
                     if init.name in used and init.name not in weights]
        copies = []
        for node in path:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copies.append(copy)
        return cls(tap, embedding, depth, copies, constants,
                   {n: w.astype(np.float32) for n, w in weights.items()}, spatial)

    @property
    def nodes(self) -> list[str]:
        """The names of the tail's nodes, in order."""
        return [n.name or n.output[0] for n in self.path]

    @property
    def names(self) -> list[str]:
        """The graph's weight names, in parameter order."""
        return list(self.weights)

    def key(self, i: int, name: str) -> str:
        """The parameter name of graph weight `name`, the i-th."""
        return f"g{i}{'w' if self.weights[name].ndim > 1 else 'b'}"

    def keys(self) -> dict[str, str]:
        """Graph weight name to parameter name."""
        return {n: self.key(i, n) for i, n in enumerate(self.names)}

    def params(self) -> dict[str, np.ndarray]:
        """The trainable weights by parameter name, as float32 copies."""
        return {k: self.weights[n].astype(np.float32).copy() for n, k in self.keys().items()}

    def with_params(self, params: dict[str, np.ndarray]) -> GraphTail:
        """The same layers with other weights."""
        return replace(self, weights={n: params[k] for n, k in self.keys().items()})

    def source(self) -> onnx.ModelProto:
        """The tail alone as a model (its weights as initializers), for graphs built on it."""
        weights = [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), n)
                   for n, w in self.weights.items()]
        graph = helper.make_graph(self.path, "tail", [], [helper.make_empty_tensor_value_info(
            self.embedding)], initializer=[*self.constants, *weights])
        return backprop.model_of(graph, check=False)

    def runner(self, shape: tuple[int, ...]) -> StepRunner:
        """The forward (and backward) graphs for maps of `shape` (C, H, W), made once."""
        if shape not in self._cache:
            self._cache[shape] = StepRunner(backprop.build(
                self.source(), start=self.tap, embedding=self.embedding, input_shape=shape))
        return self._cache[shape]

    def pool(self, maps: np.ndarray, chunk: int = 64) -> np.ndarray:
        """The embeddings of (N, C, H, W) maps (the backbone's, with these weights)."""
        if not len(maps):
            return np.zeros((0, self.width), np.float32)
        runner = self.runner(tuple(maps.shape[1:]))
        return np.concatenate([runner.embed(np.ascontiguousarray(maps[i:i + chunk],
                                                                 np.float32), self.weights)
                               for i in range(0, len(maps), chunk)]).astype(np.float32)

    @property
    def width(self) -> int:
        """Channels of the embedding (those of the last convolution)."""
        last = next(n for n in reversed(self.path) if n.op_type == "Conv")
        return int(self.weights[last.input[1]].shape[0])

    def install(self, model: onnx.ModelProto) -> None:
        """Swap the layers' weights in `model` for these, in place."""
        inits = {init.name: init for init in model.graph.initializer}
        for name, value in self.weights.items():
            inits[name].CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(value, np.float32), name))


def tail_of(model: onnx.ModelProto, embedding: str = "embedding",
            depth: str = "last-conv") -> GraphTail:
    """The tail of `depth` (DEPTHS or TOP) of `model`."""
    return top_tail(model, embedding) if depth == TOP else find_tail(model, embedding, depth)


def _chain_kind(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """"conv" for a 1x1 conv, "depthwise" for a stride-1 'same' one; None for others."""
    if node.input[1] not in inits or (len(node.input) > 2 and node.input[2]
                                      and node.input[2] not in inits):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shape = tuple(inits[node.input[1]].dims)
    group, k = attrs.get("group", 1), shape[2]
    if any(s != 1 for s in attrs.get("strides", [1, 1])) or \
            any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("auto_pad") \
            not in (None, b"NOTSET", "NOTSET") or shape[2] != shape[3]:
        return None
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if group == 1 and k == 1 and pads == [0, 0, 0, 0]:
        return "conv"
    if group == shape[0] and shape[1] == 1 and k % 2 == 1 and pads == [k // 2] * 4:
        return "depthwise"
    return None


def find_tail(model: onnx.ModelProto, embedding: str = "embedding",
              depth: str = "last-conv") -> GraphTail:
    """The layers between the backbone's last block input (or last conv) and `embedding`.

    409 when the graph does not end in a convolution, activation and average pool.
    """
    if depth not in DEPTHS:
        raise ValueError(f"unknown depth {depth!r}")
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {i.name: i for i in model.graph.initializer}
    node = producers.get(embedding)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in POOLS:
        raise _no_tail()
    kinds: list[str] = []
    taps: list[str] = []  # each layer's input tensor
    current = producers.get(node.input[0])
    while current is not None:
        kind = ("clip" if current.op_type in ACTIVATIONS else _chain_kind(current, inits)
                if current.op_type == "Conv" else None)
        if kind is None or (depth == "last-conv" and any(k != "clip" for k in kinds)):
            break
        kinds.insert(0, kind)
        taps.insert(0, current.input[0])
        if _consumers(model, current.input[0]) != 1:
            break  # its input is used elsewhere too: re-training its producer would change that
        current = producers.get(current.input[0])
    while kinds and kinds[0] == "clip":  # a tail starts at a convolution
        kinds.pop(0)
        taps.pop(0)
    if not kinds or kinds[-1] != "clip":
        raise _no_tail()
    return GraphTail.of(model, taps[0], embedding, depth, spatial="depthwise" in kinds)


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


def top_tail(model: onnx.ModelProto, embedding: str = "embedding") -> GraphTail:
    """The tail from the last strided block's input to `embedding`."""
    return GraphTail.of(model, find_top(model, embedding), embedding, TOP)


def _consumers(model: onnx.ModelProto, name: str) -> int:
    return sum(name in node.input for node in model.graph.node) + \
        sum(name == out.name for out in model.graph.output)


def _no_tail() -> ApiError:
    return ApiError("no_last_conv", "this backbone does not end in convolutions, an "
                    "activation and an average pool; fine-tune with --tune none", status=409)
