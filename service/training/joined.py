"""Backbone+head graphs joined into one model: one input, their embeddings side by side."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from service.training.heads import NORM_EPS
from service.training.onnx_head import unit_nodes


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
    graph.initializer.append(numpy_helper.from_array(
        np.array([1, 1, scale, scale], np.float32), "lookalike_resize_scales"))
    nodes = [helper.make_node("Resize", [input_name, "", "lookalike_resize_scales"], [inner],
                              mode="linear", coordinate_transformation_mode="half_pixel")]
    for n in reversed(nodes):
        graph.node.insert(0, n)
    for value in graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            dims[2].dim_value = dims[3].dim_value = from_size
    onnx.checker.check_model(copy)
    return copy


def join(models: list[onnx.ModelProto], input_name: str, *, embedding: str = "embedding",
         keep: tuple[int, str] | None = None) -> onnx.ModelProto:
    """One graph that feeds its input to every model and outputs their unit embeddings
    concatenated (then made unit), plus output `keep[1]` of model `keep[0]`."""
    prefixed = [compose.add_prefix(m, f"b{i}_") for i, m in enumerate(models)]
    source = next(v for v in models[0].graph.input if v.name == input_name)
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(np.array([NORM_EPS], np.float32), "head_eps")]
    parts, dim = [], 0
    for i, m in enumerate(prefixed):
        own = models[i].graph.input[0].name  # each branch keeps its own input's name
        nodes.append(helper.make_node("Identity", [input_name], [f"b{i}_{own}"]))
        nodes.extend(m.graph.node)
        inits.extend(m.graph.initializer)
        nodes += unit_nodes(f"b{i}_{embedding}", f"joined_unit_{i}")
        parts.append(f"joined_unit_{i}")
        out = next(o for o in models[i].graph.output if o.name == embedding)
        dim += out.type.tensor_type.shape.dim[1].dim_value
    nodes.append(helper.make_node("Concat", parts, ["joined_concat"], axis=1))
    nodes += unit_nodes("joined_concat", embedding)
    outputs = [helper.make_tensor_value_info(embedding, TensorProto.FLOAT, ["N", dim])]
    if keep is not None:
        index, name = keep
        nodes.append(helper.make_node("Identity", [f"b{index}_{name}"], [name]))
        kept = next(o for o in models[index].graph.output if o.name == name)
        outputs.append(kept)
    graph = helper.make_graph(nodes, "joined", [source], outputs, inits)
    model = helper.make_model(graph, opset_imports=models[0].opset_import,
                              ir_version=models[0].ir_version)
    onnx.checker.check_model(model)
    return model
