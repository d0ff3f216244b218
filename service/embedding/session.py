"""A thin ONNX Runtime wrapper; each model loads once per process, on first use."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from service.embedding import registry
from service.embedding.transforms import batch, preprocess
from service.metrics import EMBED_BATCH_SIZE, EMBED_DURATION

T = TypeVar("T")
_lock = threading.Lock()
_loaded: dict[tuple[str, ...], Any] = {}


def load_once(key: tuple[str, ...], load: Callable[[], T]) -> T:
    """The process-wide object under `key`, built by `load()` on first use; failures not kept."""
    with _lock:
        if key not in _loaded:
            _loaded[key] = load()
        return _loaded[key]


@dataclass
class Embeddings:
    """Model outputs for a batch: pooled features, and class logits where the model has them."""

    vectors: np.ndarray
    logits: np.ndarray | None


class Embedder:
    """An installed model with its ONNX Runtime session."""

    def __init__(self, info: registry.ModelInfo, onnx_path: Path, *, threads: int = 0) -> None:
        self.info = info
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> Embeddings:
        """Run a preprocessed NCHW batch."""
        started = time.perf_counter()
        results = self.session.run(None, {self.info.input_name: images})
        EMBED_DURATION.labels(self.info.name).observe(time.perf_counter() - started)
        EMBED_BATCH_SIZE.labels(self.info.name).observe(len(images))
        named = dict(zip(self.outputs, results, strict=True))
        # model.json lists the embedding output first (it need not be called "embedding").
        vectors = named.get(self.info.outputs[0], results[0])
        return Embeddings(vectors=np.asarray(vectors, dtype=np.float32),
                          logits=named.get("logits"))

    def embed_bytes(self, items: list[bytes], *, max_pixels: int) -> Embeddings:
        """Decode, preprocess and embed a list of encoded images (all must decode)."""
        prep = self.info.preprocessing
        return self.run(batch([preprocess(data, prep, max_pixels=max_pixels) for data in items]))


def get_embedder(model_dir: str | Path, name: str, *, threads: int = 0) -> Embedder:
    """The process-wide embedder of an installed model, loaded on first call."""
    def load() -> Embedder:
        info = registry.verify(Path(model_dir), name)
        return Embedder(info, registry.model_path(Path(model_dir), name) / "model.onnx",
                        threads=threads)

    return load_once(("embedder", str(model_dir), name), load)
