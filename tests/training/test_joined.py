"""Joining backbone+head graphs: the resize in front of a smaller input, and the joined output."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.training.joined import join, resized_input


def _toy(size: int, scale: float, name: str = "image") -> onnx.ModelProto:
    """A stand-in backbone: embedding = scale × the mean of each channel; logits = the same."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", [name], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("Mul", ["pooled", "scale"], ["embedding"]),
         helper.make_node("Identity", ["pooled"], ["logits"])],
        "toy",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array([scale], np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"image": x})


def test_resized_input_takes_the_larger_crop() -> None:
    small = resized_input(_toy(4, 1.0), "image", 8, 4)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    (out,) = _run(small, x, ["embedding"])
    # A bilinear 8 → 4 resize averages 2×2 blocks: the channel means are unchanged.
    assert np.allclose(out, x.mean(axis=(2, 3)), atol=1e-5)
    assert resized_input(_toy(4, 1.0), "image", 4, 4).graph.node[0].op_type == "ReduceMean"


def test_join_puts_unit_embeddings_side_by_side_and_keeps_an_output() -> None:
    # The second branch names its input otherwise: the joined input feeds it all the same.
    models = [resized_input(_toy(4, 2.0), "image", 8, 4), _toy(8, -3.0, name="pixels")]
    joined = join(models, "image", keep=(1, "logits"))
    assert [o.name for o in joined.graph.output] == ["embedding", "logits"]
    assert joined.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 6
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    embedding, logits = _run(joined, x, ["embedding", "logits"])
    unit = x.mean(axis=(2, 3)) / np.linalg.norm(x.mean(axis=(2, 3)), axis=1, keepdims=True)
    # Each branch made unit (the scales drop out, the sign stays), then the whole row.
    assert np.allclose(embedding, np.concatenate([unit, -unit], axis=1) / np.sqrt(2), atol=1e-5)
    assert np.allclose(logits, x.mean(axis=(2, 3)), atol=1e-6)
