"""Append a fitted head to a backbone's ONNX graph, keeping its other outputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.training.heads import NORM_EPS, Head


def append_head(backbone: onnx.ModelProto, head: Head, *, source: str = "embedding",
                output: str = "embedding") -> onnx.ModelProto:
    """A copy of the backbone whose `embedding` output is the head applied to the old one.

    A head with re-trained last layers (`head.tail`) replaces their weights in the copy
    first.
    """
    model = onnx.ModelProto()
    model.CopyFrom(backbone)
    if head.tail is not None:
        head.tail.install(model)
    graph = model.graph
    renamed = f"{source}_backbone"
    for node in graph.node:
        node.output[:] = [renamed if o == source else o for o in node.output]
        node.input[:] = [renamed if i == source else i for i in node.input]
    consts = {
        "head_zero": np.zeros(1, np.float32),
        "head_eps": np.array([NORM_EPS], np.float32),
        "head_power": np.array([head.power], np.float32),
        "head_mean": head.mean.astype(np.float32),
        "head_scale": head.scale.astype(np.float32),
        "head_weight": head.weight.astype(np.float32),
        "head_bias": head.bias.astype(np.float32),
    }
    nodes = [
        helper.make_node("Max", [renamed, "head_zero"], ["head_relu"]),
        helper.make_node("Pow", ["head_relu", "head_power"], ["head_sqrt"]),
        helper.make_node("Sub", ["head_sqrt", "head_mean"], ["head_centred"]),
        helper.make_node("Div", ["head_centred", "head_scale"], ["head_scaled"]),
    ]
    features = "head_scaled"
    if head.hidden_weight is not None and head.hidden_bias is not None:
        consts["head_hidden_weight"] = head.hidden_weight.astype(np.float32)
        consts["head_hidden_bias"] = head.hidden_bias.astype(np.float32)
        nodes += [
            helper.make_node("MatMul", ["head_scaled", "head_hidden_weight"], ["head_h_mm"]),
            helper.make_node("Add", ["head_h_mm", "head_hidden_bias"], ["head_h_pre"]),
            helper.make_node("Relu", ["head_h_pre"], ["head_hidden"]),
        ]
        features = "head_hidden"
    if head.cosine or head.mix is not None:
        nodes += unit_nodes(features, "head_hidden_unit")
    if head.mix is not None:
        consts["head_mix"] = np.array([head.mix], np.float32)
    last = "head_linear" if head.softmax else "head_out"
    nodes += [
        helper.make_node("MatMul", ["head_hidden_unit" if head.cosine else features,
                                    "head_weight"], ["head_projected"]),
        helper.make_node("Add", ["head_projected", "head_bias"], [last]),
    ]
    if head.softmax:
        nodes.append(helper.make_node("Softmax", [last], ["head_out"], axis=1))
    if head.mix is not None:
        nodes += unit_nodes("head_out", "head_out_unit")
        nodes += [
            helper.make_node("Mul", ["head_out_unit", "head_mix"], ["head_out_mixed"]),
            helper.make_node("Concat", ["head_hidden_unit", "head_out_mixed"], [output],
                             axis=1),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["head_out"], [output]))
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    graph.node.extend(nodes)
    for out in graph.output:
        if out.name == source:
            out.CopyFrom(helper.make_tensor_value_info(
                output, TensorProto.FLOAT, ["N", head.dim]))
    onnx.checker.check_model(model)
    return model


def unit_nodes(source: str, target: str) -> list[onnx.NodeProto]:
    """Nodes dividing each row by its L2 norm plus NORM_EPS (as heads._unit does)."""
    return [
        helper.make_node("ReduceL2", [source], [f"{target}_norm"], axes=[1], keepdims=1),
        helper.make_node("Add", [f"{target}_norm", "head_eps"], [f"{target}_denom"]),
        helper.make_node("Div", [source, f"{target}_denom"], [target]),
    ]
