"""Append a fitted head to a backbone's ONNX graph, keeping its other outputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.training.heads import Head


def append_head(backbone: onnx.ModelProto, head: Head, *, source: str = "embedding",
                output: str = "embedding") -> onnx.ModelProto:
    """A copy of the backbone whose `embedding` output is the head applied to the old one."""
    model = onnx.ModelProto()
    model.CopyFrom(backbone)
    graph = model.graph
    renamed = f"{source}_backbone"
    for node in graph.node:
        node.output[:] = [renamed if o == source else o for o in node.output]
        node.input[:] = [renamed if i == source else i for i in node.input]
    consts = {
        "head_zero": np.zeros(1, np.float32),
        "head_power": np.array([head.power], np.float32),
        "head_mean": head.mean.astype(np.float32),
        "head_scale": head.scale.astype(np.float32),
        "head_weight": head.weight.astype(np.float32),
        "head_bias": head.bias.astype(np.float32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    last = "head_linear" if head.softmax else output
    graph.node.extend([
        helper.make_node("Max", [renamed, "head_zero"], ["head_relu"]),
        helper.make_node("Pow", ["head_relu", "head_power"], ["head_sqrt"]),
        helper.make_node("Sub", ["head_sqrt", "head_mean"], ["head_centred"]),
        helper.make_node("Div", ["head_centred", "head_scale"], ["head_scaled"]),
        helper.make_node("MatMul", ["head_scaled", "head_weight"], ["head_projected"]),
        helper.make_node("Add", ["head_projected", "head_bias"], [last]),
    ])
    if head.softmax:
        graph.node.append(helper.make_node("Softmax", [last], [output], axis=1))
    for out in graph.output:
        if out.name == source:
            out.CopyFrom(helper.make_tensor_value_info(
                output, TensorProto.FLOAT, ["N", int(head.weight.shape[1])]))
    onnx.checker.check_model(model)
    return model
