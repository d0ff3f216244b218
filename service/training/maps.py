"""Feature maps that feed a backbone's tail, computed once per training image and view."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from service.embedding.transforms import Preprocessing, batch, preprocess
from service.training.tails import GraphTail, tail_of

TAP = "lookalike_tail_input"


class MapRunner:
    """A backbone that outputs the input maps of its tail, (N, C, H, W) float16.

    `depth`: tails.DEPTHS or tails.TOP.
    """

    def __init__(self, model: onnx.ModelProto, input_name: str,
                 embedding: str = "embedding", depth: str = "last-conv") -> None:
        import onnxruntime as ort

        self.tail: GraphTail = tail_of(model, embedding, depth)
        tapped = onnx.ModelProto()
        tapped.CopyFrom(model)
        tapped.graph.output.append(onnx.helper.make_tensor_value_info(
            TAP, onnx.TensorProto.FLOAT, None))
        tapped.graph.node.append(onnx.helper.make_node("Identity", [self.tail.tap], [TAP]))
        self.input_name = input_name
        self.session = ort.InferenceSession(tapped.SerializeToString(),
                                            providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> np.ndarray:
        """Feature maps of a batch of model inputs, as float16 (they are kept in memory)."""
        return self.session.run([TAP], {self.input_name: images})[0].astype(np.float16)


def centre_maps(items: Iterable[bytes], runner: MapRunner, prep: Preprocessing, *,
                max_pixels: int, batch_size: int = 32) -> np.ndarray:
    """Feature maps of each image under the model's own preprocessing, (N, C, H, W)."""
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
