"""Append a fitted head to a backbone's ONNX graph, keeping its other outputs."""

from __future__ import annotations

import numpy as np
import onnx

from service.embedding.convert.graph import GraphBuilder, check, tensor
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
    g = GraphBuilder(prefix="head_")
    x = g.op("Max", [renamed, g.constant("zero", np.zeros(1, np.float32))])
    x = g.op("Pow", [x, g.constant("power", np.array([head.power], np.float32))])
    x = g.op("Sub", [x, g.constant("mean", head.mean.astype(np.float32))])
    x = g.op("Div", [x, g.constant("scale", head.scale.astype(np.float32))])
    if head.hidden_weight is not None and head.hidden_bias is not None:
        x = g.op("Relu", [g.dense(x, head.hidden_weight, head.hidden_bias, prefix="hidden")])
    unit = g.l2_normalize(x, eps=NORM_EPS) if head.cosine or head.mix is not None else x
    out = g.dense(unit if head.cosine else x, head.weight, head.bias, prefix="linear")
    if head.softmax:
        out = g.op("Softmax", [out], axis=1)
    if head.mix is not None:
        mixed = g.op("Mul", [g.l2_normalize(out, eps=NORM_EPS),
                             g.constant("mix", np.array([head.mix], np.float32))])
        g.op("Concat", [unit, mixed], output=output, axis=1)
    else:
        g.op("Identity", [out], output=output)
    g.add_to(graph)
    for out_info in graph.output:
        if out_info.name == source:
            out_info.CopyFrom(tensor(output, ["N", head.dim]))
    return check(model, infer_shapes=False)
