"""The backbone's last 1x1 convolution: find it in the ONNX graph, tap its input, replace it.

CNN backbones here end in conv 1x1 -> ReLU6 (or ReLU) -> global average pool -> embedding.
Fine-tuning that convolution with the head needs its input feature maps (computed once per
training image and view) and, at export, the same graph with the convolution's weights
swapped: the model runs exactly as fast as the backbone did.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from service.embedding.transforms import Preprocessing, batch, preprocess
from service.errors import ApiError
from service.training.heads import ConvStage

POOLS = ("GlobalAveragePool", "ReduceMean")
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Identity")
TAP = "lookalike_last_conv_input"


@dataclass
class LastConv:
    """Where the last convolution sits in a graph, and its pretrained weights."""

    node: str
    tap: str
    weight_name: str
    bias_name: str | None
    stage: ConvStage


def _constant(model: onnx.ModelProto, name: str) -> float | None:
    for init in model.graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return float(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
    return None


def find_last_conv(model: onnx.ModelProto, embedding: str = "embedding") -> LastConv:
    """The 1x1 convolution whose clipped output is pooled into `embedding`; 409 if none."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {i.name: i for i in model.graph.initializer}
    node = producers.get(embedding)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    activation = producers.get(node.input[0]) if node is not None and \
        node.op_type in POOLS else None
    conv = producers.get(activation.input[0]) if activation is not None and \
        activation.op_type in ("Clip", "Relu") else None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute} if conv else {}
    if conv is None or conv.op_type != "Conv" or conv.input[1] not in inits or \
            list(attrs.get("kernel_shape", [1, 1])) != [1, 1] or attrs.get("group", 1) != 1:
        raise ApiError("no_last_conv", "this backbone does not end in a 1x1 convolution, "
                       "activation and average pool; fine-tune without --tune-conv",
                       status=409)
    assert activation is not None
    low, high = 0.0, float("inf")
    if activation.op_type == "Clip":
        bounds = [_constant(model, n) if n else None for n in list(activation.input[1:3])]
        bounds += [None] * (2 - len(bounds))
        attr = {a.name: a.f for a in activation.attribute}
        low = bounds[0] if bounds[0] is not None else attr.get("min", float("-inf"))
        high = bounds[1] if bounds[1] is not None else attr.get("max", float("inf"))
    weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
    bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    bias = (numpy_helper.to_array(inits[bias_name]).astype(np.float32) if bias_name
            else np.zeros(weight.shape[0], np.float32))
    return LastConv(node=conv.name, tap=conv.input[0], weight_name=conv.input[1],
                    bias_name=bias_name, stage=ConvStage(weight[:, :, 0, 0].T.copy(), bias,
                                                         float(low), float(high)))


def replace_last_conv(model: onnx.ModelProto, stage: ConvStage,
                      embedding: str = "embedding") -> None:
    """Swap the last convolution's weights for re-trained ones, in place."""
    site = find_last_conv(model, embedding)
    weight = numpy_helper.from_array(
        stage.weight.T[:, :, None, None].astype(np.float32), site.weight_name)
    for init in model.graph.initializer:
        if init.name == site.weight_name:
            init.CopyFrom(weight)
        elif init.name == site.bias_name:
            init.CopyFrom(numpy_helper.from_array(stage.bias.astype(np.float32), init.name))
    if site.bias_name is None:
        name = f"{site.weight_name}_tuned_bias"
        model.graph.initializer.append(numpy_helper.from_array(
            stage.bias.astype(np.float32), name))
        node = next(n for n in model.graph.node if n.name == site.node)
        node.input[:] = [node.input[0], node.input[1], name]


class MapRunner:
    """A backbone that outputs the input maps of its last convolution, (N, C, positions)."""

    def __init__(self, model: onnx.ModelProto, input_name: str,
                 embedding: str = "embedding") -> None:
        import onnxruntime as ort

        self.site = find_last_conv(model, embedding)
        tapped = onnx.ModelProto()
        tapped.CopyFrom(model)
        tapped.graph.output.append(onnx.helper.make_tensor_value_info(
            TAP, onnx.TensorProto.FLOAT, None))
        tapped.graph.node.append(onnx.helper.make_node("Identity", [self.site.tap], [TAP]))
        self.input_name = input_name
        self.session = ort.InferenceSession(tapped.SerializeToString(),
                                            providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> np.ndarray:
        """Feature maps of a batch of model inputs, as float16 (they are kept in memory)."""
        maps = self.session.run([TAP], {self.input_name: images})[0]
        return maps.reshape(len(maps), maps.shape[1], -1).astype(np.float16)


def centre_maps(items: Iterable[bytes], runner: MapRunner, prep: Preprocessing, *,
                max_pixels: int, batch_size: int = 32) -> np.ndarray:
    """Feature maps of each image under the model's own preprocessing, (N, C, positions)."""
    out: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    for data in items:
        pending.append(preprocess(data, prep, max_pixels=max_pixels))
        if len(pending) == batch_size:
            out.append(runner.run(batch(pending)))
            pending = []
    if pending:
        out.append(runner.run(batch(pending)))
    if not out:
        raise ValueError("no images")
    return np.concatenate(out)
