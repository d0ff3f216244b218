"""A fine-tuned head's own classes as the label bridge's vocabulary.

`lookalike finetune` (service/training) records the class names of a labelled head, sorted, in
its model.json (`extra.training.classes`), and the head's embedding ends with one number per
class, in that order: the class probabilities themselves (linear head, `dim == classes`) or
`mix · unit(probabilities)` after the hidden layer (cosine head). So the words can go through
the user's own labels instead of the 1,000 ImageNet classes: the class names are embedded once
per model by the sentence model (process-wide; as they are: its tokenizer lower-cases, so
"Hat" and "hat" give the same vector), a query's weights over them are
`bridge_weights` (the same top 10 / temperature 0.02 as for ImageNet: on the clothing set's
validation split every setting from one-hot to a softer spread scored within noise, see
docs/benchmarks.md), and an image scores the inner product of those weights with the class
slice of its stored vector (`subvector`, in SQL). For a cosine head that slice is unit-length,
so the score is the cosine between the weights and the class probabilities.

PCA heads have no classes; for them, as for base models, the ImageNet classes stored in
`image_classes` are the vocabulary (service.text.service).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.embedding import registry
from service.embedding.session import load_once
from service.errors import ApiError
from service.text.sentence import Bridge, bridge_weights, get_sentence_encoder

ENCODE_BATCH = 64
# The bridge over a head's classes: the ImageNet defaults (top 10, T 0.02); with exact label
# queries the weight is one-hot at any T up to 0.1, and on hand-written synonyms ("sneakers",
# "jeans") softer settings scored no better on the validation split (bench/text.py).
HEAD_BRIDGE = Bridge()


@dataclass(frozen=True)
class HeadVocabulary:
    """The class names of a head model, their sentence vectors, and where they are stored."""

    model: str
    classes: tuple[str, ...]
    vectors: np.ndarray  # (classes, 384), unit length
    dim: int  # the model's embedding size
    start: int  # 1-based position of the first class number in the embedding (SQL subvector)

    @property
    def count(self) -> int:
        """Number of classes."""
        return len(self.classes)


def head_classes(info: registry.ModelInfo) -> list[str] | None:
    """The class names a fine-tuned head recorded, or None (base models, PCA heads)."""
    record = (info.extra or {}).get("training")
    classes = record.get("classes") if isinstance(record, dict) else None
    if not isinstance(classes, list) or not classes:
        return None
    return [str(c) for c in classes]


def head_vocabulary(model_dir: str | Path, name: str) -> HeadVocabulary | None:
    """The vocabulary of an installed head model with classes; None for any other model.

    Class names are embedded on first use and kept per model file (the key includes the
    model's sha256, so a model re-created under the same name is embedded again).
    """
    try:
        info = registry.load_info(Path(model_dir), name)
    except registry.ModelError:
        return None  # not installed here (e.g. a derived model): no head classes to read
    classes = head_classes(info)
    if classes is None:
        return None
    if int(info.dim) < len(classes):
        raise ApiError("invalid_model", f"model {name!r} records {len(classes)} classes but "
                       f"its embedding has only {info.dim} numbers")

    encoder = get_sentence_encoder(model_dir)  # outside: load_once's lock is not re-entrant

    def load() -> HeadVocabulary:
        vectors = np.concatenate([encoder.encode(classes[i:i + ENCODE_BATCH])
                                  for i in range(0, len(classes), ENCODE_BATCH)])
        return HeadVocabulary(model=name, classes=tuple(classes),
                              vectors=vectors.astype(np.float32), dim=int(info.dim),
                              start=int(info.dim) - len(classes) + 1)

    return load_once(("head_vocabulary", str(model_dir), name, info.sha256), load)


def vocabulary_weights(text: str, vocabulary: HeadVocabulary, *, model_dir: str | Path,
                       bridge: Bridge = HEAD_BRIDGE) -> np.ndarray:
    """The query's weight on each of the head's classes (see `bridge_weights`)."""
    query = get_sentence_encoder(model_dir).encode([text])[0]
    return bridge_weights(vocabulary.vectors @ query, bridge)
