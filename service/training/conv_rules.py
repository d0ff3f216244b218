"""Backward rules of the convolutional backbones' ops: Conv, Clip/Relu, GlobalAveragePool.

Each rule takes the forward node and the name of its output's gradient and appends, on the
`Backward` tape of backprop.py, the nodes that compute its inputs' gradients; it returns
(input, gradient) for each input that depends on a trainable weight. A convolution's input
gradient is a ConvTranspose with the same kernel (a Conv by the transposed kernel for
pointwise ones); its weight gradient correlates the input with the output gradient: for full
convolutions a MatMul over positions per kernel offset, for depthwise ones a single
convolution with a group per channel over the batch's images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.errors import ApiError

if TYPE_CHECKING:
    from service.training.backprop import Backward

Grads = list[tuple[str, str]]


def constant_value(model: onnx.ModelProto, name: str) -> float | None:
    """The first value of an initializer or Constant node named `name`; None if neither."""
    for init in model.graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return float(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
    return None


def clip_bounds(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[float, float]:
    """(low, high) of a Clip or Relu node, read from its inputs or attributes."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    bounds = [constant_value(model, n) if n else None for n in list(node.input[1:3])]
    bounds += [None] * (2 - len(bounds))
    attr = {a.name: a.f for a in node.attribute}
    low = bounds[0] if bounds[0] is not None else attr.get("min", float("-inf"))
    high = bounds[1] if bounds[1] is not None else attr.get("max", float("inf"))
    return float(low), float(high)


def clip(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """Clip and Relu: the gradient where the input is strictly inside the bounds."""
    x = node.input[0]
    if not b.wants(x):
        return []
    low, high = clip_bounds(b.model, node)
    # The bounds with the input's rank: onnxruntime (1.31) compares against a rank-0 or
    # rank-1 scalar 40-60 times slower than against a (1, 1, 1, 1) one.
    ones = [1] * len(b.shapes[x])
    inside = b.add("Greater", [b.save(x), b.const(np.full(ones, low), "low")], "gt")
    if np.isfinite(high):
        inside = b.add("And", [inside, b.add("Less", [x, b.const(np.full(ones, high), "high")],
                                             "lt")], "and")
    # A cast mask times the gradient: Where, or the mask as float ops (Sign of Relu),
    # measured slower in onnxruntime.
    mask = b.add("Cast", [inside], "mask", to=b.elem)
    return [(x, b.add("Mul", [grad, mask], "clip"))]


def global_average_pool(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """The gradient spread evenly over the positions it averaged."""
    x = node.input[0]
    if not b.wants(x):
        return []
    _, c, h, w = b.shapes[x]
    scaled = b.add("Mul", [grad, b.const(1 / (h * w), "area")], "gap")
    return [(x, b.add("Expand", [scaled, b.const([1, c, h, w], "shape")], "gap"))]


def conv(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """Conv of any group, stride and padding (not dilated, not auto-padded)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, w_name = node.input[0], node.input[1]
    weight = b.weights[w_name]
    out_c, in_per_group, k, kw = weight.shape
    group = int(attrs.get("group", 1))
    strides = list(attrs.get("strides", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if list(attrs.get("dilations", [1, 1])) != [1, 1] or \
            attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ApiError("unsupported_backbone", "cannot train through a dilated or "
                       "auto-padded convolution", status=409)
    _, in_c, hx, wx = b.shapes[x]
    _, _, hy, wy = b.shapes[node.output[0]]
    out: Grads = []
    if len(node.input) > 2 and node.input[2]:
        out.append((node.input[2], b.add("ReduceSum", [grad, b.const(
            [0, 2, 3], "axes")], "db", keepdims=0)))
    xp = b.save(x)
    if any(pads):
        xp = b.add("Pad", [x, b.const([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]],
                                      "pads")], "pad")
    if group > 1:
        if not (in_per_group == 1 and group == out_c == in_c):
            raise ApiError("unsupported_backbone", "cannot train through a grouped "
                           "convolution other than a depthwise one", status=409)
        out.append((w_name, _depthwise_weight_grad(b, xp, grad, weight.shape, strides,
                                                   hx + pads[0] + pads[2],
                                                   wx + pads[1] + pads[3])))
    else:
        out.append((w_name, _dense_weight_grad(b, xp, grad, weight.shape, strides, in_c,
                                               hy, wy)))
    if not b.wants(x):
        return out
    if (k, kw, group, *strides, *pads) == (1, 1, 1, 1, 1, 0, 0, 0, 0):
        # A pointwise convolution's input gradient is the pointwise convolution by the
        # transposed kernel: onnxruntime runs that as one GEMM, faster than ConvTranspose.
        dx = b.add("Conv", [grad, b.add("Transpose", [w_name], "wt", perm=[1, 0, 2, 3])],
                   "dx")
    else:
        extra = [hx - ((hy - 1) * strides[0] - pads[0] - pads[2] + k),
                 wx - ((wy - 1) * strides[1] - pads[1] - pads[3] + kw)]
        dx = b.add("ConvTranspose", [grad, w_name], "dx", group=group, strides=strides,
                   pads=pads, output_padding=extra, kernel_shape=[k, kw])
    return [*out, (x, dx)]


def _depthwise_weight_grad(b: Backward, xp: str, grad: str, shape: tuple[int, ...],
                           strides: list[int], hp: int, wp: int) -> str:
    """dW[c] = Σ_n correlation of the padded input's channel c with the grad's."""
    # One convolution with a group per channel, each over the batch's N images: the
    # input (1, C·N, Hp, Wp), the output gradient as its kernel (C, N, Hy, Wy), dilated
    # by the stride. Per kernel offset, a slice, product and sum over the whole batch
    # cost 5-6 times as much (most of a backward step through depthwise blocks).
    channels, _, k, kw = shape
    rows = b.add("Reshape", [b.add("Transpose", [xp], "dwx", perm=[1, 0, 2, 3]),
                             b.const([1, -1, hp, wp], "shape")], "dwx")
    kernel = b.add("Transpose", [grad], "dwg", perm=[1, 0, 2, 3])
    dw = b.add("Conv", [rows, kernel], "dw", group=channels, dilations=strides)
    dw = b.add("Slice", [dw, b.const([0, 0], "starts"), b.const([k, kw], "ends"),
                         b.const([2, 3], "axes")], "dw")  # rows the stride skipped
    return b.add("Reshape", [dw, b.const(list(shape), "shape")], "dw")


def _dense_weight_grad(b: Backward, xp: str, grad: str, shape: tuple[int, ...],
                       strides: list[int], in_c: int, hy: int, wy: int) -> str:
    """dW of an ungrouped convolution: per kernel offset, grad rows times shifted input."""
    out_c, _, k, kw = shape
    per_offset = []
    # (O, N·HW) times (N·HW, I): one GEMM per offset that sums over the batch too (a
    # batched MatMul per image, then a sum, wrote an (N, O, I) array first).
    grad_rows = b.add("Reshape", [b.add("Transpose", [grad], "rows", perm=[1, 0, 2, 3]),
                                  b.const([out_c, -1], "shape")], "rows")
    for i in range(k):
        for j in range(kw):
            shifted = xp
            if (k, kw, *strides) != (1, 1, 1, 1):
                shifted = b.add("Slice", [xp, b.const([i, j], "starts"), b.const(
                    [i + (hy - 1) * strides[0] + 1, j + (wy - 1) * strides[1] + 1], "ends"),
                    b.const([2, 3], "axes"), b.const(strides, "steps")], "shift")
            cols = b.add("Reshape", [b.add("Transpose", [shifted], "cols", perm=[
                0, 2, 3, 1]), b.const([-1, in_c], "shape")], "cols")
            per_offset.append(b.add("MatMul", [grad_rows, cols], "dw"))  # (O, I)
    stacked = per_offset[0] if len(per_offset) == 1 else b.add(
        "Concat", [b.add("Unsqueeze", [p, b.const([-1], "axes")], "dw")
                   for p in per_offset], "dw", axis=-1)
    return b.add("Reshape", [stacked, b.const(list(shape), "shape")], "dw")


RULES: dict[str, Callable[[Backward, onnx.NodeProto, str], Grads]] = {
    "Conv": conv, "Clip": clip, "Relu": clip, "GlobalAveragePool": global_average_pool,
}
