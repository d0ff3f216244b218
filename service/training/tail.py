"""The backbone's last layers ("tail"), re-trained with a head in numpy.

CNN backbones here end in a chain of convolutions with clipped activations, pooled into the
embedding: EfficientNet-lite's last inverted-residual block (1x1 expand, ReLU6, 3x3
depthwise, ReLU6, 1x1 project) and its 1x1 head convolution, ReLU6, average pool. The
chain is read from the ONNX graph, walking back from the pool; fine-tuning it needs only its
input feature maps (computed once per training image and view) and numpy forward and
backward passes of these three kinds of layer. At export the same graph gets the re-trained
weights: the model runs exactly as fast as the backbone did.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from service.errors import ApiError

POOLS = ("GlobalAveragePool", "ReduceMean")
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Identity")
ACTIVATIONS = ("Clip", "Relu")
DEPTHS = ("last-conv", "last-block")
# Learning rates of the re-trained layers, chosen on the clothing set's validation split
# (docs/training.md); "top" is the GraphTail of top.py.
TAIL_LR = {"last-conv": 4e-3, "last-block": 2e-3, "top": 2e-4}


@dataclass
class Layer:
    """One layer of a tail: a 1x1 convolution, a depthwise convolution, or a clip.

    Weights are (input channels, output channels) for "conv" and (k, k, channels) for
    "depthwise"; `node`, `weight_name` and `bias_name` locate them in the ONNX graph.
    """

    kind: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    low: float = 0.0
    high: float = float("inf")
    node: str = ""
    weight_name: str = ""
    bias_name: str | None = None


@dataclass
class Tail:
    """Layers from a tapped tensor to the pooled embedding; maps are (N, C, H, W)."""

    layers: list[Layer]
    tap: str = ""
    nodes: list[str] = field(default_factory=list)
    depth: str = "last-conv"

    @property
    def spatial(self) -> bool:
        """Whether a layer mixes neighbouring positions (else positions can be subsampled)."""
        return any(layer.kind == "depthwise" for layer in self.layers)

    def params(self) -> dict[str, np.ndarray]:
        """The trainable weights by name (`t<layer>w`, `t<layer>b`), as float32 copies."""
        out = {}
        for i, layer in enumerate(self.layers):
            if layer.weight is not None and layer.bias is not None:
                out[f"t{i}w"] = layer.weight.astype(np.float32).copy()
                out[f"t{i}b"] = layer.bias.astype(np.float32).copy()
        return out

    def with_params(self, params: dict[str, np.ndarray]) -> Tail:
        """The same tail with other weights."""
        layers = [replace(layer, weight=params[f"t{i}w"], bias=params[f"t{i}b"])
                  if f"t{i}w" in params else layer for i, layer in enumerate(self.layers)]
        return replace(self, layers=layers)

    def forward(self, maps: np.ndarray, params: dict[str, np.ndarray] | None = None,
                keep: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled outputs (N, channels) of (N, C, H, W) maps, and with `keep` each layer's input."""
        p = params if params is not None else self.params()
        x = np.ascontiguousarray(np.asarray(maps, np.float32).transpose(0, 2, 3, 1))
        inputs: list[np.ndarray] = []
        for i, layer in enumerate(self.layers):
            if layer.kind == "depthwise":
                x = _pad(x, p[f"t{i}w"].shape[0] // 2)
            if keep:
                inputs.append(x)
            if layer.kind == "conv":
                w = p[f"t{i}w"]
                x = (x.reshape(-1, w.shape[0]) @ w + p[f"t{i}b"]).reshape(*x.shape[:3], -1)
            elif layer.kind == "depthwise":
                w = p[f"t{i}w"]
                x = np.einsum("nhwcab,abc->nhwc", _windows(x, w.shape[0]), w) + p[f"t{i}b"]
            else:
                x = np.clip(x, layer.low, layer.high)
        return x.mean(axis=(1, 2)), inputs

    def backward(self, grad: np.ndarray, params: dict[str, np.ndarray],
                 inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Gradients of the weights, given the gradient of the pooled outputs."""
        n, h, w = inputs[-1].shape[:3]
        g = np.broadcast_to((grad / (h * w))[:, None, None, :], (n, h, w, grad.shape[1]))
        grads: dict[str, np.ndarray] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            layer, x = self.layers[i], inputs[i]
            if layer.kind in ("conv", "depthwise"):
                grads[f"t{i}b"] = g.sum(axis=(0, 1, 2))
            if layer.kind == "conv":
                wt = params[f"t{i}w"]
                g = np.ascontiguousarray(g).reshape(-1, wt.shape[1])
                grads[f"t{i}w"] = x.reshape(-1, wt.shape[0]).T @ g
                if i:
                    g = (g @ wt.T).reshape(*x.shape)
            elif layer.kind == "depthwise":
                wt = params[f"t{i}w"]
                k = wt.shape[0]
                grads[f"t{i}w"] = np.einsum("nhwc,nhwcab->abc", g, _windows(x, k))
                if i:  # a depthwise convolution's input gradient: the flipped kernel over g
                    g = np.einsum("nhwcab,abc->nhwc", _windows(_pad(g, k // 2), k),
                                  wt[::-1, ::-1])
            else:
                g = g * ((x > layer.low) & (x < layer.high))
        return grads

    def pool(self, maps: np.ndarray, chunk: int = 64) -> np.ndarray:
        """The backbone's pooled features computed by the tail (same as its embedding)."""
        out = [self.forward(maps[i:i + chunk])[0] for i in range(0, len(maps), chunk)]
        if not out:
            return np.zeros((0, self.width), np.float32)
        return np.concatenate(out).astype(np.float32)

    def install(self, model: onnx.ModelProto) -> None:
        """Swap the layers' weights in `model` for these, in place."""
        replace_tail(model, self)

    @property
    def width(self) -> int:
        """Channels of the pooled output."""
        last = next(layer for layer in reversed(self.layers) if layer.weight is not None)
        assert last.weight is not None
        return int(last.weight.shape[-1])


def _pad(x: np.ndarray, r: int) -> np.ndarray:
    out = np.zeros((x.shape[0], x.shape[1] + 2 * r, x.shape[2] + 2 * r, x.shape[3]), x.dtype)
    out[:, r:r + x.shape[1], r:r + x.shape[2]] = x
    return out


def _windows(padded: np.ndarray, k: int) -> np.ndarray:
    """(N, H, W, C, k, k) views of a padded (N, H + k - 1, W + k - 1, C) array; no copy."""
    return sliding_window_view(padded, (k, k), axis=(1, 2))


def _constant(model: onnx.ModelProto, name: str) -> float | None:
    for init in model.graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return float(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
    return None


def clip_layer(model: onnx.ModelProto, node: onnx.NodeProto) -> Layer:
    """The clip layer of a Clip or Relu node, its bounds read from inputs or attributes."""
    if node.op_type == "Relu":
        return Layer("clip", node=node.name)
    bounds = [_constant(model, n) if n else None for n in list(node.input[1:3])]
    bounds += [None] * (2 - len(bounds))
    attr = {a.name: a.f for a in node.attribute}
    low = bounds[0] if bounds[0] is not None else attr.get("min", float("-inf"))
    high = bounds[1] if bounds[1] is not None else attr.get("max", float("inf"))
    return Layer("clip", low=float(low), high=float(high), node=node.name)


def _conv_layer(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> Layer | None:
    """The layer of a 1x1 or a stride-1 'same' depthwise convolution; None for others."""
    if node.input[1] not in inits:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias_name is not None and bias_name not in inits:
        return None
    bias = (numpy_helper.to_array(inits[bias_name]).astype(np.float32) if bias_name
            else np.zeros(weight.shape[0], np.float32))
    group = attrs.get("group", 1)
    k = weight.shape[2]
    if any(s != 1 for s in attrs.get("strides", [1, 1])) or \
            any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("auto_pad") \
            not in (None, b"NOTSET", "NOTSET") or weight.shape[2] != weight.shape[3]:
        return None
    if group == 1 and k == 1 and list(attrs.get("pads", [0, 0, 0, 0])) == [0, 0, 0, 0]:
        return Layer("conv", weight[:, :, 0, 0].T.copy(), bias, node=node.name,
                     weight_name=node.input[1], bias_name=bias_name)
    if group == weight.shape[0] and weight.shape[1] == 1 and k % 2 == 1 and \
            list(attrs.get("pads", [])) == [k // 2] * 4:
        return Layer("depthwise", weight[:, 0].transpose(1, 2, 0).copy(), bias,
                     node=node.name, weight_name=node.input[1], bias_name=bias_name)
    return None


def find_tail(model: onnx.ModelProto, embedding: str = "embedding",
              depth: str = "last-conv") -> Tail:
    """The layers between the backbone's last block input (or last conv) and `embedding`.

    "last-conv": the final convolution and its activation; "last-block": walking further
    back through convolutions and activations until another kind of node (the previous
    block's residual Add). 409 when the graph does not end in a convolution, activation
    and average pool.
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
    layers: list[Layer] = []
    taps: list[str] = []  # each layer's input tensor
    convs = 0
    current = producers.get(node.input[0])
    while current is not None:
        if current.op_type in ACTIVATIONS:
            layer: Layer | None = clip_layer(model, current)
        elif current.op_type == "Conv":
            layer = _conv_layer(current, inits)
        else:
            break
        if layer is None or (depth == "last-conv" and convs == 1):
            break
        layers.insert(0, layer)
        taps.insert(0, current.input[0])
        convs += layer.kind != "clip"
        if _consumers(model, current.input[0]) != 1:
            break  # its input is used elsewhere too: re-training its producer would change that
        current = producers.get(current.input[0])
    while layers and layers[0].kind == "clip":  # a tail starts at a convolution
        layers.pop(0)
        taps.pop(0)
    if not layers or layers[-1].kind != "clip":
        raise _no_tail()
    return Tail(layers, tap=taps[0], nodes=[layer.node for layer in layers], depth=depth)


def _consumers(model: onnx.ModelProto, name: str) -> int:
    return sum(name in node.input for node in model.graph.node) + \
        sum(name == out.name for out in model.graph.output)


def _no_tail() -> ApiError:
    return ApiError("no_last_conv", "this backbone does not end in convolutions, an "
                    "activation and an average pool; fine-tune with --tune none", status=409)


def replace_tail(model: onnx.ModelProto, tail: Tail) -> None:
    """Swap the tail's layers' weights for re-trained ones, in place."""
    inits = {init.name: init for init in model.graph.initializer}
    convs = {node.input[1]: node for node in model.graph.node if node.op_type == "Conv"}
    for layer in tail.layers:
        if layer.weight is None or layer.bias is None:
            continue
        if layer.kind == "conv":
            weight = layer.weight.T[:, :, None, None]
        else:
            weight = layer.weight.transpose(2, 0, 1)[:, None]
        inits[layer.weight_name].CopyFrom(numpy_helper.from_array(
            np.ascontiguousarray(weight, np.float32), layer.weight_name))
        bias = numpy_helper.from_array(layer.bias.astype(np.float32),
                                       layer.bias_name or f"{layer.weight_name}_tuned_bias")
        if layer.bias_name is not None:
            inits[layer.bias_name].CopyFrom(bias)
        else:
            model.graph.initializer.append(bias)
            node = convs[layer.weight_name]
            node.input[:] = [node.input[0], node.input[1], bias.name]
