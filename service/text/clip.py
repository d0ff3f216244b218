"""Bring your own CLIP: a text encoder beside an added image model, for `text_mode: clip`.

`lookalike models add NAME --onnx image.onnx --text-onnx text.onnx --tokenizer tokenizer.json`
registers the image encoder as any added model (its vectors fill `image_embeddings` through
uploads or a reindex) and stores the text encoder and its `tokenizers` JSON file in the same
folder, described by `text.json`. A text query is tokenized (padded or cut to the encoder's
context length), encoded, and searched against that model's image vectors by cosine.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from service.embedding import registry
from service.embedding.session import load_once
from service.errors import ApiError

TEXT_JSON = "text.json"
TEXT_ONNX = "text.onnx"
TOKENIZER = "tokenizer.json"
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TextEncoderInfo:
    """What `text.json` records: the input names and the fixed context length."""

    ids_input: str
    mask_input: str | None
    length: int
    dim: int
    sha256: str


def _inputs(model: onnx.ModelProto) -> tuple[str, str | None]:
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if not 1 <= len(names) <= 2:
        raise registry.ModelError("a text encoder has token ids and, optionally, an attention "
                                  f"mask as inputs; this one has {len(names)} inputs")
    mask = next((n for n in names if "mask" in n.lower()), None)
    ids = next(n for n in names if n != mask)
    return ids, mask


class TextEncoder:
    """A CLIP-style text encoder with its tokenizer, run by ONNX Runtime."""

    def __init__(self, onnx_path: Path, tokenizer_path: Path, info: TextEncoderInfo) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.info = info
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(info.length)
        pad = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(length=info.length, pad_id=int(pad.get("pad_id", 0)),
                                      pad_token=str(pad.get("pad_token", "[PAD]")))
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> np.ndarray:
        """One vector per text, as the encoder outputs it (its first output)."""
        encoded = self.tokenizer.encode_batch(texts)
        feed = {self.info.ids_input: np.array([e.ids for e in encoded], dtype=np.int64)}
        if self.info.mask_input:
            feed[self.info.mask_input] = np.array([e.attention_mask for e in encoded],
                                                  dtype=np.int64)
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


def check_text_encoder(onnx_file: Path, tokenizer_file: Path, *, length: int,
                       dim: int) -> TextEncoderInfo:
    """Load and run a text encoder once; its output must be (batch, dim) like the images'."""
    for path in (onnx_file, tokenizer_file):
        if not path.is_file():
            raise registry.ModelError(f"{path} is not a readable file")
    if onnx_file.stat().st_size > registry.MAX_ONNX_BYTES or \
            tokenizer_file.stat().st_size > MAX_TOKENIZER_BYTES:
        raise registry.ModelError("the text encoder or its tokenizer is too large")
    try:
        model = onnx.load_model(onnx_file)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise registry.ModelError(f"{onnx_file.name} is not a valid ONNX model: {exc}") from exc
    ids, mask = _inputs(model)
    info = TextEncoderInfo(ids_input=ids, mask_input=mask, length=length, dim=dim,
                           sha256=registry.sha256_file(onnx_file))
    try:
        out = TextEncoder(onnx_file, tokenizer_file, info).encode(["a photo", "of a cat"])
    except Exception as exc:
        raise registry.ModelError(f"the text encoder does not run: {exc}") from exc
    if out.shape != (2, dim):
        raise registry.ModelError(f"the text encoder outputs {out.shape[1:]} per text; the "
                                  f"image vectors have {dim} numbers")
    return info


def add_text_encoder(name: str, onnx_file: Path, tokenizer_file: Path, model_dir: Path, *,
                     info: TextEncoderInfo) -> None:
    """Copy a checked text encoder into an added model's folder (text.json written last)."""
    folder = registry.model_path(model_dir, name)
    shutil.copyfile(onnx_file, folder / TEXT_ONNX)
    shutil.copyfile(tokenizer_file, folder / TOKENIZER)
    tmp = folder / f".{TEXT_JSON}.tmp"
    tmp.write_text(json.dumps(info.__dict__, indent=2) + "\n")
    tmp.rename(folder / TEXT_JSON)


def get_text_encoder(model_dir: str | Path, name: str) -> TextEncoder:
    """The process-wide text encoder of an added model, loaded on first use."""
    def load() -> TextEncoder:
        try:
            folder = registry.model_path(Path(model_dir), name)
        except registry.ModelError as exc:
            raise ApiError("unknown_model", str(exc)) from exc
        try:
            info = TextEncoderInfo(**json.loads((folder / TEXT_JSON).read_text()))
        except FileNotFoundError as exc:
            raise ApiError("no_text_encoder", f"model {name!r} has no text encoder: add "
                           "one with `lookalike models add NAME --onnx ... --text-onnx ... "
                           "--tokenizer ...`") from exc
        if registry.sha256_file(folder / TEXT_ONNX) != info.sha256:
            raise ApiError("invalid_model", f"the text encoder of {name!r} does not match "
                           "its recorded sha256", status=409)
        return TextEncoder(folder / TEXT_ONNX, folder / TOKENIZER, info)

    return load_once(("clip-text", str(model_dir), name), load)


def encode_text(text: str, *, model_dir: str | Path, model_name: str) -> np.ndarray:
    """The text's vector in the model's image space."""
    return get_text_encoder(model_dir, model_name).encode([text])[0]
