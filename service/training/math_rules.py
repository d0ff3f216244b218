"""Backward rules of the heads' ops: matrix products, broadcast arithmetic, roots, norms.

Rules as in conv_rules.py. An elementwise op's input that was broadcast gets its gradient
summed back to its own shape (`Backward.unbroadcast`); reductions are spread back over the
axes they removed. Two rules are not the plain derivative where that is infinite or
undefined: Sqrt takes its slope at max(x, SQRT_FLOOR) (a channel that the backbone's
activation zeroes everywhere would otherwise get an infinite gradient), and ReduceL2 of an
all-zero row passes no gradient (0/0).
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
SQRT_FLOOR = 1e-4


def matmul(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """A @ B of two matrices: dA = G Bᵀ, dB = Aᵀ G."""
    a, w = node.input[0], node.input[1]
    if len(b.shapes[a]) != 2 or len(b.shapes[w]) != 2:
        raise ApiError("unsupported_backbone", "cannot train through a MatMul of tensors "
                       "other than matrices", status=409)
    out: Grads = []
    if b.wants(a):
        out.append((a, b.add("Gemm", [grad, b.save(w)], "da", transB=1)))
    if b.wants(w):
        out.append((w, b.add("Gemm", [b.save(a), grad], "db", transA=1)))
    return out


def add(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """A + B, either broadcast."""
    y = node.output[0]
    return [(i, b.unbroadcast(grad, y, i)) for i in node.input if b.wants(i)]


def sub(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """A - B, either broadcast."""
    (x, z), y = node.input, node.output[0]
    out: Grads = []
    if b.wants(x):
        out.append((x, b.unbroadcast(grad, y, x)))
    if b.wants(z):
        out.append((z, b.unbroadcast(b.add("Neg", [grad], "neg"), y, z)))
    return out


def mul(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """A · B, either broadcast: each one's gradient is the other times G."""
    (x, z), y = node.input, node.output[0]
    out: Grads = []
    if b.wants(x):
        out.append((x, b.unbroadcast(b.add("Mul", [grad, b.save(z)], "mul"), y, x)))
    if b.wants(z):
        out.append((z, b.unbroadcast(b.add("Mul", [grad, b.save(x)], "mul"), y, z)))
    return out


def div(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """Y = A / B, either broadcast: dA = G / B, dB = -G·Y / B."""
    (x, z), y = node.input, node.output[0]
    out: Grads = []
    if b.wants(x):
        out.append((x, b.unbroadcast(b.add("Div", [grad, b.save(z)], "div"), y, x)))
    if b.wants(z):
        ratio = b.add("Div", [b.add("Mul", [grad, b.save(y)], "div"), b.save(z)], "div")
        out.append((z, b.unbroadcast(b.add("Neg", [ratio], "div"), y, z)))
    return out


def sqrt(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """Y = √X: dX = G / (2 √max(X, SQRT_FLOOR))."""
    x, y = node.input[0], node.output[0]
    if not b.wants(x):
        return []
    floored = b.add("Max", [b.save(y), b.const(np.sqrt(SQRT_FLOOR), "floor")], "sqrt")
    slope = b.add("Div", [b.const(0.5, "half"), floored], "sqrt")
    return [(x, b.add("Mul", [grad, slope], "sqrt"))]


def maximum(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """max(A, B) of two inputs: the gradient goes to the larger one (to B on a tie)."""
    if len(node.input) != 2:
        raise ApiError("unsupported_backbone", "cannot train through a Max of other than "
                       "two inputs", status=409)
    (x, z), y = node.input, node.output[0]
    larger = b.add("Greater", [b.save(x), b.save(z)], "max")
    out: Grads = []
    if b.wants(x):
        mask = b.add("Cast", [larger], "max", to=b.elem)
        out.append((x, b.unbroadcast(b.add("Mul", [grad, mask], "max"), y, x)))
    if b.wants(z):
        mask = b.add("Cast", [b.add("Not", [larger], "max")], "max", to=b.elem)
        out.append((z, b.unbroadcast(b.add("Mul", [grad, mask], "max"), y, z)))
    return out


def _axes(b: Backward, node: onnx.NodeProto) -> tuple[list[int], bool]:
    """A reduction's axes (non-negative; all when none are given) and its keepdims."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = len(b.shapes[node.input[0]])
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = numpy_helper.to_array(next(
            i for i in b.model.graph.initializer if i.name == node.input[1])).tolist()
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    return sorted(axes), bool(attrs.get("keepdims", 1))


def _kept(b: Backward, name: str, axes: list[int], keepdims: bool) -> str:
    """A reduced tensor with its reduced axes back as size 1 (for broadcasting)."""
    return name if keepdims else b.add("Unsqueeze", [name, b.const(axes, "axes")], "keep")


def reduce_l2(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """Y = ‖X‖ over axes: dX = X · G / Y (0 where Y is 0)."""
    x, y = node.input[0], node.output[0]
    if not b.wants(x):
        return []
    axes, keepdims = _axes(b, node)
    norm = b.add("Max", [_kept(b, b.save(y), axes, keepdims),
                         b.const(np.finfo(b.dtype).tiny, "tiny")], "l2")
    ratio = b.add("Div", [_kept(b, grad, axes, keepdims), norm], "l2")
    return [(x, b.add("Mul", [b.save(x), ratio], "l2"))]


def reduce_sum_square(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """Y = Σ X² over axes: dX = 2 X G."""
    x = node.input[0]
    if not b.wants(x):
        return []
    axes, keepdims = _axes(b, node)
    twice = b.add("Mul", [_kept(b, grad, axes, keepdims), b.const(2.0, "two")], "ss")
    return [(x, b.add("Mul", [b.save(x), twice], "ss"))]


def reduce_mean(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """The mean over axes: the gradient spread evenly over what it averaged."""
    x = node.input[0]
    if not b.wants(x):
        return []
    axes, keepdims = _axes(b, node)
    shape = b.shapes[x]
    if any(shape[a] is None for a in axes):
        raise ApiError("unsupported_backbone", "cannot train through a mean over the batch",
                       status=409)
    count = int(np.prod([shape[a] for a in axes]))
    scaled = b.add("Mul", [_kept(b, grad, axes, keepdims), b.const(1 / count, "count")],
                   "mean")
    return [(x, b.add("Expand", [scaled, b.const([1 if d is None else d for d in shape],
                                                  "shape")], "mean"))]


def reshape(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """Flatten, Reshape, Squeeze, Unsqueeze: the gradient in the input's shape."""
    x = node.input[0]
    if not b.wants(x):
        return []
    if sum(d is None for d in b.shapes[x]) > 1:
        raise ApiError("unsupported_backbone", "cannot train through a reshape of a tensor "
                       "with two batch axes", status=409)
    return [(x, b.add("Reshape", [grad, b.shape_const(x)], "reshape"))]


def identity(b: Backward, node: onnx.NodeProto, grad: str) -> Grads:
    """The gradient as it is."""
    return [(node.input[0], grad)] if b.wants(node.input[0]) else []


RULES: dict[str, Callable[[Backward, onnx.NodeProto, str], Grads]] = {
    "MatMul": matmul, "Add": add, "Sub": sub, "Mul": mul, "Div": div, "Sqrt": sqrt,
    "Max": maximum, "ReduceL2": reduce_l2, "ReduceSumSquare": reduce_sum_square,
    "ReduceMean": reduce_mean, "Flatten": reshape, "Reshape": reshape, "Squeeze": reshape,
    "Unsqueeze": reshape, "Identity": identity,
}
