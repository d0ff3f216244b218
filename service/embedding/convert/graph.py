"""A small helper for writing inference-only CNN graphs with `onnx.helper`.

Batch norm is folded into the convolution before it, so the graph has no
BatchNormalization nodes: fewer ops at run time and nothing that depends on
training-mode statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opset 17 is the newest every runtime we target (onnxruntime >= 1.13) runs; IR 8 is the
# IR version that came with it, so older onnxruntime builds accept the file too.
OPSET = 17
IR_VERSION = 8


class WeightsError(ValueError):
    """The weights do not fit the architecture (missing, unused or misshapen tensors)."""


class Weights:
    """A state dict that records which entries were used, to catch a wrong architecture."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self._weights = dict(weights)
        self._used: set[str] = set()

    def get(self, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
        """The tensor `name` as float64, checked against `shape` when given."""
        if name not in self._weights:
            raise WeightsError(f"weights have no tensor {name!r}; wrong model or variant?")
        array = np.asarray(self._weights[name])
        if shape is not None and tuple(array.shape) != tuple(shape):
            raise WeightsError(
                f"tensor {name!r} has shape {tuple(array.shape)}, the architecture needs "
                f"{tuple(shape)}; wrong model or variant?"
            )
        self._used.add(name)
        # Fold in float64 so the folded float32 weights are as close as the format allows.
        return array.astype(np.float64)

    def check_all_used(self, ignore_suffixes: Sequence[str] = ()) -> None:
        """Raise if any tensor was never used: the weights are for a bigger model."""
        unused = [
            name
            for name in self._weights
            if name not in self._used and not name.endswith(tuple(ignore_suffixes))
        ]
        if unused:
            shown = ", ".join(sorted(unused)[:5])
            raise WeightsError(f"{len(unused)} tensors were not used ({shown}...); wrong variant?")


def fold_batch_norm(
    weight: np.ndarray,
    bias: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold inference-mode batch norm into the preceding conv's weight and bias."""
    scale = gamma / np.sqrt(var + eps)
    folded_w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_b = beta - mean * scale
    if bias is not None:
        folded_b = folded_b + bias * scale
    return folded_w.astype(np.float32), folded_b.astype(np.float32)


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
    """Accumulates nodes and initializers; names are made unique by a counter."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._relu6_bounds: tuple[str, str] | None = None

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def constant(self, prefix: str, array: np.ndarray) -> str:
        """Add an initializer and return its name."""
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def conv(
        self,
        x: str,
        weight: np.ndarray,
        bias: np.ndarray,
        *,
        stride: int,
        pads: list[int],
        group: int = 1,
        name: str,
    ) -> str:
        """Add a Conv with explicit pads and return its output name."""
        kernel = weight.shape[-1]
        w = self.constant(f"{name}.weight", weight)
        b = self.constant(f"{name}.bias", bias)
        out = self._name(name)
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [out],
                name=out,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=pads,
                group=group,
            )
        )
        return out

    def conv_bn(
        self,
        weights: Weights,
        x: str,
        *,
        conv: str,
        bn: str,
        shape: tuple[int, int, int, int],
        stride: int,
        pads: list[int],
        eps: float,
        group: int = 1,
        relu6: bool = True,
    ) -> str:
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
        if self._relu6_bounds is None:
            self._relu6_bounds = (
                self.constant("relu6.min", np.array(0.0, dtype=np.float32)),
                self.constant("relu6.max", np.array(6.0, dtype=np.float32)),
            )
        out = self._name("relu6")
        self.nodes.append(helper.make_node("Clip", [x, *self._relu6_bounds], [out], name=out))
        return out

    def add(self, a: str, b: str) -> str:
        """Add an elementwise Add (residual connection)."""
        out = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [out], name=out))
        return out

    def global_pool(self, x: str, output: str) -> str:
        """Global average pool to [N, C] under the name `output`."""
        pooled = self._name("pool")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled], name=pooled))
        self.nodes.append(helper.make_node("Flatten", [pooled], [output], name=output, axis=1))
        return output

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, output: str) -> str:
        """A fully connected layer, torch layout [out, in], under the name `output`."""
        w = self.constant("fc.weight", weight.astype(np.float32))
        b = self.constant("fc.bias", bias.astype(np.float32))
        self.nodes.append(
            helper.make_node("Gemm", [x, w, b], [output], name=output, transB=1)
        )
        return output

    def model(
        self,
        *,
        name: str,
        input_name: str,
        image_size: int,
        outputs: Sequence[tuple[str, int]],
        doc: str,
        metadata: Mapping[str, str],
    ) -> onnx.ModelProto:
        """Wrap the graph in a checked model with a dynamic batch axis."""
        graph = helper.make_graph(
            self.nodes,
            name,
            [
                helper.make_tensor_value_info(
                    input_name, TensorProto.FLOAT, ["N", 3, image_size, image_size]
                )
            ],
            [
                helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", dim])
                for out, dim in outputs
            ],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            producer_name="lookalike",
            doc_string=doc,
            opset_imports=[helper.make_opsetid("", OPSET)],
        )
        model.ir_version = IR_VERSION
        helper.set_model_props(model, dict(metadata))
        onnx.checker.check_model(model, full_check=True)
        return model
