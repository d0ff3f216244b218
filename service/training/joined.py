"""Backbone+head graphs joined into one model: one input, their embeddings side by side."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import compose

from service.embedding.convert.graph import GraphBuilder, check, tensor
from service.training.heads import NORM_EPS


def resized_input(model: onnx.ModelProto, input_name: str, from_size: int,
                  to_size: int) -> onnx.ModelProto:
    """A copy of a backbone that takes `from_size` square crops and resizes them to its own.

    Training and inference both run this graph, so the branch sees the same pixels in both.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if from_size == to_size:
        return copy
    graph = copy.graph
    inner = f"{input_name}_resized"
    for node in graph.node:
        node.input[:] = [inner if i == input_name else i for i in node.input]
    # Constant scales, not sizes computed from the input's shape: shape inference then knows
    # the branch's sizes (--tune top needs them). The scale is nudged up until the output
    # size, floor(from_size × scale), is exactly to_size in float32.
    scale = np.float32(to_size / from_size)
    while int(np.float32(from_size) * scale) < to_size:
        scale = np.nextafter(scale, np.float32(2))
    g = GraphBuilder(prefix="lookalike_resize_")
    scales = g.constant("scales", np.array([1, 1, scale, scale], np.float32))
    g.op("Resize", [input_name, "", scales], output=inner, mode="linear",
         coordinate_transformation_mode="half_pixel")
    g.add_to(graph, first=True)
    for value in graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            dims[2].dim_value = dims[3].dim_value = from_size
    return check(copy, infer_shapes=False)


def join(models: list[onnx.ModelProto], input_name: str, *, embedding: str = "embedding",
         keep: tuple[int, str] | None = None) -> onnx.ModelProto:
    """One graph that feeds its input to every model and outputs their unit embeddings
    concatenated (then made unit), plus output `keep[1]` of model `keep[0]`."""
    prefixed = [compose.add_prefix(m, f"b{i}_") for i, m in enumerate(models)]
    source = next(v for v in models[0].graph.input if v.name == input_name)
    g = GraphBuilder(prefix="joined_")
    parts, dim = [], 0
    for i, m in enumerate(prefixed):
        own = models[i].graph.input[0].name  # each branch keeps its own input's name
        g.op("Identity", [input_name], output=f"b{i}_{own}")
        g.include(m.graph)
        parts.append(g.l2_normalize(f"b{i}_{embedding}", eps=NORM_EPS))
        out = next(o for o in models[i].graph.output if o.name == embedding)
        dim += out.type.tensor_type.shape.dim[1].dim_value
    g.l2_normalize(g.op("Concat", parts, axis=1), eps=NORM_EPS, output=embedding)
    outputs = [tensor(embedding, ["N", dim])]
    if keep is not None:
        index, name = keep
        g.op("Identity", [f"b{index}_{name}"], output=name)
        outputs.append(next(o for o in models[index].graph.output if o.name == name))
    return g.model(name="joined", inputs=[source], outputs=outputs,
                   opsets=models[0].opset_import, ir_version=models[0].ir_version,
                   infer_shapes=False)
